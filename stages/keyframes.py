"""Keyframes: keep only clips that contain a keyframe of their source video (ShareGPT4Video's way).

Frames are sampled densely (`sample_fps`, at most `max_frames` per video) by one FFmpeg process, embedded
with the image-text model, and walked in time order: a frame becomes a keyframe when its cosine similarity
to the previous keyframe is below `max_similarity` (the first frame always is). A planned clip with no
keyframe inside adds nothing new: it is a failure row `redundant_clip`. Keyframe times go to `videos`.
"""
from __future__ import annotations

import logging

import numpy as np

from schemas import reasons
from schemas.recipe import EmbedderConfig, KeyframeConfig
from schemas.records import ClipRecord, Failure, VideoResult
from stages.ffmpeg_tools import SAFE_INPUT_ARGS, FfmpegError, FfmpegTimeout, ffmpeg_binary, run_tool

log = logging.getLogger(__name__)
STAGE = "keyframes"
RESOURCES = {"num_cpus": 1}


def sample_frames(source: str, duration_s: float, fps: float, size_px: int, max_frames: int,
                  timeout_s: float) -> tuple[np.ndarray, list[float]]:
    """RGB frames (N, size, size, 3) at `fps` (lowered so N <= max_frames) and their times in seconds.

    Frames are squashed to a square, as SigLIP's processor resizes without cropping.
    """
    rate = min(fps, max_frames / max(duration_s, 1e-3))
    args = [ffmpeg_binary(), "-hide_banner", "-nostdin", "-v", "error", *SAFE_INPUT_ARGS, "-i", source,
            "-map", "0:v:0", "-vf", f"fps={rate:.6f}:round=down,scale={size_px}:{size_px}:flags=bilinear",
            "-frames:v", str(max_frames), "-an", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    out = run_tool(args, timeout_s).stdout
    count = len(out) // (size_px * size_px * 3)
    frames = np.frombuffer(out[: count * size_px * size_px * 3], np.uint8).reshape(count, size_px, size_px, 3)
    return frames, [round(i / rate, 6) for i in range(count)]


def frames_or_fail(result: VideoResult, stage: str, fps: float, size_px: int, max_frames: int,
                   timeout_s: float) -> tuple[np.ndarray | None, list[float]]:
    """`sample_frames` of the result's video, or (None, []) after failing the video with the reason."""
    video = result.video
    try:
        frames, times = sample_frames(video.source, video.probe.duration_s, fps, size_px, max_frames, timeout_s)
    except FfmpegTimeout as exc:
        result.fail_video(stage, reasons.FFMPEG_TIMEOUT, str(exc))
        return None, []
    except FfmpegError as exc:
        result.fail_video(stage, reasons.FFMPEG_FAILED, str(exc))
        return None, []
    if len(frames) == 0:
        result.fail_video(stage, reasons.NO_EMBEDDING, "FFmpeg decoded no frame to embed")
        return None, []
    return frames, times


def select_keyframes(embeddings: np.ndarray, max_similarity: float) -> list[int]:
    """Indices of keyframes: the first frame, then each frame less similar than `max_similarity` to the last
    keyframe. `embeddings` are unit vectors in time order."""
    if len(embeddings) == 0:
        return []
    keep = [0]
    for i in range(1, len(embeddings)):
        if float(embeddings[i] @ embeddings[keep[-1]]) < max_similarity:
            keep.append(i)
    return keep


def keyframes_in(start_s: float, end_s: float, keyframe_times: list[float]) -> int:
    """How many keyframes fall in the half-open clip [start_s, end_s)."""
    return sum(start_s - 1e-6 <= t < end_s - 1e-6 for t in keyframe_times)


def apply(result: VideoResult, cfg: KeyframeConfig, embedder_cfg: EmbedderConfig) -> VideoResult:
    """Find the video's keyframes and drop planned clips without one."""
    if not result.planned:
        return result
    from stages.embedder import load_embedder  # torch loads in the workers that embed, not in the build's driver

    video = result.video
    embedder = load_embedder(embedder_cfg)
    frames, times = frames_or_fail(result, STAGE, cfg.sample_fps, embedder.image_size_px, cfg.max_frames,
                                   cfg.timeout_s)
    if frames is None:
        return result
    keyframe_times = [times[i] for i in select_keyframes(embedder.embed_images(frames), cfg.max_similarity)]
    video.keyframe_times_s = keyframe_times
    kept = []
    for span in result.planned:
        if keyframes_in(span.start_s, span.end_s, keyframe_times):
            kept.append(span)
            continue
        for item in [s.id for s in span.samples] or [ClipRecord.make_id(video.id, span.start_s, span.end_s)]:
            result.failures.append(Failure(
                item_id=item, video_id=video.id, stage=STAGE, reason=reasons.REDUNDANT_CLIP, source=result.source,
                detail=f"no keyframe in [{span.start_s}, {span.end_s}) ({len(keyframe_times)} keyframes of "
                       f"{len(frames)} frames at max similarity {cfg.max_similarity})"))
    log.debug("%s: %d keyframes of %d frames, %d/%d clips kept", video.id, len(keyframe_times), len(frames),
              len(kept), len(result.planned))
    result.planned = kept
    if not kept:
        result.failed = True
    return result
