"""Frame sampling exactly as the HICom release (VideoLLaMA2 `frame_sample`, mode 'uniform') does it."""
from __future__ import annotations

import numpy as np


def release_frame_indices(total_frames: int, wanted: int) -> list[int]:
    """Indices of `wanted` frames out of `total_frames`: the middle of each of `wanted` equal segments.

    segment = (total - 1) / num; index_i = round(segment * (i + 0.5)). Repeats indices when the clip has
    fewer frames than requested, as the release does.
    """
    if total_frames <= 0:
        return []
    segment = float(total_frames - 1) / wanted
    mids = [(segment * i + segment * (i + 1)) / 2 for i in range(wanted)]
    return [int(v) for v in np.round(np.array(mids) + 1e-6).astype(int)]


def frames_in_span(frame_times_s: list[float], start_s: float, end_s: float) -> list[float]:
    """Presentation times of the frames inside the half-open span [start_s, end_s)."""
    eps = 1e-6
    return [t for t in frame_times_s if start_s - eps <= t < end_s - eps]
