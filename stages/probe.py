"""Probe: ffprobe a source video, reject what cannot or should not be decoded, record its frame timeline.

Frame presentation times come from the demuxer's packet timestamps (no decoding), so clip frame counts and
sampled frame times are exact for variable frame rate sources too.
"""
from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

from schemas import reasons
from schemas.config import ProbeConfig
from schemas.records import Failure, ProbeInfo, VideoRecord, VideoResult
from stages.ffmpeg_tools import SAFE_INPUT_ARGS, FfmpegError, FfmpegTimeout, ffprobe_binary, run_tool

log = logging.getLogger(__name__)
STAGE = "probe"
RESOURCES = {"num_cpus": 1}
_IMAGE_FORMATS = ("_pipe", "image2")


class ProbeRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _rate(text: str | None) -> float:
    try:
        value = Fraction(text or "0/1")
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(value) if value > 0 else 0.0


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return int(side["rotation"]) % 360
    return int(float(stream.get("tags", {}).get("rotate", 0))) % 360


_CONTAINER_MAGIC = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # ISO-BMFF box types at offset 4
_OTHER_MAGIC = (b"\x1a\x45\xdf\xa3", b"RIFF", b"FLV", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"OggS")


def looks_like_video_container(head: bytes) -> bool:
    """Whether the first bytes carry a known video container signature (used to tell a truncated
    video from a file that never was one, since FFmpeg picks the demuxer from the extension)."""
    mpeg_ts = head[:1] == b"\x47" and head[188:189] == b"\x47"  # sync byte every 188 bytes
    return head[4:8] in _CONTAINER_MAGIC or head.startswith(_OTHER_MAGIC) or mpeg_ts


def _classify_ffprobe_error(stderr: str, head: bytes) -> str:
    text = stderr.lower()
    if "not on whitelist" in text:
        return reasons.FORBIDDEN_REFERENCE
    if not looks_like_video_container(head):
        return reasons.NOT_A_VIDEO
    if "moov atom not found" in text or "end of file" in text:
        return reasons.TRUNCATED
    if "invalid data found" in text or "unknown format" in text:
        return reasons.NOT_A_VIDEO
    return reasons.UNDECODABLE


def _ffprobe_json(path: str, cfg: ProbeConfig) -> dict:
    args = [ffprobe_binary(), "-v", "error", *SAFE_INPUT_ARGS, "-show_format", "-show_streams",
            "-of", "json", path]
    try:
        out = run_tool(args, cfg.timeout_s)
    except FfmpegTimeout as exc:
        raise ProbeRejected(reasons.PROBE_TIMEOUT, str(exc)) from None
    except FfmpegError as exc:
        with open(path, "rb") as f:
            head = f.read(256)
        raise ProbeRejected(_classify_ffprobe_error(exc.stderr, head), str(exc)) from None
    return json.loads(out.stdout.decode("utf-8", "replace") or "{}")


def _packet_times(path: str, cfg: ProbeConfig) -> tuple[list[float], list[float]]:
    """Sorted presentation times of the first video stream's packets, and those of keyframes."""
    args = [ffprobe_binary(), "-v", "error", *SAFE_INPUT_ARGS, "-select_streams", "v:0",
            "-show_entries", "packet=pts_time,flags", "-of", "csv=p=0", path]
    try:
        out = run_tool(args, cfg.timeout_s)
    except FfmpegTimeout as exc:
        raise ProbeRejected(reasons.PROBE_TIMEOUT, str(exc)) from None
    except FfmpegError as exc:
        raise ProbeRejected(reasons.UNDECODABLE, str(exc)) from None
    times, keys = [], []
    for line in out.stdout.decode("utf-8", "replace").splitlines():
        pts, _, flags = line.partition(",")
        try:
            t = float(pts)
        except ValueError:
            continue  # N/A: no timestamp on this packet
        times.append(t)
        if flags.startswith("K"):
            keys.append(t)
    return sorted(times), sorted(keys)


