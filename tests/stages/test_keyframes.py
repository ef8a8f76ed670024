"""Keyframes and categories with the tiny random SigLIP (plumbing, not quality) on real FFmpeg decodes."""
import numpy as np
import pytest

from schemas import reasons
from conftest import REPO
from pipeline.recipe import recipe_stages
from schemas.config import ProbeConfig, load_run_config
from schemas.recipe import CategoryConfig, EmbedderConfig, KeyframeConfig
from schemas.records import Span, VideoRecord, VideoResult
from stages import categories, keyframes
from stages.embedder import build_embedder, load_embedder
from stages.probe import probe_video

EMBEDDER = EmbedderConfig(random_init=True)


@pytest.fixture(scope="module")
def probed(scene_video):
    return probe_video(VideoRecord(id="v", source=str(scene_video), relpath="scenes.mp4"), ProbeConfig())


def test_embedder_needs_a_path_or_an_explicit_random_model():
    with pytest.raises(ValueError, match="embedder.path"):
        build_embedder(EmbedderConfig())
    with pytest.raises(ValueError, match="embedder.path"):
        recipe_stages(load_run_config(REPO / "configs" / "hicom248k.yaml"))  # the shipped config names no model


def test_tiny_embedder_gives_unit_vectors_for_frames_and_sentences(torch_single_thread):
    embedder = build_embedder(EMBEDDER)
    frames = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    images, texts = embedder.embed_images(frames), embedder.embed_texts(["A video about cooking activity.", "x"])
    assert images.shape == (3, 32) and texts.shape == (2, 32)
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert load_embedder(EMBEDDER) is load_embedder(EMBEDDER)  # once per worker process


def test_sample_frames_decodes_at_the_rate_and_caps_the_count(scene_video):
    frames, times = keyframes.sample_frames(str(scene_video), 8.0, 2.0, 16, 100, 60)
    assert frames.shape == (16, 16, 16, 3) and times[:3] == [0.0, 0.5, 1.0]
    capped, capped_times = keyframes.sample_frames(str(scene_video), 8.0, 25.0, 16, 10, 60)
    assert len(capped) == 10 and capped_times[-1] < 8.0


def test_select_keyframes_keeps_frames_less_similar_than_the_last_keyframe():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    mid = np.array([0.8, 0.6])
    assert keyframes.select_keyframes(np.stack([a, a, mid, b, b, a]), 0.9) == [0, 2, 3, 5]
    assert keyframes.select_keyframes(np.zeros((0, 2)), 0.9) == []


def test_clips_without_a_keyframe_are_redundant_and_keyframes_are_recorded(probed, torch_single_thread):
    planned = [Span(start_s=0.0, end_s=3.0), Span(start_s=3.0, end_s=5.0), Span(start_s=5.0, end_s=8.0)]
    # max_similarity -1: nothing is ever less similar, so the first frame is the only keyframe
    out = keyframes.apply(VideoResult(video_id="v", video=probed.model_copy(deep=True), planned=planned),
                          KeyframeConfig(sample_fps=2.0, max_similarity=-1.0), EMBEDDER)
    assert out.video.keyframe_times_s == [0.0]
    assert [(s.start_s, s.end_s) for s in out.planned] == [(0.0, 3.0)]
    assert [(f.item_id, f.reason) for f in out.failures] == [("v_3000_5000", reasons.REDUNDANT_CLIP),
                                                            ("v_5000_8000", reasons.REDUNDANT_CLIP)]
    # max_similarity 1: every frame that differs at all from the last keyframe is one (each scene's first)
    out = keyframes.apply(VideoResult(video_id="v", video=probed.model_copy(deep=True), planned=planned),
                          KeyframeConfig(sample_fps=2.0, max_similarity=1.0), EMBEDDER)
    assert {0.0, 3.0, 5.0} <= set(out.video.keyframe_times_s) and len(out.planned) == 3 and out.failures == []


def test_undecodable_source_fails_the_video_with_a_reason(probed, tmp_path, torch_single_thread):
    broken = tmp_path / "gone.mp4"
    broken.write_bytes(b"not a video")
    video = probed.model_copy(update={"source": str(broken)})
    out = keyframes.apply(VideoResult(video_id="v", video=video, planned=[Span(start_s=0, end_s=3)]),
                          KeyframeConfig(), EMBEDDER)
    assert out.failed and [f.reason for f in out.failures] == [reasons.FFMPEG_FAILED]


def test_category_is_the_best_scoring_sentence(probed, torch_single_thread):
    sentences = ["A video about cooking activity.", "A video about dancing.", "A video about gaming."]
    out = categories.apply(VideoResult(video_id="v", video=probed.model_copy(deep=True)),
                           CategoryConfig(sentences=sentences, frames_per_video=4), EMBEDDER)
    embedder = load_embedder(EMBEDDER)
    frames, _ = keyframes.sample_frames(probed.source, 8.0, 0.5, 32, 4, 60)
    expected = embedder.embed_texts(sentences) @ categories.video_embedding(embedder, frames)
    assert out.video.category == sentences[int(np.argmax(expected))]
    assert out.video.category_score == pytest.approx(float(expected.max()), abs=1e-5)
    assert -1.0 <= out.video.category_score <= 1.0
