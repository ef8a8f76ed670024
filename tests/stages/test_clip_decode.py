import io
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import ffmpeg, make_test_video
from schemas.config import ClipConfig, ProbeConfig
from schemas.records import Span, VideoRecord
from stages.clip_decode import clip_and_decode
from stages.probe import probe_info, probe_video
from stages.sampling import frames_in_span, release_frame_indices


def _probed(path):
    return probe_video(VideoRecord(id="vid", source=str(path), relpath=path.name), ProbeConfig())


def _image(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def _mp4_info(data: bytes, tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    return probe_info(str(path), len(data), ProbeConfig())


def test_frames_are_384_square_padded_with_mean_colour_and_uniformly_timed(sample_dir, tmp_path):
    video = _probed(sample_dir / "bigbuckbunny.mp4")
    samples, failures = clip_and_decode(video, [Span(start_s=1.0, end_s=4.0)], ClipConfig())
    assert failures == []
    (sample,) = samples
    assert len(sample.frames) == 32
    first = _image(sample.frames[0])
    assert first.shape == (384, 384, 3)
    # 16:9 padded to square: 384 * (1 - 9/16) / 2 = 84 rows of grey above and below
    assert np.abs(first[:70].mean(axis=(0, 1)) - 127).max() < 3
    assert np.abs(first[-70:].mean(axis=(0, 1)) - 127).max() < 3
    clip_times = frames_in_span(video.probe.frame_times_s, 1.0, 4.0)
    assert sample.clip.frames_in_clip == len(clip_times) == 75
    assert sample.clip.frame_indices == release_frame_indices(75, 32)
    assert sample.clip.frame_times_s == [clip_times[i] for i in release_frame_indices(75, 32)]
    info = _mp4_info(sample.mp4, tmp_path)
    assert (info.width, info.height) == (sample.clip.mp4_width, sample.clip.mp4_height) == (384, 216)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)


def test_sampled_frames_are_the_planned_source_frames(tmp_path):
    """Match every output frame against all decoded source frames: the best match is the planned one."""
    src = make_test_video(tmp_path / "counter.mp4", seconds=3.0, size="160x160", fps=25)
    video = _probed(src)
    cfg = ClipConfig(frames_per_clip=6, frame_size_px=160, write_mp4=False)
    (sample,), _ = clip_and_decode(video, [Span(start_s=0.52, end_s=2.48)], cfg)
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(src), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    source = np.frombuffer(raw, np.uint8).reshape(-1, 160, 160, 3).astype(np.float32)
    assert len(source) == 75
    first_frame = 13  # 0.52 s at 25 fps
    expected = [first_frame + i for i in sample.clip.frame_indices]
    matched = [int(np.argmin(((source - _image(f)) ** 2).mean(axis=(1, 2, 3)))) for f in sample.frames]
    assert matched == expected


def test_stream_copy_when_start_is_a_keyframe_and_no_resize_needed(sample_dir, tmp_path):
    video = _probed(sample_dir / "carphone_pristine.mp4")
    (sample,), _ = clip_and_decode(video, [Span(start_s=0.0, end_s=2.0)], ClipConfig())
    assert sample.clip.mp4_stream_copied
    info = _mp4_info(sample.mp4, tmp_path)
    assert (info.width, info.height) == (176, 144)
    assert info.duration_s == pytest.approx(2.0, abs=0.1)


def test_odd_size_rotated_and_short_videos(tmp_path):
    odd = _probed(make_test_video(tmp_path / "odd.mp4", size="175x97", seconds=2.0))
    (sample,), _ = clip_and_decode(odd, [Span(start_s=0.0, end_s=2.0)], ClipConfig(frames_per_clip=4))
    assert (sample.clip.mp4_width % 2, sample.clip.mp4_height % 2) == (0, 0)
    assert _mp4_info(sample.mp4, tmp_path).width == sample.clip.mp4_width

    src = make_test_video(tmp_path / "land.mp4", size="320x240", seconds=2.0)
    ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(tmp_path / "rot.mp4"))
    rot = _probed(tmp_path / "rot.mp4")
    (sample,), _ = clip_and_decode(rot, [Span(start_s=0.0, end_s=2.0)], ClipConfig(frames_per_clip=2))
    frame = _image(sample.frames[0])
    # portrait after rotation: grey bars left and right, not top and bottom
    assert np.abs(frame[:, :40].mean(axis=(0, 1)) - 127).max() < 3
    assert np.abs(frame[:40, 150:230].mean(axis=(0, 1)) - 127).max() > 10
    assert (sample.clip.mp4_width, sample.clip.mp4_height) == (240, 320)  # never upscaled

    one = _probed(make_test_video(tmp_path / "one.mp4", seconds=0.04, fps=25))
    assert one.probe.total_frames == 1
    (sample,), _ = clip_and_decode(one, [Span(start_s=0.0, end_s=one.probe.duration_s)], ClipConfig(frames_per_clip=8))
    assert len(sample.frames) == 8 and len(set(sample.frames)) == 1


def test_many_clips_in_batches_keep_their_own_frames(scene_video):
    video = _probed(scene_video)
    spans = [Span(start_s=float(s), end_s=float(s) + 1.0) for s in range(8)]
    samples, failures = clip_and_decode(video, spans, ClipConfig(frames_per_clip=2, clips_per_ffmpeg=3, write_mp4=False))
    assert failures == [] and len(samples) == 8
    assert [s.clip.start_s for s in samples] == [float(s) for s in range(8)]
    # scenes: testsrc2 [0,3), mandelbrot [3,5), smptebars [5,8): frames differ across scene lines
    means = [_image(s.frames[0]).mean() for s in samples]
    assert abs(means[3] - means[2]) > 5 and abs(means[5] - means[4]) > 5


