"""The run directory's index: parquet schemas of the per-part index files, their rows, the part marker and
the receipt a worker returns after committing a part.

Read by `pipeline/stats.py` (DuckDB views), `hicom caption` and the compactor; written by `stages/shard.py`.
"""
from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.records import Failure, ShardSample, VideoRecord, VideoResult

CLIP_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("video_id", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("duration_s", pa.float64()),
    ("frames_stored", pa.int32()),  # frames in the shard sample (clip.frames_per_clip)
    ("frames_in_clip", pa.int32()),  # frames of the source inside the clip's span
    ("frames_padded", pa.int32()),
    ("frame_size_px", pa.int32()), ("mp4_width", pa.int32()), ("mp4_height", pa.int32()),
    ("mp4_bytes", pa.int64()), ("frames_bytes", pa.int64()), ("mp4_stream_copied", pa.bool_()),
    ("num_samples", pa.int32()), ("num_pairs", pa.int32()), ("has_caption", pa.bool_()),
    # 64-bit dHash of a few frames: the dataset-wide near-duplicate index is rebuilt from this on resume
    ("frame_dhash", pa.list_(pa.uint64())),
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
    ("writer_node_id", pa.string()),  # the Ray node whose worker wrote and committed the part
    # the recipe's keyframe and category stages (null when they did not run)
    ("keyframe_times_s", pa.list_(pa.float64())), ("category", pa.string()), ("category_score", pa.float64()),
    # a video fanned out into clip batches has one row per batch (null when not fanned out); the stats
    # `videos` view merges them into one row per video
    ("batch_index", pa.int32()), ("num_batches", pa.int32()),
])
FAILURE_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("video_id", pa.string()), ("shard", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string()),
])


def clip_row(sample: ShardSample, shard: str, frame_dhash: list[int] | None = None,
             keyframe_times_s: list[float] | None = None) -> dict:
    c = sample.clip
    keyframes = None if keyframe_times_s is None else sum(c.start_s - 1e-6 <= t < c.end_s - 1e-6
                                                          for t in keyframe_times_s)
    return {"clip_id": c.id, "video_id": c.video_id, "shard": shard, "source": c.source,
            "start_s": c.start_s, "end_s": c.end_s, "duration_s": c.duration_s, "frames_stored": len(sample.frames),
            "frames_in_clip": c.frames_in_clip, "frames_padded": c.frames_padded,
            "frame_size_px": c.frame_size_px, "mp4_width": c.mp4_width, "mp4_height": c.mp4_height,
            "mp4_bytes": c.mp4_bytes, "frames_bytes": c.frames_bytes, "mp4_stream_copied": c.mp4_stream_copied,
            "num_samples": len(sample.samples), "num_pairs": len(sample.pairs), "has_caption": bool(c.caption),
            "frame_dhash": frame_dhash, "keyframes_in_clip": keyframes}


def pair_rows(sample: ShardSample, shard: str) -> list[dict]:
    return [{"clip_id": sample.clip.id, "video_id": sample.clip.video_id, "shard": shard,
             "sample_id": p.sample_id, "turn": p.turn, "kind": p.kind, "source": p.source,
             "instruction": p.instruction, "answer": p.answer, "instruction_chars": len(p.instruction),
             "answer_chars": len(p.answer), "prompt_version": p.prompt_version, "model": p.model,
             "scores": list(p.scores.items())} for p in sample.pairs]


def video_row(result: VideoResult, shard: str, writer_node_id: str | None = None) -> dict:
    video: VideoRecord | None = result.video
    probe = video.probe if video else None
    return {"video_id": result.video_id, "shard": shard, "source": result.source,
            "sha256": video.sha256 if video else None, "size_bytes": video.size_bytes if video else None,
            "status": "ok" if result.samples else "failed", "num_clips": len(result.samples),
            "num_failures": len(result.failures), "duration_s": probe.duration_s if probe else None,
            "fps": probe.fps if probe else None, "width": probe.width if probe else None,
            "height": probe.height if probe else None, "codec": probe.codec if probe else None,
            "rotation_deg": probe.rotation_deg if probe else None, "has_audio": probe.has_audio if probe else None,
            "node_id": result.node_id, "writer_node_id": writer_node_id,
            "keyframe_times_s": video.keyframe_times_s if video else None,
            "category": video.category if video else None, "category_score": video.category_score if video else None,
            "batch_index": result.batch[0] if result.batch else None,
            "num_batches": result.batch[1] if result.batch else None}


def failure_row(failure: Failure, shard: str) -> dict:
    return {**failure.model_dump(include={"item_id", "video_id", "stage", "reason", "detail", "source"}),
            "shard": shard}


class PartMarker(BaseModel):
    """`shards/<part>.stats.json`, written last: a part exists iff its marker exists. Counts, the ids it
    commits, which node wrote it, and (for a compacted shard) the parts it replaces."""

    model_config = ConfigDict(extra="ignore")
    shard: str
    num_samples: int = 0
    num_videos: int = 0
    num_failures: int = 0
    num_pairs: int = 0
    tar_bytes: int = 0
    tar_members_end: int | None = None  # tar offset where the end-of-archive blocks start (None: no tar, or older)
    failures_by_reason: dict[str, int] = Field(default_factory=dict)
    committed_at: float = 0.0
    video_ids: list[str] = Field(default_factory=list)
    loose_failure_ids: list[str] = Field(default_factory=list)  # failures of no video (ingest)
    # clip batches of fanned-out videos: (video id, batch index, batch count); such a video is not in
    # `video_ids`: it is committed once markers hold all of its batches
    batches: list[tuple[str, int, int]] = Field(default_factory=list)
    writer_node_id: str | None = None
    replaces: list[str] = Field(default_factory=list)  # compaction: the parts this shard supersedes


class PartReceipt(BaseModel):
    """What a worker returns to the driver after committing a part: names and counts, never sample bytes."""

    part: str | None = None  # None when every video of the batch was deferred
    num_videos: int = 0
    num_clips: int = 0
    num_pairs: int = 0
    num_failures: int = 0
    num_loose_failures: int = 0  # of `num_failures`: inputs that failed at ingest (no video)
    failed_by_stage: dict[str, int] = Field(default_factory=dict)
    deferred: list[str] = Field(default_factory=list)  # video ids not committed: an LLM endpoint was away
    writer_node_id: str | None = None
    storage_error: str | None = None  # the part could not be written (disk full, store away): nothing committed
    stop_reason: str | None = None  # an endpoint rejected a request (401/403/404): those videos not committed
