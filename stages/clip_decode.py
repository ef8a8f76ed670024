"""Clip + decode: cut planned clips out of a source video with FFmpeg, sampling frames as the release does.

One FFmpeg process decodes the source once for a batch of clips (`clips_per_ffmpeg`): the decoded stream is
split per clip, trimmed, and sent both to an H.264 encoder (the clip mp4) and through a frame selector that
keeps the release's uniformly sampled frames, padded to square with the mean colour and resized (JPEG).
A clip that starts on a keyframe of an H.264 source small enough already is stream-copied instead.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ffmpeg

from schemas import reasons
from schemas.config import ClipConfig
from schemas.records import ClipRecord, Failure, ShardSample, Span, VideoRecord, VideoResult
from stages.ffmpeg_tools import SAFE_DEMUXERS, FfmpegError, FfmpegTimeout, ffmpeg_binary, run_tool
from stages.sampling import frames_in_span, release_frame_indices
from stages.scratch import FOLDER_PREFIX, disk_root, out_of_space, scratch_root, sweep_stale

log = logging.getLogger(__name__)
STAGE = "clip_decode"
RESOURCES = {"num_cpus": 1}
_SEEK_MARGIN_S = 1.0  # seek this far before the first clip so the accurate seek never drops its first frame
_STALE_MARGIN_S = 600.0  # a batch folder idle this long past a batch's timeout was a killed worker's
_EPS_S = 1e-3  # well under any frame interval: a keyframe at the clip start matches within this


@dataclass
class PlannedClip:
    """A clip with its exact frame plan, derived from the probe's frame timeline."""

    record: ClipRecord
    span: Span
    unique_indices: list[int]  # sorted distinct frame indices to decode
    copy_mp4: bool
    first_frame_s: float  # presentation time of the clip's first frame
    next_frame_s: float | None  # of the source's first frame after the clip (None: the clip runs to the end)


def plan_clip(video: VideoRecord, span: Span, cfg: ClipConfig) -> PlannedClip | None:
    probe = video.probe
    times = frames_in_span(probe.frame_times_s, span.start_s, span.end_s)
    if not times:
        return None
    indices = release_frame_indices(len(times), cfg.frames_per_clip)
    copy = (
        cfg.write_mp4 and cfg.stream_copy and probe.codec == "h264" and probe.rotation_deg == 0
        and max(probe.width, probe.height) <= cfg.mp4_max_side_px
        and any(abs(k - times[0]) < _EPS_S for k in probe.keyframe_times_s)
    )
    record = ClipRecord(
        id=ClipRecord.make_id(video.id, span.start_s, span.end_s),
        video_id=video.id,
        source=video.relpath,
        start_s=span.start_s,
        end_s=span.end_s,
        frame_times_s=[times[i] for i in indices],
        frame_indices=indices,
        frames_in_clip=len(times),
        frame_size_px=cfg.frame_size_px,
        mp4_stream_copied=copy,
        caption=span.caption,
    )
    after = [t for t in probe.frame_times_s if t > times[-1]]
    return PlannedClip(record=record, span=span, unique_indices=sorted(set(indices)), copy_mp4=copy,
                       first_frame_s=times[0], next_frame_s=after[0] if after else None)


def _input(source: str, seek_s: float, threads: int | None = None):
    """The source as a safe ffmpeg-python input (local file, whitelisted demuxers), seeked to `seek_s`."""
    options = {"protocol_whitelist": "file", "format_whitelist": SAFE_DEMUXERS, "ss": f"{seek_s:.6f}"}
    if threads is not None:
        options["threads"] = threads
    return ffmpeg.input(source, **options)


def _mp4_scale(stream, cfg: ClipConfig):
    side = cfg.mp4_max_side_px
    return stream.filter("scale", w=f"if(gte(iw,ih),trunc(min({side},iw)/2)*2,-2)",
                         h=f"if(gte(iw,ih),-2,trunc(min({side},ih)/2)*2)").filter("setsar", 1)


def _frames_chain(stream, clip: PlannedClip, cfg: ClipConfig):
    select = "+".join(f"eq(n,{i})" for i in clip.unique_indices)
    color = "0x{:02X}{:02X}{:02X}".format(*cfg.pad_rgb)
    size = cfg.frame_size_px
    return (stream.filter("select", select)
            .filter("pad", w="max(iw,ih)", h="max(iw,ih)", x="(ow-iw)/2", y="(oh-ih)/2", color=color)
            # JPEG (JFIF) is full-range BT.601: convert from the source's tagged matrix and range, which format
            # negotiation alone ignores (BT.709 sources came out shifted). Untagged sources read as BT.601.
            .filter("scale", size, size, flags="bicubic", in_color_matrix="auto", in_range="auto",
                    out_color_matrix="bt601", out_range="pc")
            .filter("setsar", 1)
            .filter("format", "yuvj420p"))


