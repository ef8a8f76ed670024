"""What the build's Ray tasks and actors run (the driver side is `pipeline/scheduler.py`).

Every object that moves between them is a row `{"video_id", "state"}` (`stages/ray_adapter.py`) in Ray's object
store; the driver passes their ObjectRefs along and never fetches one.

- `run_video`: one input row (row `index` of a listed block) through probe .. split (.. recipe), then either
  the clip stages too, or, for a video whose plan fans out, its clip batches as rows for `run_batch`.
- `StageActor` / `call_stage`: a captioning or dedup stage over a few rows, one object per row back.
- `commit_rows`: the rows as one committed part (`CommitStage`); only the receipt goes back.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import pyarrow as pa

from schemas.index import PartReceipt
from stages.fan_out import fan_out
from stages.ray_adapter import CommitStage, RayStage, from_row, to_row


@dataclass
class VideoPlan:
    """The record stages of one video, as `pipeline.build.stage_pipeline` gives them (put in the object store
    once per build; every video task reads the same copy)."""

    before: list[RayStage]
    after: list[RayStage]  # empty: nothing fans out (the clip stages are in `before`)
    clips_per_task: int
    partial: dict[str, tuple[int, set[int]]] = field(default_factory=dict)  # CommittedState.partial


def row_at(block, index: int) -> dict:
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_arrow().slice(index, 1).to_pylist()[0]


def _through(stages: list[RayStage], row: dict) -> dict:
    for stage in stages:
        row = stage(row)
    return row


def run_video(plan: VideoPlan, block, index: int) -> tuple[tuple[bool, int], dict | list[dict]]:
    """((finished, rows), payload): a finished row, or the video's clip batches still to do (`rows` of them)."""
    row = _through(plan.before, row_at(block, index))
    if not plan.after:
        return (True, 1), row
    batches = fan_out(from_row(row), plan.clips_per_task, plan.partial)
    if len(batches) == 1:  # a short video (or one batch left): its clips are cut in this task
        return (True, 1), _through(plan.after, to_row(batches[0]))
    return (False, len(batches)), [to_row(b) for b in batches]


def run_batch(plan: VideoPlan, batches: list[dict], index: int) -> dict:
    return _through(plan.after, batches[index])


def _rows_table(rows: tuple[dict, ...]) -> pa.Table:
    return pa.table({"video_id": pa.array([r["video_id"] for r in rows], pa.string()),
                     "state": pa.array([r["state"] for r in rows], pa.binary())})


def _one_object_per_row(table: pa.Table) -> dict | tuple[dict, ...]:
    rows = tuple(table.select(["video_id", "state"]).to_pylist())
    return rows[0] if len(rows) == 1 else rows


def call_stage(fn, fn_kwargs: dict, *rows: dict) -> dict | tuple[dict, ...]:
    """A stage given as a `map_batches` function, over `rows` (a task with `num_returns=len(rows)`)."""
    return _one_object_per_row(fn(_rows_table(rows), **fn_kwargs))


class StageActor:
    """A stage given as a `map_batches` class (an LLM stage: async, so one actor has several calls in flight)."""

    def __init__(self, stage_class: type, kwargs: dict):
        self.stage = stage_class(**kwargs)

    async def run(self, *rows: dict) -> dict | tuple[dict, ...]:
        out = self.stage(_rows_table(rows))
        if inspect.isawaitable(out):
            out = await out
        return _one_object_per_row(out)


def commit_rows(run_uri: str, signature_frames: int, *rows: dict) -> PartReceipt:
    return CommitStage(run_uri, signature_frames).commit([from_row(r) for r in rows])
