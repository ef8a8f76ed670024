"""Where a clip batch's FFmpeg writes its transient outputs (the frames and mp4s read back, then deleted).

They never need to reach a disk. In memory (`/dev/shm`, a tmpfs on Linux) a batch's hundreds of small JPEGs
cost the file system little: on this machine's ext4 they doubled FFmpeg's kernel time and made the clip stage
1.08x slower by wall time (`bench/scratch.py`, bench/README.md). A tmpfs without room for them (Docker gives a container
64 MiB) is not used, and a batch that fills it anyway is cut again on disk (`stages/clip_decode.py`).
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

MEMORY_DIR = Path("/dev/shm")
# Free space the memory folder must have: room for every worker's batch beside Ray's object store, which
# lives there too. A batch of 8 two-second clips (32 frames of 384x384 JPEG and an mp4 each) takes ~3 MB.
MEMORY_MIN_FREE_BYTES = 1 << 30
FOLDER_PREFIX = "hicom-clip-"


def disk_root() -> str:
    return tempfile.gettempdir()


def scratch_root(configured: str | None) -> str:
    """`configured` (the config's `clip.scratch_dir`) if set; else the memory folder when it has room; else the
    system temp folder (`TMPDIR`)."""
    if configured:
        return configured
    return str(MEMORY_DIR) if memory_has_room() else disk_root()


def memory_has_room() -> bool:
    try:
        stat = os.statvfs(MEMORY_DIR)
    except OSError:
        return False
    return os.access(MEMORY_DIR, os.W_OK | os.X_OK) and stat.f_bavail * stat.f_frsize >= MEMORY_MIN_FREE_BYTES


def out_of_space(stderr: str) -> bool:
    """Whether FFmpeg's stderr reports a full output file system (ENOSPC). It may still have exited 0: a
    trailer it failed to write is only logged."""
    return os.strerror(errno.ENOSPC) in stderr


def sweep_stale(root: str, older_than_s: float) -> list[str]:
    """Delete the batch folders in `root` that nothing has written to for `older_than_s` (longer than a batch
    may run): a killed worker's, which in memory would hold RAM until a reboot. Returns their names."""
    swept = []
    now = time.time()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return swept
    for entry in entries:
        if not entry.name.startswith(FOLDER_PREFIX):
            continue
        try:
            idle_s = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:  # another worker swept it first
            continue
        if idle_s > older_than_s and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            swept.append(entry.name)
    return swept