def batch_command(source: str, clips: list[PlannedClip], cfg: ClipConfig, workdir: Path) -> list[str]:
    """One FFmpeg command that decodes `source` once and writes every clip of the batch.

    Built with ffmpeg-python's graph builder (labels, escaping) and run by our own `run_tool`.
    """
    seek = max(0.0, clips[0].span.start_s - _SEEK_MARGIN_S)
    branches = _input(source, seek, cfg.ffmpeg_threads)["v:0"].filter_multi_output("split", len(clips))
    outputs = []
    for i, clip in enumerate(clips):
        # Trim on exact frame times: trim rounds to the stream's time base, so a bound between two frames
        # of a coarse time base (AVI: 1/25 s) could catch the neighbouring frame.
        bounds = {"start": f"{max(clip.first_frame_s - seek, 0.0):.6f}"}
        if clip.next_frame_s is not None:
            bounds["end"] = f"{clip.next_frame_s - seek:.6f}"
        trimmed = branches.stream(i).filter("trim", **bounds).filter("setpts", "PTS-STARTPTS")
        if cfg.write_mp4 and not clip.copy_mp4:
            both = trimmed.filter_multi_output("split", 2)
            outputs.append(ffmpeg.output(
                _mp4_scale(both.stream(0), cfg), str(workdir / f"{i}.mp4"),
                **{"c:v": "libx264", "threads": cfg.ffmpeg_threads, "preset": cfg.mp4_preset, "crf": cfg.mp4_crf,
                   "pix_fmt": "yuv420p", "an": None, "movflags": "+faststart",
                   "fps_mode": "passthrough"}))  # the source's frame times, as in the index (VFR, gaps)
            trimmed = both.stream(1)
        outputs.append(ffmpeg.output(_frames_chain(trimmed, clip, cfg), str(workdir / f"{i}_%03d.jpg"),
                                     **{"fps_mode": "passthrough", "q:v": cfg.jpeg_qscale}))
    graph = ffmpeg.merge_outputs(*outputs).global_args(
        "-hide_banner", "-nostdin", "-v", "error", "-filter_complex_threads", str(cfg.ffmpeg_threads))
    return graph.compile(cmd=ffmpeg_binary())


def copy_command(source: str, clip: PlannedClip, out: Path) -> list[str]:
    """Stream copy of one clip (it starts on a keyframe and needs no resize)."""
    duration = clip.span.end_s - clip.span.start_s
    return (ffmpeg.output(_input(source, clip.span.start_s)["v:0"], str(out),
                          **{"t": f"{duration:.6f}", "frames:v": clip.record.frames_in_clip, "c": "copy",
                             "an": None, "movflags": "+faststart", "avoid_negative_ts": "make_zero"})
            .global_args("-hide_banner", "-nostdin", "-v", "error")
            .compile(cmd=ffmpeg_binary()))


def _collect(clip: PlannedClip, index: int, workdir: Path) -> tuple[list[bytes], int]:
    """Frames in the clip's sampling order (repeats included) and how many had to be padded."""
    decoded = [p.read_bytes() for p in sorted(workdir.glob(f"{index}_*.jpg"))]
    if not decoded:
        return [], 0
    by_index = {idx: decoded[min(pos, len(decoded) - 1)] for pos, idx in enumerate(clip.unique_indices)}
    padded = max(0, len(clip.unique_indices) - len(decoded))
    return [by_index[i] for i in clip.record.frame_indices], padded


def mp4_size(width: int, height: int, cfg: ClipConfig, copied: bool) -> tuple[int, int]:
    """The encoded clip's size, computed the way FFmpeg's scale filter resolves the expressions above."""
    if copied:
        return width, height
    side = cfg.mp4_max_side_px
    # FFmpeg's scale takes a dimension that evaluates to 0 as the input's (a 2000x2 source gives 384x2).
    if width >= height:
        w = min(side, width) // 2 * 2
        return w, int(height * w / (width * 2) + 0.5) * 2 or height
    h = min(side, height) // 2 * 2
    return int(width * h / (height * 2) + 0.5) * 2 or width, h


def decode_batch(video: VideoRecord, clips: list[PlannedClip], cfg: ClipConfig,
                 scratch_dir: str | None) -> tuple[list[ShardSample], list[Failure]]:
    """Cut one batch in a fresh folder of the scratch root; a batch that fills a memory root is cut again on disk."""
    root = scratch_root(scratch_dir)
    sweep_stale(root, cfg.timeout_s * cfg.clips_per_ffmpeg + _STALE_MARGIN_S)
    try:
        return _decode_batch_in(root, video, clips, cfg)
    except FfmpegError as exc:
        if not (out_of_space(exc.stderr) and scratch_dir is None and root != disk_root()):
            return [], _batch_failures(video, clips, exc)
        log.warning("%s is full: cutting %s's batch again in %s", root, video.relpath, disk_root())
    try:
        return _decode_batch_in(disk_root(), video, clips, cfg)
    except FfmpegError as exc:
        return [], _batch_failures(video, clips, exc)


