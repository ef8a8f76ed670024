"""Fan out: a video with many planned clips becomes clip batches that decode on several workers at once.

After split, a video whose plan holds more than `clip.clips_per_task` clips is cut into
n = ceil(clips / clips_per_task) contiguous batches of its planned spans. Each batch is its own row
(`VideoResult.batch = (i, n)`) that runs clip+decode on any worker and commits as its own part, so a 2 h
source no longer holds one worker (and ~450 MB of samples) for minutes, and a kill loses only the batches in
flight. The video's failures so far (split, duplicate spans) travel with batch 0 only: each is committed once.
On resume, the batches the markers already hold are not emitted again; a partly committed video keeps the
batch count its markers recorded, so its batches are cut exactly as before (split is deterministic).
"""
from __future__ import annotations

import math

from schemas.records import VideoResult

STAGE = "fan_out"


def fan_out(result: VideoResult, clips_per_task: int,
            done: dict[str, tuple[int, set[int]]] | None = None) -> list[VideoResult]:
    """`result` as its clip batches still to do (itself when it needs no fan-out). `done`: video id ->
    (batch count, indexes committed), from `pipeline.resume.CommittedState.partial`."""
    count, committed = (done or {}).get(result.video_id, (None, set()))
    if result.failed or result.video is None or (count is None and len(result.planned) <= clips_per_task):
        return [result]
    n = count or math.ceil(len(result.planned) / clips_per_task)
    size = math.ceil(len(result.planned) / n)
    return [result.model_copy(update={"planned": result.planned[i * size:(i + 1) * size], "batch": (i, n),
                                      "failures": list(result.failures) if i == 0 else []})
            for i in range(n) if i not in committed]