def probe_info(path: str, size_bytes: int, cfg: ProbeConfig) -> ProbeInfo:
    """ffprobe `path` and apply the limits; raise ProbeRejected(reason, detail) on rejection."""
    if size_bytes == 0:
        raise ProbeRejected(reasons.EMPTY_FILE, "file is empty (0 bytes)")
    if size_bytes > cfg.max_file_bytes:
        raise ProbeRejected(reasons.FILE_TOO_LARGE, f"{size_bytes} bytes > limit {cfg.max_file_bytes}")
    meta = _ffprobe_json(path, cfg)
    fmt = meta.get("format", {})
    streams = meta.get("streams", [])
    videos = [s for s in streams
              if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    if not streams:
        if fmt.get("duration") not in (None, "N/A") and float(fmt["duration"]) == 0.0:
            raise ProbeRejected(reasons.ZERO_DURATION, "an empty container: no streams, zero duration")
        raise ProbeRejected(reasons.TRUNCATED, "the container declares no streams (corrupt header)")
    if not videos:
        kinds = sorted({s.get("codec_type", "?") for s in streams}) or ["none"]
        raise ProbeRejected(reasons.NO_VIDEO_STREAM, f"no video stream (streams: {', '.join(kinds)})")
    video = videos[0]
    format_name = fmt.get("format_name", "")
    if any(format_name.endswith(suffix) for suffix in _IMAGE_FORMATS):
        raise ProbeRejected(reasons.STILL_IMAGE, f"a still image ({format_name}), not a video")
    rotation = _rotation(video)
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    if rotation in (90, 270):
        width, height = height, width
    if width <= 0 or height <= 0:
        raise ProbeRejected(reasons.UNDECODABLE, "video stream has no frame size")
    if max(width, height) > cfg.max_side_px:
        raise ProbeRejected(reasons.TOO_LARGE_FRAME, f"{width}x{height} > max side {cfg.max_side_px}px")
    declared = float(fmt.get("duration") or video.get("duration") or 0.0)
    if declared > cfg.max_duration_s:
        raise ProbeRejected(reasons.TOO_LONG, f"{declared:.1f}s > limit {cfg.max_duration_s:.0f}s")

    start = float(fmt.get("start_time") or 0.0)
    times, keys = _packet_times(path, cfg)
    times = [t - start for t in times]
    keys = [t - start for t in keys]
    fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
    if not times:
        raise ProbeRejected(reasons.ZERO_DURATION, "the video stream has no frames")
    if fps <= 0:
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 25.0
    covered = times[-1] + 1.0 / fps  # what the frames really cover: a truncated file claims more
    duration = min(declared, covered) if declared > 0 else covered
    if duration <= cfg.min_duration_s:
        raise ProbeRejected(reasons.ZERO_DURATION, f"duration {duration:.3f}s")
    return ProbeInfo(
        duration_s=round(duration, 6),
        declared_duration_s=declared,
        fps=round(fps, 6),
        width=width,
        height=height,
        codec=str(video.get("codec_name", "")),
        pix_fmt=video.get("pix_fmt"),
        rotation_deg=rotation,
        has_audio=any(s.get("codec_type") == "audio" for s in streams),
        format_name=format_name,
        bit_rate=int(fmt["bit_rate"]) if str(fmt.get("bit_rate", "")).isdigit() else None,
        total_frames=len(times),
        frame_times_s=[round(t, 6) for t in times],
        keyframe_times_s=[round(t, 6) for t in keys],
    )


def probe_video(video: VideoRecord, cfg: ProbeConfig) -> VideoRecord | Failure:
    """The stage: the video with `probe` filled, or a Failure with a reason code."""
    try:
        size = Path(video.source).stat().st_size
        info = probe_info(video.source, size, cfg)
    except ProbeRejected as exc:
        return Failure(item_id=video.id, video_id=video.id, stage=STAGE, reason=exc.reason,
                       detail=exc.detail, source=video.relpath)
    except OSError as exc:
        return Failure(item_id=video.id, video_id=video.id, stage=STAGE, reason=reasons.UNREADABLE,
                       detail=str(exc), source=video.relpath)
    return video.model_copy(update={"probe": info})


def apply(result: VideoResult, cfg: ProbeConfig) -> VideoResult:
    """Record-level step for the pipeline: probe the result's video or fail it."""
    out = probe_video(result.video, cfg)
    if isinstance(out, Failure):
        return result.fail_video(STAGE, out.reason, out.detail)
    result.video = out
    return result