def _batch_failures(video: VideoRecord, clips: list[PlannedClip], exc: FfmpegError) -> list[Failure]:
    reason = reasons.FFMPEG_TIMEOUT if isinstance(exc, FfmpegTimeout) else reasons.FFMPEG_FAILED
    return [failure for clip in clips for failure in _clip_failures(video, clip, reason, str(exc))]


def _clip_failures(video: VideoRecord, clip: PlannedClip, reason: str, detail: str) -> list[Failure]:
    ids = [s.id for s in clip.span.samples] or [clip.record.id]
    return [Failure(item_id=i, video_id=video.id, stage=STAGE, reason=reason, detail=detail, source=video.relpath)
            for i in ids]


def _write(args: list[str], timeout_s: float) -> None:
    stderr = run_tool(args, timeout_s).stderr
    if out_of_space(stderr):  # exited 0, but an output may be cut short
        raise FfmpegError("FFmpeg's output folder ran out of space", stderr)


def _decode_batch_in(root: str, video: VideoRecord, clips: list[PlannedClip], cfg: ClipConfig
                     ) -> tuple[list[ShardSample], list[Failure]]:
    """The batch's samples, or a Failure per clip FFmpeg returned no frames for; raises FfmpegError."""
    samples: list[ShardSample] = []
    failures: list[Failure] = []
    with tempfile.TemporaryDirectory(prefix=FOLDER_PREFIX, dir=root) as tmp:
        workdir = Path(tmp)
        _write(batch_command(video.source, clips, cfg, workdir), cfg.timeout_s * len(clips))
        for i, clip in enumerate(clips):
            if clip.copy_mp4:
                _write(copy_command(video.source, clip, workdir / f"{i}.mp4"), cfg.timeout_s)
        for i, clip in enumerate(clips):
            frames, padded = _collect(clip, i, workdir)
            if not frames:
                failures += _clip_failures(video, clip, reasons.NO_FRAMES, "FFmpeg returned no frames for this clip")
                continue
            mp4_path = workdir / f"{i}.mp4"
            mp4 = mp4_path.read_bytes() if cfg.write_mp4 and mp4_path.exists() else None
            width, height = mp4_size(video.probe.width, video.probe.height, cfg, clip.copy_mp4) if mp4 else (
                None, None)
            record = clip.record.model_copy(update={
                "frames_padded": padded,
                "frames_bytes": sum(len(f) for f in frames),
                "mp4_bytes": len(mp4 or b""),
                "mp4_width": width,
                "mp4_height": height,
            })
            samples.append(ShardSample(clip=record, frames=frames, mp4=mp4, samples=list(clip.span.samples)))
    return samples, failures


def clip_and_decode(video: VideoRecord, spans: list[Span], cfg: ClipConfig,
                    scratch_dir: str | None = None) -> tuple[list[ShardSample], list[Failure]]:
    """The stage: one ShardSample per planned clip (pairs are attached later) or a Failure per clip."""
    samples: list[ShardSample] = []
    failures: list[Failure] = []
    planned: list[PlannedClip] = []
    for i, span in enumerate(sorted(spans, key=lambda s: (s.start_s, s.end_s))):
        clip = plan_clip(video, span, cfg)
        if clip is None:
            ids = [s.id for s in span.samples] or [f"{video.id}#span{i}"]
            failures.extend(Failure(item_id=item, video_id=video.id, stage=STAGE, reason=reasons.NO_FRAMES,
                                    detail=f"no frame in [{span.start_s}, {span.end_s})", source=video.relpath)
                            for item in ids)
            continue
        planned.append(clip)
    seen: set[str] = set()
    unique = []
    for clip in planned:  # two spans with the same bounds are one clip; their samples merge
        if clip.record.id in seen:
            first = next(c for c in unique if c.record.id == clip.record.id)
            first.span = first.span.model_copy(update={"samples": [*first.span.samples, *clip.span.samples]})
            continue
        seen.add(clip.record.id)
        unique.append(clip)
    for start in range(0, len(unique), cfg.clips_per_ffmpeg):
        batch_samples, batch_failures = decode_batch(video, unique[start:start + cfg.clips_per_ffmpeg], cfg,
                                                     scratch_dir or cfg.scratch_dir)
        samples += batch_samples
        failures += batch_failures
    return samples, failures


def apply(result: VideoResult, cfg: ClipConfig) -> VideoResult:
    """Record-level step: cut and decode the planned clips."""
    samples, failures = clip_and_decode(result.video, result.planned, cfg)
    result.samples += samples
    result.failures += failures
    result.failed = not samples
    return result
