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
])
FAILURE_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("video_id", pa.string()), ("shard", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string()),
])


def clip_row(sample: ShardSample, shard: str) -> dict:
    c = sample.clip
    return {"clip_id": c.id, "video_id": c.video_id, "shard": shard, "source": c.source,
            "start_s": c.start_s, "end_s": c.end_s, "duration_s": c.duration_s, "num_frames": len(sample.frames),
            "num_clip_frames": c.num_clip_frames, "frames_padded": c.frames_padded,
            "frame_size_px": c.frame_size_px, "mp4_width": c.mp4_width, "mp4_height": c.mp4_height,
            "mp4_bytes": c.mp4_bytes, "frames_bytes": c.frames_bytes, "mp4_stream_copied": c.mp4_stream_copied,
            "num_samples": len(sample.samples), "num_pairs": len(sample.pairs), "has_caption": bool(c.caption)}


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
            "node_id": result.node_id}


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
    tar_bytes: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class _Pending:
    results: list[VideoResult] = field(default_factory=list)
    loose_failures: list[Failure] = field(default_factory=list)  # failures with no video (ingest)
    samples: int = 0
    bytes: int = 0


class ShardWriter:
    """Buffers whole videos and commits them as parts; shard limits are checked between videos."""

    def __init__(self, run_dir: Path, cfg: ShardConfig, next_index: int = 0):
        self.shards_dir = Path(run_dir) / SHARDS_DIR
        self.failures_dir = Path(run_dir) / FAILURES_DIR
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.failures_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.next_index = next_index
        self.pending = _Pending()
        self.committed: list[PartStats] = []

    def add_failures(self, failures: list[Failure]) -> None:
        self.pending.loose_failures.extend(failures)

    def add(self, result: VideoResult) -> list[PartStats]:
        """Queue a video; returns the parts this committed (0 or 1)."""
        size = sum(len(f) for s in result.samples for f in s.frames) + sum(len(s.mp4 or b"") for s in result.samples)
        committed = []
        full = (self.pending.samples + len(result.samples) > self.cfg.max_samples
                or self.pending.bytes + size > self.cfg.max_bytes)
        if full and self.pending.samples:
            committed.append(self.flush())
        self.pending.results.append(result)
        self.pending.samples += len(result.samples)
        self.pending.bytes += size
        return [c for c in committed if c]

    def flush(self) -> PartStats | None:
        """Commit what is buffered as one part."""
        pending, self.pending = self.pending, _Pending()
        if not pending.results and not pending.loose_failures:
            return None
        index = self.next_index
        self.next_index += 1
        stats = self._commit(index, pending)
        self.committed.append(stats)
        return stats

    def _commit(self, index: int, pending: _Pending) -> PartStats:
        name = part_name(index)
        samples = [s for r in pending.results for s in r.samples]
        failures = [*pending.loose_failures, *(f for r in pending.results for f in r.failures)]
        base = self.shards_dir / name
        _write_parquet(base.with_name(f"{name}.clips.parquet"), [clip_row(s, name) for s in samples], CLIP_SCHEMA)
        _write_parquet(base.with_name(f"{name}.pairs.parquet"),
                       [row for s in samples for row in pair_rows(s, name)], PAIR_SCHEMA)
        _write_parquet(base.with_name(f"{name}.videos.parquet"),
                       [video_row(r, name) for r in pending.results], VIDEO_SCHEMA)
        _write_parquet(self.failures_dir / f"{name}.parquet", [failure_row(f, name) for f in failures],
                       FAILURE_SCHEMA)
        tar_bytes = sum(len(f) for s in samples for f in s.frames) + sum(len(s.mp4 or b"") for s in samples)
        stats = PartStats(index=index, num_samples=len(samples), num_videos=len(pending.results),
                          num_failures=len(failures), tar_bytes=tar_bytes,
                          failures_by_reason=dict(Counter(f.reason for f in failures)))
        record = {**stats.__dict__, "shard": name, "committed_at": time.time(),
                  "num_pairs": sum(len(s.pairs) for s in samples),
                  "video_ids": [r.video_id for r in pending.results],
                  "loose_failure_ids": [f.item_id for f in pending.loose_failures]}
        _write_atomic(base.with_name(f"{name}.stats.json"),
                      lambda tmp: tmp.write_text(json.dumps(record, indent=1), encoding="utf-8"))
        if samples:
            _write_atomic(base.with_name(f"{name}.tar"), lambda tmp: self._write_tar(tmp, samples))
        log.info("committed %s: %d clips, %d videos, %d failures", name, stats.num_samples, stats.num_videos,
                 stats.num_failures)
        return stats

    @staticmethod
    def _write_tar(path: Path, samples: list[ShardSample]) -> None:
        with open(path, "wb", buffering=1 << 20) as f:
            writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME)
            for sample in samples:
                writer.write(to_wds(sample))
            writer.close()
