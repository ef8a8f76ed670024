"""Split: decide the clips of a probed video: FFmpeg scene cuts, fixed windows, or given spans.

Clips are half-open time ranges [start_s, end_s) on the video's own timeline (0 = first frame).
"""
from __future__ import annotations

import bisect
import logging
import math
import os
import re
from dataclasses import dataclass, field

from schemas import reasons
from schemas.config import SplitConfig
from schemas.records import Failure, Span, VideoRecord, VideoResult
from stages.ffmpeg_tools import SAFE_INPUT_ARGS, FfmpegError, FfmpegTimeout, ffmpeg_binary, run_tool

log = logging.getLogger(__name__)
STAGE = "split"
RESOURCES = {"num_cpus": 1}
_PTS_TIME = re.compile(r"pts_time:\s*([-0-9.]+)")
_SCENE_DETECT_WIDTH_PX = 320  # scene scores barely change with size; decoding small is much cheaper
_SPAN_END_TOLERANCE_S = 0.5  # manifests round times and containers disagree by a frame: clamp within this


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
                   frame_times: list[float], start_s: float = 0.0) -> list[tuple[float, float]]:
    """Shot boundaries inside [start_s, duration) -> clips: drop shots under min length, cut long ones into
    pieces <= max length."""
    bounds = [start_s, *[c for c in cuts if start_s < c < duration], duration]
    clips = []
    for start, end in zip(bounds, bounds[1:]):
        if end - start < cfg.min_clip_s:
            continue
        pieces = even_pieces(start, end, cfg.max_clip_s)
        cuts_in_shot = [start] + [snap_to_frames(a, frame_times) for a, _ in pieces[1:]] + [end]
        clips.extend(zip(cuts_in_shot, cuts_in_shot[1:]))
    return [(a, b) for a, b in clips if b - a >= min(cfg.min_clip_s, cfg.max_clip_s) - 1e-6]


def fixed_windows(duration: float, cfg: SplitConfig, start_s: float = 0.0) -> list[tuple[float, float]]:
    """Windows of `window_s` every `stride_s` inside [start_s, duration)."""
    clips = []
    start = start_s
    while start + cfg.min_clip_s <= duration + 1e-9 and start < duration:
        clips.append((start, min(start + cfg.window_s, duration)))
        start += cfg.stride_s
    return clips


@dataclass
class CheckedSpans:
    """Spans that can be cut (end set, inside the video), each with the item ids it answers for, and the rest
    as (item ids, reason, detail)."""

    spans: list[Span] = field(default_factory=list)
    items: list[list[str]] = field(default_factory=list)
    invalid: list[tuple[list[str], str, str]] = field(default_factory=list)


def span_items(video: VideoRecord, index: int) -> list[str]:
    """What a span's failure rows are keyed by: its annotation samples, else its input row as ingest keys it
    (`m.csv:7`, or `m.csv:7.2` for the third span of a Panda-70M row), else its position."""
    span = video.spans[index]
    if span.samples:
        return [s.id for s in span.samples]
    return [span.item_id or f"{video.id}#span{index}"]


def check_spans(video: VideoRecord, duration: float) -> CheckedSpans:
    """Validate the given spans against the video; no spans means the whole video (failures keyed by it)."""
    out = CheckedSpans()
    if not video.spans:
        out.spans.append(Span(start_s=0.0, end_s=duration))
        out.items.append([video.id])
        return out
    seen: dict[tuple, str] = {}
    for i, span in enumerate(video.spans):
        items = span_items(video, i)
        where = f"span [{span.start_s}, {span.end_s}]"
        if span.start_s < 0:
            out.invalid.append((items, reasons.SPAN_NEGATIVE, f"{where} starts before 0"))
        elif span.end_s is not None and span.end_s <= span.start_s:
            out.invalid.append((items, reasons.SPAN_END_BEFORE_START, f"{where} ends at or before its start"))
        elif span.start_s >= duration or (span.end_s or 0.0) > duration + _SPAN_END_TOLERANCE_S:
            out.invalid.append((items, reasons.SPAN_OUT_OF_RANGE, f"{where} outside the video's {duration:.3f}s"))
        elif not span.samples and (key := (span.start_s, span.end_s)) in seen:
            out.invalid.append((items, reasons.DUPLICATE_SPAN, f"{where} repeats {seen[key]}"))
        else:
            if not span.samples:
                seen[(span.start_s, span.end_s)] = items[0]
            end = duration if span.end_s is None else min(span.end_s, duration)
            out.spans.append(span.model_copy(update={"end_s": end}))
            out.items.append(items)
    return out


