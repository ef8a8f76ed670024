import shutil

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


# Manifest spans: scene/fixed split inside them, captions per span, every row a clip or a failure.

def _with_spans(video, spans):
    return video.model_copy(update={"spans": spans})


def test_scene_split_happens_inside_manifest_spans_with_each_spans_caption(scene_video):
    video = _with_spans(_probed(scene_video), [Span(start_s=0.0, end_s=4.0, caption="first", row=0),
                                               Span(start_s=4.0, end_s=8.0, caption="second", row=1)])
    spans, failures = split_video(video, SplitConfig(mode="scene", min_clip_s=0.5, max_clip_s=10.0))
    assert failures == []
    assert [(s.start_s, s.end_s, s.caption, s.row) for s in spans] == [
        (0.0, 3.0, "first", 0), (3.0, 4.0, "first", 0), (4.0, 5.0, "second", 1), (5.0, pytest.approx(8.0), "second", 1)]


def test_fixed_split_inside_spans_and_no_clip_outside_them(scene_video):
    video = _with_spans(_probed(scene_video), [Span(start_s=1.0, end_s=4.0, caption="a", row=0),
                                               Span(start_s=6.0, end_s=None, caption="b", row=1)])
    spans, failures = split_video(video, SplitConfig(mode="fixed", window_s=2.0, stride_s=2.0, min_clip_s=1.0))
    assert failures == []
    assert [(s.start_s, s.end_s, s.caption) for s in spans] == [
        (1.0, 3.0, "a"), (3.0, 4.0, "a"), (6.0, 8.0, "b")]


def test_invalid_and_duplicate_spans_are_failure_rows_keyed_by_row(scene_video):
    video = _with_spans(_probed(scene_video), [
        Span(start_s=0.0, end_s=3.0, caption="ok", row=0, item_id="m.csv:0"),
        Span(start_s=5.0, end_s=2.0, caption="x", row=1, item_id="m.csv:1"),
        Span(start_s=-1.0, end_s=2.0, row=2, item_id="m.csv:2"), Span(start_s=9.0, end_s=12.0, row=3, item_id="m.csv:3"),
        Span(start_s=2.0, end_s=30.0, row=4, item_id="m.csv:4"),
        Span(start_s=0.0, end_s=3.0, caption="ok again", row=5, item_id="m.csv:5"),
        Span(start_s=5.0, end_s=5.3, row=6, item_id="m.csv:6")])
    spans, failures = split_video(video, SplitConfig(mode="scene", min_clip_s=1.0, max_clip_s=10.0))
    assert [(s.start_s, s.end_s, s.row) for s in spans] == [(0.0, 3.0, 0)]
    assert sorted((f.item_id, f.reason) for f in failures) == [
        ("m.csv:1", reasons.SPAN_END_BEFORE_START), ("m.csv:2", reasons.SPAN_NEGATIVE),
        ("m.csv:3", reasons.SPAN_OUT_OF_RANGE), ("m.csv:4", reasons.SPAN_OUT_OF_RANGE),
        ("m.csv:5", reasons.DUPLICATE_SPAN), ("m.csv:6", reasons.NO_CLIPS)]
    result = split.apply(VideoResult(video_id="v", video=video), SplitConfig(mode="scene"))
    assert not result.failed and len(result.failures) == 6  # span failures never fail the video


def ingest_csv(scene_video, folder, name: str, text: str):
    """`text` as manifest `name` beside a copy of the scene video (`scenes.mp4`), ingested."""
    from schemas.config import InputConfig
    from stages.ingest import ingest_manifest

    shutil.copy(scene_video, folder / "scenes.mp4")
    (folder / name).write_text(text)
    return ingest_manifest(InputConfig(path=str(folder / name), hash_files=False), folder / name)


def test_panda_style_row_with_several_spans_keys_each_span(scene_video, tmp_path):
    """Split keys a span's failure as ingest keys its row: one key format for a manifest row everywhere."""
    ingested = ingest_csv(scene_video, tmp_path, "p.csv", 'path,timestamp\nscenes.mp4,"[[\'0:00:00.000\', '
                          '\'0:00:03.000\'], [\'0:00:03.000\', \'0:00:01.000\']]"\n')
    assert [s.item_id for s in ingested.videos[0].spans] == ["p.csv:2.0", "p.csv:2.1"]
    video = probe_video(ingested.videos[0], ProbeConfig())
    spans, failures = split_video(video, SplitConfig(mode="fixed", window_s=4, stride_s=4, min_clip_s=1))
    assert [(s.start_s, s.end_s) for s in spans] == [(0.0, 3.0)]
    assert [(f.item_id, f.reason) for f in failures] == [("p.csv:2.1", reasons.SPAN_END_BEFORE_START)]


def test_manifest_rows_each_end_as_a_clip_or_a_failure(scene_video, tmp_path):
    ingested = ingest_csv(scene_video, tmp_path, "m.csv", "path,start_s,end_s,caption\nscenes.mp4,0,3,one\n"
                          "scenes.mp4,3,8,two\nscenes.mp4,6,2,bad\nscenes.mp4,0,3,one again\n")
    # the repeated span (line 5) is reported by ingest; lines 2-4 reach split, keyed by their line number
    assert [(f.item_id, f.reason) for f in ingested.failures] == [("m.csv:5", "duplicate_span")]
    assert len(ingested.videos) == 1
    video = probe_video(ingested.videos[0], ProbeConfig())
    spans, failures = split_video(video, SplitConfig(mode="scene", min_clip_s=1.0, max_clip_s=10.0))
    rows = {s.row for s in spans} | {int(f.item_id.removeprefix("m.csv:")) for f in failures}
    assert rows == {2, 3, 4} and [f.reason for f in failures] == ["span_end_before_start"]
    assert [(s.start_s, s.end_s, s.caption) for s in spans] == [
        (0.0, 3.0, "one"), (3.0, 5.0, "two"), (5.0, pytest.approx(8.0), "two")]


def test_pyscenedetect_content_detector_finds_the_hard_cuts(scene_video):
    video = _probed(scene_video)
    cfg = SplitConfig(detector="pyscenedetect")
    assert [round(c, 2) for c in split.detect_cuts(video, cfg)] == [3.0, 5.0]
    spans, _ = split_video(video, SplitConfig(mode="scene", detector="pyscenedetect", min_clip_s=1.0, max_clip_s=10.0))
    assert [(s.start_s, s.end_s) for s in spans] == [(0.0, 3.0), (3.0, 5.0), (5.0, pytest.approx(8.0))]
