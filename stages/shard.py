"""Shard: write WebDataset tars with an index parquet and stats beside each, committed atomically.

A part N is the set of files
    shards/shard-NNNNN.clips.parquet   one row per clip
    shards/shard-NNNNN.pairs.parquet   one row per instruction/answer pair
    shards/shard-NNNNN.videos.parquet  one row per source video committed in this part
    failures/shard-NNNNN.parquet       one row per failure
    shards/shard-NNNNN.stats.json      counts, reasons, and the ids this part commits
    shards/shard-NNNNN.tar             the samples (absent when the part holds only failures)
each written under a temporary name and renamed, in this order. The tar is renamed last, so a tar that
exists belongs to a complete part; a part is committed when its stats file exists and its tar too
(unless it holds no samples). Anything else is a leftover of a killed run and is removed on resume.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from schemas.config import ShardConfig
from schemas.records import Failure, ShardSample, VideoRecord, VideoResult

log = logging.getLogger(__name__)
STAGE = "shard"
SHARDS_DIR = "shards"
FAILURES_DIR = "failures"
TAR_MTIME = 0.0  # fixed so the same samples give byte-identical tars


def part_name(index: int) -> str:
    return f"shard-{index:05d}"


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


CLIP_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("video_id", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("duration_s", pa.float64()),
    ("num_frames", pa.int32()), ("num_clip_frames", pa.int32()), ("frames_padded", pa.int32()),
    ("frame_size_px", pa.int32()), ("mp4_width", pa.int32()), ("mp4_height", pa.int32()),
    ("mp4_bytes", pa.int64()), ("frames_bytes", pa.int64()), ("mp4_stream_copied", pa.bool_()),
    ("num_samples", pa.int32()), ("num_pairs", pa.int32()), ("has_caption", pa.bool_()),
    ("keyframes_in_clip", pa.int32()),  # recipe.keyframes: the keyframes that kept this clip; null: not run
])
PAIR_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("video_id", pa.string()), ("shard", pa.string()), ("sample_id", pa.string()),
    ("turn", pa.int32()), ("kind", pa.string()), ("source", pa.string()), ("instruction", pa.string()),
    ("answer", pa.string()), ("instruction_chars", pa.int32()), ("answer_chars", pa.int32()),
    ("prompt_version", pa.string()), ("model", pa.string()), ("scores", pa.map_(pa.string(), pa.float64())),
])
VIDEO_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("shard", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
    ("size_bytes", pa.int64()), ("status", pa.string()), ("num_clips", pa.int32()), ("num_failures", pa.int32()),
    ("duration_s", pa.float64()), ("fps", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("codec", pa.string()), ("rotation_deg", pa.int32()), ("has_audio", pa.bool_()), ("node_id", pa.string()),
    ("keyframe_times_s", pa.list_(pa.float64())), ("category", pa.string()), ("category_score", pa.float64()),
])
FAILURE_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("video_id", pa.string()), ("shard", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string()),
])


def clip_row(sample: ShardSample, shard: str, keyframe_times_s: list[float] | None = None) -> dict:
    c = sample.clip
    keyframes = None if keyframe_times_s is None else sum(c.start_s - 1e-6 <= t < c.end_s - 1e-6
                                                          for t in keyframe_times_s)
    return {"clip_id": c.id, "video_id": c.video_id, "shard": shard, "source": c.source,
            "start_s": c.start_s, "end_s": c.end_s, "duration_s": c.duration_s, "num_frames": len(sample.frames),
            "num_clip_frames": c.num_clip_frames, "frames_padded": c.frames_padded,
            "frame_size_px": c.frame_size_px, "mp4_width": c.mp4_width, "mp4_height": c.mp4_height,
            "mp4_bytes": c.mp4_bytes, "frames_bytes": c.frames_bytes, "mp4_stream_copied": c.mp4_stream_copied,
            "num_samples": len(sample.samples), "num_pairs": len(sample.pairs), "has_caption": bool(c.caption),
            "keyframes_in_clip": keyframes}


def pair_rows(sample: ShardSample, shard: str) -> list[dict]:
    return [{"clip_id": sample.clip.id, "video_id": sample.clip.video_id, "shard": shard,
             "sample_id": p.sample_id, "turn": p.turn, "kind": p.kind, "source": p.source,
             "instruction": p.instruction, "answer": p.answer, "instruction_chars": len(p.instruction),
             "answer_chars": len(p.answer), "prompt_version": p.prompt_version, "model": p.model,
             "scores": list(p.scores.items())} for p in sample.pairs]


def video_row(result: VideoResult, shard: str) -> dict:
    video: VideoRecord | None = result.video
    probe = video.probe if video else None
    return {"video_id": result.video_id, "shard": shard, "source": result.source,
            "sha256": video.sha256 if video else None, "size_bytes": video.size_bytes if video else None,
            "status": "ok" if result.samples else "failed", "num_clips": len(result.samples),
            "num_failures": len(result.failures), "duration_s": probe.duration_s if probe else None,
            "fps": probe.fps if probe else None, "width": probe.width if probe else None,
            "height": probe.height if probe else None, "codec": probe.codec if probe else None,
            "rotation_deg": probe.rotation_deg if probe else None, "has_audio": probe.has_audio if probe else None,
            "node_id": result.node_id, "keyframe_times_s": video.keyframe_times_s if video else None,
            "category": video.category if video else None, "category_score": video.category_score if video else None}


def failure_row(failure: Failure, shard: str) -> dict:
    return {**failure.model_dump(include={"item_id", "video_id", "stage", "reason", "detail", "source"}),
            "shard": shard}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    _write_atomic(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp))


@dataclass
class PartStats:
    index: int
    num_samples: int = 0
    num_videos: int = 0
    num_failures: int = 0
    num_pairs: int = 0
    tar_bytes: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)


def _sample_bytes(sample: ShardSample) -> int:
    return sum(len(f) for f in sample.frames) + len(sample.mp4 or b"")


class _OpenPart:
    """The part being written: samples stream into `shard-N.tar.tmp`; only index rows stay in memory."""

    def __init__(self, shards_dir: Path, index: int):
        self.index = index
        self.name = part_name(index)
        self.tar_tmp = shards_dir / f"{self.name}.tar.tmp"
        self.tar_file = None
        self.tar = None
        self.clips: list[dict] = []
        self.pairs: list[dict] = []
        self.videos: list[dict] = []
        self.failures: list[Failure] = []
        self.video_ids: list[str] = []
        self.loose_failure_ids: list[str] = []
        self.bytes = 0

    def write(self, result: VideoResult) -> None:
        if result.samples and self.tar is None:
            self.tar_file = open(self.tar_tmp, "wb", buffering=1 << 20)
            self.tar = wds.TarWriter(self.tar_file, encoder=False, mtime=TAR_MTIME)
        for sample in result.samples:
            self.tar.write(to_wds(sample))
            self.clips.append(clip_row(sample, self.name, result.video.keyframe_times_s if result.video else None))
            self.pairs.extend(pair_rows(sample, self.name))
            self.bytes += _sample_bytes(sample)
        self.videos.append(video_row(result, self.name))
        self.failures.extend(result.failures)
        self.video_ids.append(result.video_id)

    def close_tar(self) -> None:
        """Finish the archive and get every byte to disk (TarWriter leaves a passed-in file open)."""
        if self.tar is not None:
            tar, self.tar = self.tar, None
            tar.close()
        if self.tar_file is not None:
            tar_file, self.tar_file = self.tar_file, None
            try:
                tar_file.flush()
                os.fsync(tar_file.fileno())
            finally:
                tar_file.close()

    def discard(self) -> None:
        """Drop a part that could not be committed (e.g. disk full): nothing half-written stays."""
        try:
            self.close_tar()
        except OSError:
            pass
        self.tar_tmp.unlink(missing_ok=True)


class ShardWriter:
    """Commits whole videos into parts; shard limits are checked between videos, so a video is never split.

    Samples are streamed into the open part's tar as they arrive (memory stays bounded by one video);
    the part becomes visible only at `flush`, by renaming its files into place, the tar last.
    """

    def __init__(self, run_dir: Path, cfg: ShardConfig, next_index: int = 0):
        self.shards_dir = Path(run_dir) / SHARDS_DIR
        self.failures_dir = Path(run_dir) / FAILURES_DIR
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.failures_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.next_index = next_index
        self.part: _OpenPart | None = None
        self.committed: list[PartStats] = []

    def _open_part(self) -> _OpenPart:
        if self.part is None:
            self.part = _OpenPart(self.shards_dir, self.next_index)
            self.next_index += 1
        return self.part

    def add_failures(self, failures: list[Failure]) -> None:
        """Failures that belong to no video (ingest): committed with the next part."""
        part = self._open_part()
        part.failures.extend(failures)
        part.loose_failure_ids.extend(f.item_id for f in failures)

    def add(self, result: VideoResult) -> PartStats | None:
        """Write a video into the open part; returns the part committed first to make room, if any."""
        committed = None
        size = sum(_sample_bytes(s) for s in result.samples)
        if self.part is not None and self.part.clips and (
                len(self.part.clips) + len(result.samples) > self.cfg.max_samples
                or self.part.bytes + size > self.cfg.max_bytes):
            committed = self.flush()
        part = self._open_part()
        try:
            part.write(result)
        except BaseException:
            self._abort()
            raise
        return committed

    def _abort(self) -> None:
        if self.part is not None:
            self.part.discard()
            self.part = None

    def flush(self) -> PartStats | None:
        """Commit the open part (if it holds anything)."""
        part, self.part = self.part, None
        if part is None or not (part.video_ids or part.failures):
            if part is not None:
                part.discard()
            return None
        try:
            stats = self._commit(part)
        except BaseException:
            part.discard()
            raise
        self.committed.append(stats)
        return stats

    def _commit(self, part: _OpenPart) -> PartStats:
        name = part.name
        base = self.shards_dir / name
        part.close_tar()
        _write_parquet(base.with_name(f"{name}.clips.parquet"), part.clips, CLIP_SCHEMA)
        _write_parquet(base.with_name(f"{name}.pairs.parquet"), part.pairs, PAIR_SCHEMA)
        _write_parquet(base.with_name(f"{name}.videos.parquet"), part.videos, VIDEO_SCHEMA)
        _write_parquet(self.failures_dir / f"{name}.parquet", [failure_row(f, name) for f in part.failures],
                       FAILURE_SCHEMA)
        stats = PartStats(index=part.index, num_samples=len(part.clips), num_videos=len(part.videos),
                          num_failures=len(part.failures), num_pairs=len(part.pairs), tar_bytes=part.bytes,
                          failures_by_reason=dict(Counter(f.reason for f in part.failures)))
        record = {**stats.__dict__, "shard": name, "committed_at": time.time(), "video_ids": part.video_ids,
                  "loose_failure_ids": part.loose_failure_ids}
        _write_atomic(base.with_name(f"{name}.stats.json"),
                      lambda tmp: tmp.write_text(json.dumps(record, indent=1), encoding="utf-8"))
        if part.clips:
            os.replace(part.tar_tmp, base.with_name(f"{name}.tar"))
        log.info("committed %s: %d clips, %d videos, %d failures", name, stats.num_samples, stats.num_videos,
                 stats.num_failures)
        return stats
