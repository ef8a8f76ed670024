"""One way to start or join Ray, for builds, compaction and (later) training.

A local Ray is started with nothing reaching outside this machine: `address="local"` (never attach to another
cluster running on the machine), node IP 127.0.0.1, no dashboard, usage stats off (so no cloud metadata
look-up). Ray 2.60's GCS and raylet still listen on all interfaces; `tests/stages/test_ray_runtime.py` checks
that no connection leaves the machine. Ray's own log lines go to
the run's log file instead of the terminal, which shows the project's progress display only: its Python loggers
by `route_ray_logs`, and what its C++ core writes to the driver's stderr by `ray_output_to` (the CLI's).
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
VIDEO_WORKER = "video_worker"  # custom resource of the nodes that run FFmpeg (ray_cluster.yaml: cpu_video)
# Requested per video task: only a placement label (CPU does the counting), so a node offers it once.
VIDEO_WORKER_REQUEST = 0.001
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def video_task_resources() -> dict:
    """Ray options every FFmpeg stage adds: run only on nodes that offer `video_worker`."""
    return {"resources": {VIDEO_WORKER: VIDEO_WORKER_REQUEST}}


def route_ray_logs(log_file: str | Path | None) -> None:
    """Send Ray's loggers to `log_file` (or nowhere but warnings) instead of the terminal."""
    handlers: list[logging.Handler] = []
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(handler)
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)  # Ray Data logs DEBUG by default: too much even for a log file


def quiet_ray_data() -> None:
    """Ray Data's own progress bars and start-up banners off: the build shows one display of its own."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = False


def _has_auth_token() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def init_ray(address: str | None = None, num_cpus: int | None = None, log_file: str | Path | None = None,
             video_worker: bool = True) -> None:
    """Join the cluster at `address` ("auto", "ray://host:10001", "10.0.0.1:6379"), or start a private local
    Ray (`num_cpus`, default all) that reaches nothing outside this machine. A local node
    offers the `video_worker` resource (one per CPU) so the video stages place as on a cluster."""
    import ray
    import ray.data  # noqa: F401  (configures its loggers on import: route them after)

    if ray.is_initialized():
        if log_file is not None:  # a caller without a log file (e.g. captioning's set-up) keeps the run's routing
            route_ray_logs(log_file)
        return
    route_ray_logs(log_file)
    # ray.init(configure_logging=False) clears the "ray" logger's handlers first thing, so what Ray logs during
    # its start (e.g. "Token authentication is enabled ...") would reach logging.lastResort, i.e. the terminal:
    # during the start the last resort is the log file, and the handlers are routed again after. Without a log
    # file (a dry run, a bench) the start's notices are dropped and only its errors reach the terminal.
    last_resort = logging.lastResort
    logging.lastResort = logging.getLogger("ray").handlers[0] if log_file is not None else _errors_only()
    try:
        _start(ray, address, num_cpus, video_worker)
    finally:
        logging.lastResort = last_resort
    route_ray_logs(log_file)
    quiet_ray_data()
    log.info("ray: %s", "joined " + address if address else "private local Ray (no dashboard, usage stats off)")


def _errors_only() -> logging.Handler:
    handler = logging.StreamHandler()  # sys.stderr when it logs, as logging.lastResort does
    handler.setLevel(logging.ERROR)
    return handler


def _start(ray, address: str | None, num_cpus: int | None, video_worker: bool) -> None:
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False,
              "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Read by the processes Ray spawns: no usage report and no cloud metadata look-up at start.
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        cpus = num_cpus or os.cpu_count() or 1
        resources = {VIDEO_WORKER: float(cpus)} if video_worker else {}
        ray.init(address="local", num_cpus=cpus, resources=resources, _node_ip_address="127.0.0.1", **kwargs)


@contextmanager
def ray_output_to(log_file: str | Path | None):
    """While inside, Ray's own output goes to `log_file`: what its driver prints on `sys.stdout` (errors the
    cluster pushes, e.g. "(raylet) WARNING: 8 PYTHON worker processes have been started", printed from a
    background thread; a command's stdout carries its report, JSON for `hicom caption`) and what is written
    to file descriptor 2 below Python; `sys.stderr` (logging, the progress display) stays on the terminal.
    A no-op without `log_file`."""
    if log_file is None:
        yield
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    old_stdout = sys.stdout
    with open(log_file, "a", buffering=1, encoding="utf-8", errors="backslashreplace") as stream:
        sys.stdout = stream
        try:
            with _native_stderr_to(log_file):
                yield
        finally:
            sys.stdout = old_stdout


@contextmanager
def _native_stderr_to(log_file: str | Path):
    """What is written to file descriptor 2 below Python goes to `log_file`; `sys.stderr` stays on the terminal.
    Ray's C++ core worker in the driver copies its ERROR lines to fd 2 besides its own log file (e.g. "Actor ... has constructor arguments in the object
    store", which every Ray Data actor pool triggers: Ray Data puts the UDF in the object store and restarts
    actors by default), and no Ray option moves them. A Ray started inside is shut down before leaving, so
    its exit lines land in the file too. A no-op when `sys.stderr` is not fd 2 (a test's capture)."""
    try:
        redirect = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        redirect = False
    if not redirect:
        yield
        return
    import ray

    was_running = ray.is_initialized()
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    old = sys.stderr
    old.flush()
    terminal = open(os.dup(2), "w", buffering=1, encoding=old.encoding or "utf-8", errors="backslashreplace")
    moved = [h for h in logging.getLogger().handlers
             if type(h) is logging.StreamHandler and h.stream is old]  # FileHandler is a StreamHandler too
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = terminal
    for handler in moved:
        handler.setStream(terminal)
    try:
        yield
    finally:
        try:
            if not was_running and ray.is_initialized():
                ray.shutdown()
        finally:
            terminal.flush()
            os.dup2(terminal.fileno(), 2)
            sys.stderr = old
            for handler in moved:
                handler.setStream(old)
            terminal.close()
