import pytest

from conftest import ffmpeg, make_bad_inputs, make_test_video
from schemas import reasons
from schemas.config import ProbeConfig
from schemas.records import Failure, VideoRecord
from stages.probe import ProbeRejected, probe_info, probe_video

EXPECTED = {
    "empty": reasons.EMPTY_FILE,
    "truncated": reasons.TRUNCATED,
    "text": reasons.NOT_A_VIDEO,
    "audio_only": reasons.NO_VIDEO_STREAM,
    "image": reasons.STILL_IMAGE,
}


def _probe(path, cfg=None):
    return probe_info(str(path), path.stat().st_size, cfg or ProbeConfig())


def test_real_sample_video(sample_dir):
    info = _probe(sample_dir / "bigbuckbunny.mp4")
    assert (info.width, info.height, info.codec) == (1280, 720, "h264")
    assert info.has_audio
    assert info.duration_s == pytest.approx(5.28, abs=0.05)
    assert info.total_frames == len(info.frame_times_s) == 132
    assert info.frame_times_s == sorted(info.frame_times_s) and info.frame_times_s[0] == 0.0
    assert info.keyframe_times_s[0] == 0.0


def test_each_bad_input_has_its_own_reason(tmp_path):
    bad = make_bad_inputs(tmp_path)
    got = {}
    for name, expected in EXPECTED.items():
        with pytest.raises(ProbeRejected) as err:
            _probe(bad[name])
        got[name] = err.value.reason
    assert got == EXPECTED
    assert len(set(got.values())) == len(got)
    _probe(bad["good"])


def test_rotation_swaps_display_size(tmp_path):
    src = make_test_video(tmp_path / "src.mp4", size="320x240")
    ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(tmp_path / "rot.mp4"))
    info = _probe(tmp_path / "rot.mp4")
    assert info.rotation_deg in (90, 270)
    assert (info.width, info.height) == (240, 320)


def test_variable_frame_rate_times_come_from_packets(tmp_path):
    src = make_test_video(tmp_path / "cfr.mp4", seconds=2.0, fps=10)
    # keep frames 0-9 at 10 fps and then every 2nd frame: the second second has 5 frames
    ffmpeg("-i", str(src), "-vf", "select='lt(n,10)+not(mod(n,2))'", "-fps_mode", "vfr", "-c:v", "libx264",
           "-preset", "ultrafast", str(tmp_path / "vfr.mp4"))
    info = _probe(tmp_path / "vfr.mp4")
    assert info.total_frames == 15
    gaps = {round(b - a, 2) for a, b in zip(info.frame_times_s, info.frame_times_s[1:])}
    assert gaps == {0.1, 0.2}


def test_limits(tmp_path):
    video = make_test_video(tmp_path / "v.mp4", seconds=2.0, size="640x480")
    with pytest.raises(ProbeRejected) as err:
        _probe(video, ProbeConfig(max_side_px=320))
    assert err.value.reason == reasons.TOO_LARGE_FRAME
    with pytest.raises(ProbeRejected) as err:
        _probe(video, ProbeConfig(max_duration_s=1.0))
    assert err.value.reason == reasons.TOO_LONG
    with pytest.raises(ProbeRejected) as err:
        _probe(video, ProbeConfig(max_file_bytes=10))
    assert err.value.reason == reasons.FILE_TOO_LARGE


def test_probe_video_returns_failure_record(tmp_path):
    (tmp_path / "e.mp4").write_bytes(b"")
    video = VideoRecord(id="e", source=str(tmp_path / "e.mp4"), relpath="e.mp4")
    out = probe_video(video, ProbeConfig())
    assert isinstance(out, Failure) and out.reason == reasons.EMPTY_FILE and out.stage == "probe"