def content_detector_cuts(source: str, cfg: SplitConfig, frame_times: list[float]) -> list[float]:
    """Shot starts by PySceneDetect's ContentDetector (the paper's splitter), snapped to real frame times.

    OpenCV decodes here, not our FFmpeg runner: FFmpeg inside OpenCV is restricted to local files by
    `OPENCV_FFMPEG_CAPTURE_OPTIONS`, and only files the probe accepted reach this stage.
    """
    os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "protocol_whitelist;file")
    from scenedetect import ContentDetector, detect

    detector = ContentDetector(threshold=cfg.content_threshold, min_scene_len=1)
    scenes = detect(source, detector, backend="opencv")
    return sorted(snap_to_frames(float(start.seconds), frame_times) for start, _ in scenes[1:])


def detect_cuts(video: VideoRecord, cfg: SplitConfig) -> list[float]:
    """Shot starts by the configured detector (raises FfmpegError/FfmpegTimeout on an FFmpeg failure)."""
    if cfg.detector == "pyscenedetect":
        return content_detector_cuts(video.source, cfg, video.probe.frame_times_s)
    return scene_cut_times(video.source, cfg)


def split_video(video: VideoRecord, cfg: SplitConfig) -> tuple[list[Span], list[Failure]]:
    """The stage: planned clips (spans with both ends set) and failures for spans that cannot be cut.

    With manifest spans, `scene`/`fixed` split *inside* each span and each clip carries its span's caption;
    every span ends as clips or as a failure row keyed by its manifest row.
    """
    duration = video.probe.duration_s
    failures: list[Failure] = []

    def fail(item_id: str, reason: str, detail: str) -> None:
        failures.append(Failure(item_id=item_id, video_id=video.id, stage=STAGE, reason=reason,
                                detail=detail, source=video.relpath))

    checked = check_spans(video, duration)
    for items, reason, detail in checked.invalid:
        for item in items:
            fail(item, reason, detail)
    if cfg.mode == "given":
        return checked.spans, failures
    try:
        cuts = detect_cuts(video, cfg) if cfg.mode == "scene" else []
    except FfmpegTimeout as exc:
        fail(video.id, reasons.FFMPEG_TIMEOUT, str(exc))
        return [], failures
    except FfmpegError as exc:
        fail(video.id, reasons.FFMPEG_FAILED, str(exc))
        return [], failures
    planned, seen = [], {}
    for span, items in zip(checked.spans, checked.items):
        if cfg.mode == "scene":
            ranges = shots_to_clips(cuts, span.end_s, cfg, video.probe.frame_times_s, span.start_s)
        else:
            ranges = fixed_windows(span.end_s, cfg, span.start_s)
        ranges = [(round(a, 6), round(b, 6)) for a, b in ranges]
        if not ranges:
            for item in items:
                fail(item, reasons.NO_CLIPS, f"no clip of at least {cfg.min_clip_s}s in span "
                     f"[{span.start_s}, {span.end_s}) ({cfg.mode} split)")
            continue
        for a, b in ranges:
            if (a, b) in seen:  # the same clip from two spans: the first keeps it, the second is reported
                fail(f"{items[0]}@{a:.3f}", reasons.DUPLICATE_SPAN, f"clip [{a}, {b}) already planned from "
                     f"{seen[(a, b)]}")
                continue
            seen[(a, b)] = items[0]
            planned.append(span.model_copy(update={"start_s": a, "end_s": b}))
    if not planned and not failures:
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
