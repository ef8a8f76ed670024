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
from schemas.config import InputConfig, ProbeConfig
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


def hash_step(result: VideoResult, cfg: InputConfig, probe_cfg: ProbeConfig) -> VideoResult:
    """Record-level step (after probe, which has already failed what it rejects): sha256 of a local source.

    For pipelines that run probe and decode on local files as separate stages; object-store sources are
    hashed by `local_source` while they download.
    """
    if result.video is None or not cfg.hash_files or is_remote(result.video):
        return result
    with local_source(result.video, cfg, probe_cfg.max_file_bytes) as local:
        result.video = result.video.model_copy(update={"sha256": local.sha256})
    return result


def run_local(result: VideoResult, cfg: InputConfig, max_file_bytes: int,
              steps: Sequence[Callable[[VideoResult], VideoResult]]) -> VideoResult:
    """Run record-level `steps` (probe, split, clip+decode, ...) on a local copy of the result's source,
    hashed on the way; the record keeps its original `source` afterwards and the copy is gone. A source
    that cannot be fetched fails the video (`unreadable_file`), not the run."""
    if result.failed or result.video is None:
        return result
    original = result.video.source
    try:
        with local_source(result.video, cfg, max_file_bytes) as local:
            result.video = local
            for step in steps:
                result = step(result)
    except OSError as exc:
        if result.video is not None:
            result.video = result.video.model_copy(update={"source": original})
        return result.fail_video(STAGE, reasons.UNREADABLE, f"cannot fetch the source: {redact(str(exc))}")
    if result.video is not None:
        result.video = result.video.model_copy(update={"source": original})
    return result
