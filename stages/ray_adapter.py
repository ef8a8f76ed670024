"""The thin layer between record-level stages and Ray rows, and the stage that commits parts.

A row is one video's state: `{"video_id": str, "state": bytes}` where `state` is a pickled `VideoResult`.
Keeping a video in one row keeps its clips together, so a video is committed whole or not at all; a long
video fanned out into clip batches is one row per batch, each committed whole (`stages/fan_out.py`).
`CommitStage`, the last stage, turns a group of finished rows into one committed part on the run's storage
and returns only a small receipt (`stages/ray_tasks.commit_rows`): sample bytes never reach the driver.
"""
from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Callable

import pyarrow as pa

from schemas import caption_reasons, reasons
from schemas.index import PartReceipt
from schemas.records import VideoResult
from stages.shard import PartWriter, part_name_for
from stages.storage import Storage

log = logging.getLogger(__name__)


def to_row(result: VideoResult) -> dict:
    return {"video_id": result.video_id, "state": pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)}


def from_row(row: dict) -> VideoResult:
    return pickle.loads(row["state"])


def replace_state(batch: pa.Table, results: list[VideoResult]) -> pa.Table:
    """A `map_batches` output: `batch` with each row's `state` replaced by `results` (in row order); other
    columns (a shard part name) pass through."""
    states = pa.array([to_row(r)["state"] for r in results], pa.binary())
    return batch.set_column(batch.schema.get_field_index("state"), "state", states)


class RayStage:
    """A callable on one row running one record-level stage; an exception fails the video, not the run."""

    def __init__(self, name: str, step: Callable[..., VideoResult], *args):
        self.name = name
        self.step = step
        self.args = args

    def run(self, result: VideoResult) -> VideoResult:
        if result.failed:
            return result
        try:
            return self.step(result, *self.args)
        except Exception as exc:  # the record boundary: one bad video never fails a run
            log.exception("%s failed on %s", self.name, result.video_id)
            return result.fail_video(self.name, reasons.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    def __call__(self, row: dict) -> dict:
        result = self.run(from_row(row))
        result.node_id = current_node_id()  # the last stage that ran wins: clip_decode does the work
        return to_row(result)


def current_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def deferred(result: VideoResult) -> bool:
    """Whether an LLM endpoint was away for this video: it is not committed, a rerun finishes it."""
    return any(f.reason in caption_reasons.RETRY_LATER for f in result.failures)


def stop_reason(result: VideoResult) -> str | None:
    """The detail of a failure that must stop the run (an endpoint rejected the request), or None: such a
    video is never committed, so the rerun with the right settings does its work."""
    return next((f.detail for f in result.failures if f.reason in caption_reasons.STOP_RUN), None)


class CommitStage:
    """Commit a group of finished rows as part `part-<hash of their ids>` (the same name on a retry or rerun,
    so a retried task rewrites the same part) and return its receipt. A row is a video, a clip batch of a
    fanned-out video (`stages/fan_out.py`), or an input that failed at ingest (no video: committed as a loose
    failure, so ingest failures are exactly-once like everything else)."""

    def __init__(self, run_uri: str, signature_frames: int = 0):
        self.storage = Storage.from_uri(run_uri)
        self.signature_frames = signature_frames

    def commit(self, results: list[VideoResult]) -> PartReceipt:
        stops = [reason for r in results if (reason := stop_reason(r))]
        later = [r.video_id for r in results if deferred(r) and not stop_reason(r)]
        done = [r for r in results if not deferred(r) and not stop_reason(r)]
        node = current_node_id()
        receipt = PartReceipt(deferred=later, writer_node_id=node, stop_reason=stops[0] if stops else None)
        if not done:
            return receipt
        videos = [r for r in done if r.video is not None or r.batch is not None]
        loose = [f for r in done if r.video is None and r.batch is None for f in r.failures]  # ingest failures
        name = part_name_for(r.commit_id for r in done)
        try:
            marker = PartWriter(self.storage, self.signature_frames, node).write(name, videos, loose)
        except OSError as exc:  # nothing of this part is visible; the driver stops the run cleanly
            log.error("cannot commit %s: %s", name, exc)
            return receipt.model_copy(update={"storage_error": f"{type(exc).__name__}: {exc}"})
        return receipt.model_copy(update={
            "part": name, "num_videos": marker.num_videos, "num_clips": marker.num_samples,
            "num_pairs": marker.num_pairs, "num_failures": marker.num_failures, "num_loose_failures": len(loose),
            "failed_by_stage": dict(Counter(f.stage for r in done for f in r.failures))})
