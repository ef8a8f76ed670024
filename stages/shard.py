"""Shard: write one committed part (WebDataset tar + index parquets + failures + marker) to the run's storage.

A part NAME is the set of files
    shards/NAME.tar             the samples (absent when the part holds only failures)
    shards/NAME.clips.parquet   one row per clip       shards/NAME.pairs.parquet   one row per pair
    shards/NAME.videos.parquet  one row per video      failures/NAME.parquet       one row per failure
    shards/NAME.stats.json      the marker: counts and the ids the part commits
each written atomically through `Storage` (local: temp + fsync + rename; object store: upload on close),
data first and the marker LAST: a part exists iff its marker exists, on a disk and on an object store alike.
Anything without a marker is a leftover of a killed writer and is removed on resume.

Workers write the parts of the videos they finished (`part-<hash of its video ids>`: unique and the same on
every rerun and node); `pipeline/compact.py` merges them into full-size `shard-NNNNN` shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.index import (CLIP_SCHEMA, FAILURE_SCHEMA, PAIR_SCHEMA, VIDEO_SCHEMA, PartMarker, clip_row,
                           failure_row, pair_rows, video_row)

# Re-exported for readers that still import them from here; `schemas.index` is their home.
__all__ = ["CLIP_SCHEMA", "FAILURE_SCHEMA", "PAIR_SCHEMA", "VIDEO_SCHEMA", "failure_row", "pair_rows",
           "PartWriter", "part_name_for", "shard_name", "part_files", "to_wds", "frame_member", "tar_header",
           "write_tar"]
from schemas.records import Failure, ShardSample, VideoResult
from stages.storage import Storage

log = logging.getLogger(__name__)
STAGE = "shard"
SHARDS_DIR = "shards"
FAILURES_DIR = "failures"
MARKER_SUFFIX = ".stats.json"
TAR_MTIME = 0  # fixed so the same samples give byte-identical tars; an int (a float costs each member a PAX header)
TAR_OWNER = "bigdata"  # webdataset's TarWriter default
TAR_MODE = 0o444
INDEX_FILES = {"clips": CLIP_SCHEMA, "pairs": PAIR_SCHEMA, "videos": VIDEO_SCHEMA}


def shard_name(index: int) -> str:
    """A compacted, full-size shard: `shard-00000`."""
    return f"shard-{index:05d}"


def part_name_for(ids: Iterable[str]) -> str:
    """A worker's part: named by the ids it commits, so a retried or rerun batch writes the same name."""
    digest = hashlib.sha1("\n".join(sorted(ids)).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"part-{digest}"


def part_files(name: str) -> list[str]:
    """Every file of part `name` (relative to the run), data first, marker last."""
    return [f"{SHARDS_DIR}/{name}.tar", *(f"{SHARDS_DIR}/{name}.{kind}.parquet" for kind in INDEX_FILES),
            f"{FAILURES_DIR}/{name}.parquet", f"{SHARDS_DIR}/{name}{MARKER_SUFFIX}"]


def frame_member(i: int) -> str:
    return f"f{i:03d}.jpg"


def to_wds(sample: ShardSample) -> dict:
    """The WebDataset sample: `json` metadata, frames `f000.jpg`..., optional `mp4`."""
    entry = {"__key__": sample.clip.id,
             "json": json.dumps(sample.metadata(), ensure_ascii=False, sort_keys=True).encode("utf-8")}
    for i, frame in enumerate(sample.frames):
        entry[frame_member(i)] = frame
    if sample.mp4 is not None:
        entry["mp4"] = sample.mp4
    return entry


# The fixed fields of a member's USTAR header around its name and size, from the constants above.
_HEADER_MODE_IDS = b"%07o\0" % TAR_MODE + b"0000000\0" * 2  # mode, uid, gid
_HEADER_REST = (b"%011o\0" % TAR_MTIME + b" " * 8 + tarfile.REGTYPE + b"\0" * 100 + tarfile.POSIX_MAGIC
                + TAR_OWNER.encode().ljust(32, b"\0") * 2 + b"\0" * (16 + 155 + 12))


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) `tarfile` writes for a regular member `name` of `size` bytes (PAX format, mode
    `TAR_MODE`, `TAR_MTIME`, owner `TAR_OWNER`). A member's name is short and ASCII (`KEY.EXT`), so the block
    is a fixed template with name, size and checksum filled in (a part's tar takes about 40% of the CPU it took
    through a `tarfile.TarInfo` per member). Anything else (a long or non-ASCII name, a size past USTAR's
    8 GiB) takes `tarfile`'s own."""
    if len(name) > tarfile.LENGTH_NAME or not name.isascii() or size >= 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
        info.uname = info.gname = TAR_OWNER
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    block = bytearray(name.encode("ascii").ljust(tarfile.LENGTH_NAME, b"\0") + _HEADER_MODE_IDS
                      + b"%011o\0" % size + _HEADER_REST)
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def write_tar(f, samples: Iterable[ShardSample]) -> int:
    """`samples` as a WebDataset tar on the writable stream `f`: the bytes `webdataset.TarWriter(f,
    encoder=False, mtime=TAR_MTIME)` writes (members `KEY.EXT` in sorted order, mode 0444, owner bigdata), with
    the standard library only: importing webdataset imports torch, ~2 s in every Ray worker that commits.
    Returns where the members end (the end-of-archive blocks start): compaction copies that many bytes."""
    offset = 0
    for sample in samples:
        entry = to_wds(sample)
        key = entry.pop("__key__")
        for ext in sorted(entry):
            data = entry[ext]
            header = tar_header(f"{key}.{ext}", len(data))
            padding = -len(data) % tarfile.BLOCKSIZE
            f.write(header)
            f.write(data)
            f.write(b"\0" * padding)
            offset += len(header) + len(data) + padding
    end = offset + 2 * tarfile.BLOCKSIZE  # tarfile's close: two zero blocks, then zeros to a whole record
    f.write(b"\0" * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
    return offset


def sample_bytes(sample: ShardSample) -> int:
    return sum(len(f) for f in sample.frames) + len(sample.mp4 or b"")


def write_table(storage: Storage, rel: str, rows: list[dict], schema: pa.Schema) -> None:
    with storage.open_write(rel) as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)


