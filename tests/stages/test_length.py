import pytest
from pydantic import ValidationError

from schemas import reasons
from schemas.recipe import LengthConfig
from schemas.records import Span, VideoResult
from stages import length


def test_clips_outside_5_to_120_s_are_failure_rows_with_reasons():
    result = VideoResult(video_id="v", source="v.mp4", planned=[
        Span(start_s=0.0, end_s=4.99), Span(start_s=5.0, end_s=10.0), Span(start_s=10.0, end_s=130.0),
        Span(start_s=130.0, end_s=250.0, row=3), Span(start_s=250.0, end_s=371.0, row=4)])
    out = length.apply(result, LengthConfig())
    assert [(s.start_s, s.end_s) for s in out.planned] == [(5.0, 10.0), (10.0, 130.0), (130.0, 250.0)]
    assert [(f.item_id, f.reason, f.stage) for f in out.failures] == [
        ("v_0_4990", reasons.TOO_SHORT, "length"), ("v_250000_371000", reasons.TOO_LONG, "length")]
    assert "manifest row 4" in out.failures[1].detail and not out.failed


def test_no_clip_left_fails_the_video_without_losing_a_row():
    out = length.apply(VideoResult(video_id="v", planned=[Span(start_s=0, end_s=1)]), LengthConfig())
    assert out.failed and [f.reason for f in out.failures] == [reasons.TOO_SHORT]


def test_length_config_rejects_inverted_range():
    with pytest.raises(ValidationError):
        LengthConfig(min_clip_s=10, max_clip_s=5)
