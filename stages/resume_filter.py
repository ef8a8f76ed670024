"""Skip committed inputs in the workers: the first stage after the input listing drops the rows the run's
markers already commit, so a resumed build neither re-probes nor re-hashes them and the driver never holds
the input list.

The committed ids (from `pipeline.resume.scan_and_clean`) arrive as two sorted string arrays: video ids, and
item ids of loose ingest failures. A row is looked up by binary search on its `video_id` column (no per-task
hash table over a possibly huge id set); only rows that match one of the arrays are unpickled, to tell a
video row (skipped when its video is committed) from an ingest-failure row (skipped when its item is).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages.ray_adapter import from_row

STAGE = "skip_committed"
RESOURCES = {"num_cpus": 0.25}  # a binary search per row: must not hold a core FFmpeg could use


def sorted_ids(ids) -> np.ndarray:
    return np.array(sorted(ids), dtype=str)


def _member(ids: np.ndarray, committed: np.ndarray) -> np.ndarray:
    if not len(committed) or not len(ids):
        return np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(committed, ids), len(committed) - 1)
    return committed[pos] == ids


def skip_committed(batch: pa.Table, videos: np.ndarray, loose: np.ndarray) -> pa.Table:
    """`map_batches` function over input rows `{"video_id", "state"}`: the rows not committed yet."""
    ids = np.array(batch.column("video_id").to_pylist(), dtype=str)
    in_videos, in_loose = _member(ids, videos), _member(ids, loose)
    keep = ~(in_videos | in_loose)
    states = batch.column("state")
    for i in np.flatnonzero(~keep):
        failure_row = from_row({"state": states[i].as_py()}).video is None
        keep[i] = not (in_loose[i] if failure_row else in_videos[i])
    return batch if keep.all() else batch.filter(pa.array(keep))