def test_output_is_byte_identical_across_runs(tmp_path):
    """Resume compares shards with an uninterrupted run: encoders must be deterministic (x264 is, per thread count)."""
    video = _probed(make_test_video(tmp_path / "det.mp4", seconds=3.0, size="288x144"))
    spans = [Span(start_s=float(s), end_s=float(s) + 1.0) for s in range(3)]
    runs = [clip_and_decode(video, spans, ClipConfig(frames_per_clip=4))[0] for _ in range(3)]
    for samples in runs[1:]:
        assert [(s.mp4, s.frames) for s in samples] == [(s.mp4, s.frames) for s in runs[0]]


def _mp4_times(sample, tmp_path) -> list[float]:
    info = _mp4_info(sample.mp4, tmp_path)
    return info.frame_times_s


def _source_frame_times(video, sample) -> list[float]:
    """The index's view of the clip: every source frame in it, relative to its first frame."""
    times = frames_in_span(video.probe.frame_times_s, sample.clip.start_s, sample.clip.end_s)
    return [round(t - times[0], 3) for t in times]


@pytest.mark.parametrize("kind", ["vfr_mp4", "avi_with_gap"])
def test_clip_mp4_keeps_source_frame_count_and_times(tmp_path, kind):
    """The mp4 holds exactly the index's frames at their source times (no CFR duplicates or drops)."""
    if kind == "vfr_mp4":  # 25 frames at 40 ms, then 20 frames at ~100 ms
        src = tmp_path / "vfr.mp4"
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=3", "-vf",
               "settb=1/1000,setpts='if(lt(N,25),N*40,1000+(N-25)*100)'", "-fps_mode", "passthrough",
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-frames:v", "45", str(src))
    else:  # frames 40-44 missing: a 0.2 s timestamp gap in a 1/25 s time base
        src = tmp_path / "gap.avi"
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=4", "-vf",
               "select='not(between(n,40,44))'", "-fps_mode", "passthrough", "-c:v", "mpeg4", "-q:v", "5", str(src))
    video = _probed(src)
    span = Span(start_s=0.5, end_s=video.probe.duration_s)
    (sample,), failures = clip_and_decode(video, [span], ClipConfig(frames_per_clip=8, stream_copy=False))
    assert failures == []
    expected = _source_frame_times(video, sample)
    got = [round(t, 3) for t in _mp4_times(sample, tmp_path)]
    assert len(got) == sample.clip.frames_in_clip == len(expected)
    assert got == pytest.approx(expected, abs=0.002)
    first = expected and frames_in_span(video.probe.frame_times_s, span.start_s, span.end_s)[0]
    assert [got[i] + first for i in sample.clip.frame_indices] == pytest.approx(sample.clip.frame_times_s, abs=0.002)


RGB = (32, 192, 64)


@pytest.mark.parametrize("matrix,range_,pix_fmt,tag", [
    ("bt601", "tv", "yuv420p", "smpte170m"),
    ("bt709", "tv", "yuv420p", "bt709"),
    ("bt709", "pc", "yuvj420p", "bt709"),
    ("bt601", "pc", "yuvj420p", "bt470bg"),
])
def test_frames_use_the_sources_colour_matrix_and_range(tmp_path, matrix, range_, pix_fmt, tag):
    """A solid colour encoded with an explicit matrix/range comes back as the same RGB in the JPEG frames."""
    src = tmp_path / f"{matrix}_{range_}.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=0x{:02X}{:02X}{:02X}:size=64x48:rate=25:duration=1,format=rgb24".format(*RGB),
           "-vf", f"scale=out_color_matrix={matrix}:out_range={range_},format={pix_fmt}", "-colorspace", tag,
           "-color_range", range_, "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", str(src))
    (sample,), _ = clip_and_decode(_probed(src), [Span(start_s=0.0, end_s=1.0)],
                                   ClipConfig(frames_per_clip=2, frame_size_px=64, write_mp4=False))
    centre = _image(sample.frames[0])[24:40, 16:48].mean(axis=(0, 1))
    assert np.abs(centre - RGB).max() < 5, centre


def test_non_square_pixels_are_padded_as_coded_like_decord(tmp_path):
    """decord (the release's loader) returns coded frames and ignores the sample aspect ratio: so do we.
    A 128x96 source with SAR 128:117 is padded as 128x96 (48 grey rows of 384 top and bottom), not as its
    140x96 display size (57 rows)."""
    src = make_test_video(tmp_path / "sar.mp4", size="128x96", seconds=1.0, extra=("-vf", "setsar=128/117"))
    video = _probed(src)
    (sample,), _ = clip_and_decode(video, [Span(start_s=0.0, end_s=1.0)], ClipConfig(frames_per_clip=2))
    frame = _image(sample.frames[0])
    grey = np.abs(frame - 127).max(axis=(1, 2)) < 12
    assert grey[:36].all() and grey[-36:].all()  # (JPEG ringing blurs the few rows next to the edge)
    assert not grey[52:332].any()  # rows 48-57 would still be padding if the SAR were applied
    assert (sample.clip.mp4_width, sample.clip.mp4_height) == (128, 96)


def test_mp4_size_in_the_index_for_a_two_pixel_high_source(tmp_path):
    src = make_test_video(tmp_path / "thin.mp4", size="2000x2", seconds=1.0)
    (sample,), _ = clip_and_decode(_probed(src), [Span(start_s=0.0, end_s=1.0)],
                                   ClipConfig(frames_per_clip=2, stream_copy=False))
    info = _mp4_info(sample.mp4, tmp_path)
    assert (sample.clip.mp4_width, sample.clip.mp4_height) == (info.width, info.height) == (384, 2)