def write_marker(storage: Storage, marker: PartMarker) -> None:
    storage.write_text(f"{SHARDS_DIR}/{marker.shard}{MARKER_SUFFIX}", marker.model_dump_json(indent=1))


class PartWriter:
    """Writes and commits one part per call. `signature_frames` > 0 stores each clip's frame hashes in the
    clips index (the dataset-wide dedup index is rebuilt from them on resume)."""

    def __init__(self, storage: Storage, signature_frames: int = 0, writer_node_id: str | None = None):
        self.storage = storage
        self.signature_frames = signature_frames
        self.writer_node_id = writer_node_id

    def _signature(self, sample: ShardSample) -> list[int] | None:
        if not self.signature_frames:
            return None
        from stages.dedup import clip_signature

        return clip_signature(sample.frames, self.signature_frames)

    def write(self, name: str, results: list[VideoResult], loose: list[Failure] = ()) -> PartMarker:
        """Commit `results` (whole videos, or clip batches of fanned-out videos) and `loose` failures (of no
        video) as part `name`. A fanned-out video counts in `num_videos` with its batch 0."""
        samples = [s for r in results for s in r.samples]
        members_end = None
        if samples:
            with self.storage.open_write(f"{SHARDS_DIR}/{name}.tar") as f:
                members_end = write_tar(f, samples)  # the storage commits the file after the archive is finished
        keyframes = {r.video_id: r.video.keyframe_times_s if r.video else None for r in results}
        rows = {"clips": [clip_row(s, name, self._signature(s), keyframes.get(s.clip.video_id)) for s in samples],
                "pairs": [row for s in samples for row in pair_rows(s, name)],
                "videos": [video_row(r, name, self.writer_node_id) for r in results]}
        for kind, schema in INDEX_FILES.items():
            write_table(self.storage, f"{SHARDS_DIR}/{name}.{kind}.parquet", rows[kind], schema)
        failures = [f for r in results for f in r.failures] + list(loose)
        write_table(self.storage, f"{FAILURES_DIR}/{name}.parquet", [failure_row(f, name) for f in failures],
                    FAILURE_SCHEMA)
        marker = PartMarker(
            shard=name, num_samples=len(samples), num_videos=sum(r.counts_as_video for r in results),
            num_failures=len(failures), num_pairs=len(rows["pairs"]), tar_bytes=sum(sample_bytes(s) for s in samples),
            failures_by_reason=dict(Counter(f.reason for f in failures)), committed_at=time.time(),
            video_ids=[r.video_id for r in results if r.batch is None], loose_failure_ids=[f.item_id for f in loose],
            batches=[(r.video_id, *r.batch) for r in results if r.batch is not None],
            tar_members_end=members_end, writer_node_id=self.writer_node_id)
        write_marker(self.storage, marker)
        log.debug("committed %s: %d clips, %d videos, %d failures", name, marker.num_samples, marker.num_videos,
                  marker.num_failures)
        return marker
