"""The thin layer between record-level stages and Ray Data rows.

A row is one video's state: `{"video_id": str, "state": bytes}` where `state` is a pickled `VideoResult`.
Keeping a video in one row keeps its clips together, so a video is committed whole or not at all.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Callable

from schemas import reasons
from schemas.records import VideoResult

log = logging.getLogger(__name__)


def to_row(result: VideoResult) -> dict:
    return {"video_id": result.video_id, "state": pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)}


def from_row(row: dict) -> VideoResult:
    return pickle.loads(row["state"])


class RayStage:
    """A `Dataset.map` callable running one record-level stage; an exception fails the video, not the run."""

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
        result.node_id = _current_node_id()  # the last stage that ran wins: clip_decode does the work
        return to_row(result)


def _current_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
