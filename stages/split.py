"""Split: decide the clips of a probed video: FFmpeg scene cuts, fixed windows, or given spans.

Clips are half-open time ranges [start_s, end_s) on the video's own timeline (0 = first frame).
"""
from __future__ import annotations

import bisect
import logging
import math
import re

from schemas import reasons
from schemas.config import SplitConfig
from schemas.records import Failure, Span, VideoRecord, VideoResult
from stages.ffmpeg_tools import SAFE_INPUT_ARGS, FfmpegError, FfmpegTimeout, ffmpeg_binary, run_tool

log = logging.getLogger(__name__)
STAGE = "split"
RESOURCES = {"num_cpus": 1}
_PTS_TIME = re.compile(r"pts_time:\s*([-0-9.]+)")
_SCENE_DETECT_WIDTH_PX = 320  # scene scores barely change with size; decoding small is much cheaper


def scene_cut_times(source: str, cfg: SplitConfig) -> list[float]:
    """Times of frames whose FFmpeg scene score exceeds the threshold (shot starts)."""
    graph = f"scale={_SCENE_DETECT_WIDTH_PX}:-2,select='gt(scene,{cfg.scene_threshold})',showinfo"
    args = [ffmpeg_binary(), "-hide_banner", "-nostdin", *SAFE_INPUT_ARGS, "-i", source,
            "-map", "0:v:0", "-vf", graph, "-an", "-f", "null", "-"]
    out = run_tool(args, cfg.timeout_s)
    times = []
    for line in out.stderr.splitlines():
        match = _PTS_TIME.search(line) if "showinfo" in line else None
        if match:
            times.append(float(match.group(1)))
    return sorted(times)


def even_pieces(start: float, end: float, max_len: float) -> list[tuple[float, float]]:
    """Cut [start, end) into the fewest equal pieces no longer than max_len."""
    count = max(1, math.ceil((end - start) / max_len - 1e-9))
    step = (end - start) / count
    return [(start + i * step, start + (i + 1) * step if i < count - 1 else end) for i in range(count)]


def snap_to_frames(t: float, frame_times: list[float]) -> float:
    """The first frame time at or after t (clips start on real frames); t itself past the last frame."""
    i = bisect.bisect_left(frame_times, t - 1e-6)
    return frame_times[i] if i < len(frame_times) else t


def shots_to_clips(cuts: list[float], duration: float, cfg: SplitConfig,
                   frame_times: list[float]) -> list[tuple[float, float]]:
    """Shot boundaries -> clips: drop shots under min length, cut long ones into pieces <= max length."""
    bounds = [0.0, *[c for c in cuts if 0.0 < c < duration], duration]
    clips = []
    for start, end in zip(bounds, bounds[1:]):
        if end - start < cfg.min_clip_s:
            continue
        pieces = even_pieces(start, end, cfg.max_clip_s)
        cuts_in_shot = [start] + [snap_to_frames(a, frame_times) for a, _ in pieces[1:]] + [end]
        clips.extend(zip(cuts_in_shot, cuts_in_shot[1:]))
    return [(a, b) for a, b in clips if b - a >= min(cfg.min_clip_s, cfg.max_clip_s) - 1e-6]


def fixed_windows(duration: float, cfg: SplitConfig) -> list[tuple[float, float]]:
    clips = []
    start = 0.0
    while start + cfg.min_clip_s <= duration + 1e-9:
        clips.append((start, min(start + cfg.window_s, duration)))
        start += cfg.stride_s
    return clips


def split_video(video: VideoRecord, cfg: SplitConfig) -> tuple[list[Span], list[Failure]]:
    """The stage: planned clips (spans with both ends set) and failures for spans that cannot be cut."""
    probe = video.probe
    duration = probe.duration_s
    failures: list[Failure] = []

    def fail(item_id: str, reason: str, detail: str) -> None:
        failures.append(Failure(item_id=item_id, video_id=video.id, stage=STAGE, reason=reason,
                                detail=detail, source=video.relpath))

    if cfg.mode == "given":
        spans = video.spans or [Span(start_s=0.0, end_s=None)]
        planned = []
        for i, span in enumerate(spans):
            end = duration if span.end_s is None else min(span.end_s, duration)
            if span.start_s < 0 or end - span.start_s <= 0:
                for item in [s.id for s in span.samples] or [f"{video.id}#span{i}"]:
                    fail(item, reasons.SPAN_OUT_OF_RANGE,
                         f"span [{span.start_s}, {span.end_s}] outside the video's {duration:.3f}s")
                continue
            planned.append(span.model_copy(update={"end_s": end}))
        return planned, failures

    if cfg.mode == "scene":
        try:
            cuts = scene_cut_times(video.source, cfg)
        except FfmpegTimeout as exc:
            fail(video.id, reasons.FFMPEG_TIMEOUT, str(exc))
            return [], failures
        except FfmpegError as exc:
            fail(video.id, reasons.FFMPEG_FAILED, str(exc))
            return [], failures
        ranges = shots_to_clips(cuts, duration, cfg, probe.frame_times_s)
    else:
        ranges = fixed_windows(duration, cfg)
    # Source captions on a whole-video span travel to every clip cut from it.
    caption = next((s.caption for s in video.spans if s.caption), None)
    planned = [Span(start_s=round(a, 6), end_s=round(b, 6), caption=caption) for a, b in ranges]
    if not planned:
        fail(video.id, reasons.NO_CLIPS,
             f"no clip of at least {cfg.min_clip_s}s in {duration:.3f}s ({cfg.mode} split)")
    return planned, failures


def apply(result: VideoResult, cfg: SplitConfig) -> VideoResult:
    """Record-level step: plan the clips; a video-level failure fails the whole video."""
    planned, failures = split_video(result.video, cfg)
    result.planned = planned
    for failure in failures:
        if failure.item_id == result.video_id:
            result.fail_video(STAGE, failure.reason, failure.detail)
        else:
            result.failures.append(failure)
    if not planned:
        result.failed = True
    return result
