import pytest

from schemas import reasons
from schemas.config import ProbeConfig, SplitConfig
from schemas.records import AnnotationSample, Span, Turn, VideoRecord, VideoResult
from stages import split
from stages.probe import probe_video
from stages.split import even_pieces, fixed_windows, scene_cut_times, shots_to_clips, split_video


def _probed(path):
    return probe_video(VideoRecord(id="v", source=str(path), relpath=path.name), ProbeConfig())


def test_scene_cuts_found_at_the_hard_cuts(scene_video):
    cuts = scene_cut_times(str(scene_video), SplitConfig())
    assert [round(c, 2) for c in cuts] == [3.0, 5.0]


def test_scene_split_drops_short_and_cuts_long_shots(scene_video):
    video = _probed(scene_video)
    spans, failures = split_video(video, SplitConfig(mode="scene", min_clip_s=1.0, max_clip_s=2.0))
    assert failures == []
    assert [(s.start_s, s.end_s) for s in spans] == [(0.0, 1.52), (1.52, 3.0), (3.0, 5.0), (5.0, 6.52), (6.52, 8.0)]


def test_shots_to_clips_units():
    cfg = SplitConfig(min_clip_s=1.0, max_clip_s=4.0)
    frames = [i / 10 for i in range(100)]
    assert shots_to_clips([0.5, 9.0], 10.0, cfg, frames) == [(0.5, 3.4), (3.4, 6.2), (6.2, 9.0), (9.0, 10.0)]
    assert even_pieces(0, 9, 4) == [(0, 3), (3, 6), (6, 9)]


def test_fixed_windows_with_overlap():
    cfg = SplitConfig(mode="fixed", window_s=4, stride_s=2, min_clip_s=1)
    assert fixed_windows(7.5, cfg) == [(0, 4), (2, 6), (4, 7.5), (6, 7.5)]


def test_given_spans_whole_file_and_out_of_range(scene_video):
    video = _probed(scene_video)
    sample = AnnotationSample(id="s1", conversations=[Turn(speaker="human", value="q"), Turn(speaker="gpt", value="a")])
    video = video.model_copy(update={"spans": [
        Span(start_s=1.0, end_s=2.0), Span(start_s=7.0, end_s=None), Span(start_s=20.0, end_s=30.0, samples=[sample])]})
    spans, failures = split_video(video, SplitConfig(mode="given"))
    assert [(s.start_s, s.end_s) for s in spans] == [(1.0, 2.0), (7.0, pytest.approx(8.0))]
    assert [(f.item_id, f.reason) for f in failures] == [("s1", reasons.SPAN_OUT_OF_RANGE)]
    whole, _ = split_video(video.model_copy(update={"spans": []}), SplitConfig(mode="given"))
    assert [(s.start_s, s.end_s) for s in whole] == [(0.0, pytest.approx(8.0))]


def test_no_clip_long_enough_fails_the_video(scene_video):
    result = VideoResult(video_id="v", video=_probed(scene_video))
    out = split.apply(result, SplitConfig(mode="fixed", window_s=4, stride_s=4, min_clip_s=9, max_clip_s=10))
    assert out.failed and [f.reason for f in out.failures] == [reasons.NO_CLIPS]
