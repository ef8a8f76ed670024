"""Running FFmpeg/ffprobe safely: local files only, no stdin, a timeout, a memory cap, no orphans."""
from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass

# FFmpeg may only open plain local files, and only with demuxers that read nothing but the file itself:
# playlist/list demuxers (hls, concat, image2 sequences, ...) would follow paths or URLs inside an input.
SAFE_DEMUXERS = ("mov,matroska,webm,avi,mpeg,mpegts,mpegtsraw,flv,ogg,asf,nut,mxf,h264,hevc,m4v,mpegvideo,"
                 "gif,png_pipe,jpeg_pipe,webp_pipe,bmp_pipe,wav,mp3,aac,flac")
SAFE_INPUT_ARGS = ["-protocol_whitelist", "file", "-format_whitelist", SAFE_DEMUXERS]
DEFAULT_MEMORY_LIMIT_BYTES = 8 * 1024**3
_PR_SET_PDEATHSIG = 1


def ffmpeg_binary() -> str:
    return os.environ.get("FFMPEG_BINARY", "ffmpeg")


def ffprobe_binary() -> str:
    return os.environ.get("FFPROBE_BINARY", "ffprobe")


def check_binaries() -> None:
    """Fail loudly at start when FFmpeg is missing, rather than once per video."""
    for binary in (ffmpeg_binary(), ffprobe_binary()):
        if shutil.which(binary) is None:
            raise RuntimeError(
                f"{binary!r} not found: install FFmpeg (Debian: apt-get install ffmpeg) or set "
                "FFMPEG_BINARY / FFPROBE_BINARY"
            )


class FfmpegError(RuntimeError):
    def __init__(self, message: str, stderr: str = ""):
        super().__init__(message)
        self.stderr = stderr


class FfmpegTimeout(FfmpegError):
    pass


@dataclass
class Completed:
    stdout: bytes
    stderr: str


def _child_setup(limit_bytes: int):
    """Cap the child's address space and make it die with its parent (no orphan FFmpeg after a kill)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # not Linux: the timeout still bounds the process
            pass

    return apply


def run_tool(
    args: list[str],
    timeout_s: float,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
) -> Completed:
    """Run an FFmpeg-family command; raise FfmpegTimeout/FfmpegError with the stderr tail on failure.

    The process gets its own session so that a timeout kills it and anything it spawned.
    """
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_child_setup(memory_limit_bytes),
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise FfmpegTimeout(f"{os.path.basename(args[0])} timed out after {timeout_s:.0f}s") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    stderr = err.decode("utf-8", "replace")
    if proc.returncode != 0:
        tail = " | ".join(line for line in stderr.strip().splitlines()[-4:])
        raise FfmpegError(f"{os.path.basename(args[0])} exited {proc.returncode}: {tail}", stderr)
    return Completed(stdout=out, stderr=stderr)
