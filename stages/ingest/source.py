"""Source access in the workers: a local file for FFmpeg, and the sha256 provenance of that file.

A local source is used in place. An object-store source (`s3://...`) is downloaded to a temp file (hashed
while it streams in) and deleted when the block exits, so FFmpeg only ever reads local files (its protocol
whitelist stays `file`). A file the probe will reject on its size (empty, or over `max_file_bytes`) is
neither hashed nor downloaded: a sparse placeholder of the same size stands in, so the probe's size check
rejects it with the usual reason without a byte being read.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import posixpath
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from schemas import reasons
from schemas.config import InputConfig
from schemas.records import VideoRecord, VideoResult
from stages.ingest.entries import STAGE
from stages.storage import Storage, is_uri, redact

log = logging.getLogger(__name__)
_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path, chunk_bytes: int = _CHUNK_BYTES) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def is_remote(video: VideoRecord) -> bool:
    return is_uri(video.source) and not video.source.startswith("file://")


def _size_rejected(size_bytes: int, max_file_bytes: int) -> bool:
    return size_bytes == 0 or size_bytes > max_file_bytes


def _download(uri: str, target: Path) -> str:
    """Copy object `uri` to `target`, returning its sha256 (one pass over the bytes)."""
    folder, name = posixpath.split(uri)
    storage = Storage.from_uri(folder)
    h = hashlib.sha256()
    with storage.open_read(name) as src, target.open("wb") as dst:
        while chunk := src.read(_CHUNK_BYTES):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def local_source(video: VideoRecord, cfg: InputConfig, max_file_bytes: int) -> Iterator[VideoRecord]:
    """A copy of `video` whose `source` is a local file for the length of the block, `sha256` filled when
    `cfg.hash_files` (and the size is acceptable). A downloaded copy is deleted on exit, error or not."""
    rejected = _size_rejected(video.size_bytes, max_file_bytes)
    if not is_remote(video):
        digest = video.sha256
        if cfg.hash_files and not rejected and digest is None:
            digest = sha256_file(Path(video.source))
        yield video.model_copy(update={"sha256": digest})
        return
    suffix = Path(video.relpath).suffix  # FFmpeg picks some demuxers by extension
    with tempfile.TemporaryDirectory(prefix="hicom-source-") as tmp:
        local = Path(tmp) / f"source{suffix}"
        if rejected:
            with local.open("wb") as f:
                f.truncate(video.size_bytes)
            digest = None
        else:
            digest = _download(video.source, local)
            log.debug("fetched %s (%d bytes)", video.source, local.stat().st_size)
        yield video.model_copy(update={"source": str(local), "sha256": digest if cfg.hash_files else None})


def run_local(result: VideoResult, cfg: InputConfig, max_file_bytes: int,
              steps: Sequence[Callable[[VideoResult], VideoResult]]) -> VideoResult:
    """Run record-level `steps` (probe, split, clip+decode, ...) on a local copy of the result's source.

    The source is hashed first (a local file is read once for it; an object is hashed as it downloads).
    Afterwards the record has its original `source` again and any downloaded copy is gone. A source that
    cannot be read or fetched fails the video (`unreadable_file`), not the run.
    """
    if result.failed or result.video is None:
        return result
    original = result.video.source
    try:
        with local_source(result.video, cfg, max_file_bytes) as local:
            result.video = local
            for step in steps:
                result = step(result)
    except OSError as exc:
        result.fail_video(STAGE, reasons.UNREADABLE, f"cannot read the source: {redact(str(exc))}")
    if result.video is not None:
        result.video = result.video.model_copy(update={"source": original})
    return result
