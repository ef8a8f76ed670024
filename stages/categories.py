"""Categories: score a video against the recipe's category sentences with the image-text model.

HICom-248K balanced its sources over 29 categories written as sentences ("A video about cooking activity."),
scored against every video. Here a video's embedding is the mean of `frames_per_video` uniformly spread frames;
its best category and that similarity go to the `videos` index. The dataset-wide selection (up to N per
category plus M random others) is a separate bounded pass: `pipeline/category_select.py`.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from schemas.recipe import CategoryConfig, EmbedderConfig
from schemas.records import VideoResult
from stages.keyframes import frames_or_fail

if TYPE_CHECKING:
    from stages.embedder import ImageTextEmbedder

STAGE = "categories"
RESOURCES = {"num_cpus": 1}


@functools.lru_cache(maxsize=4)
def _sentence_embeddings(embedder: ImageTextEmbedder, sentences: tuple[str, ...]) -> np.ndarray:
    """The sentences are the same for every video: embedded once per worker process."""
    return embedder.embed_texts(list(sentences))


def best_category(video_embedding: np.ndarray, sentence_embeddings: np.ndarray,
                  sentences: list[str]) -> tuple[str, float]:
    """The most similar sentence and its cosine similarity."""
    scores = sentence_embeddings @ video_embedding
    i = int(np.argmax(scores))
    return sentences[i], float(scores[i])


def video_embedding(embedder: ImageTextEmbedder, frames: np.ndarray) -> np.ndarray:
    """Mean of the frame embeddings, normalised back to a unit vector."""
    mean = embedder.embed_images(frames).mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def apply(result: VideoResult, cfg: CategoryConfig, embedder_cfg: EmbedderConfig) -> VideoResult:
    """Set `video.category` and `video.category_score` (needs the probe's duration)."""
    from stages.embedder import load_embedder  # torch loads in the workers that embed, not in the build's driver

    video = result.video
    embedder = load_embedder(embedder_cfg)
    duration = video.probe.duration_s
    frames, _ = frames_or_fail(result, STAGE, cfg.frames_per_video / max(duration, 1e-3), embedder.image_size_px,
                               cfg.frames_per_video, cfg.timeout_s)
    if frames is None:
        return result
    sentences = _sentence_embeddings(embedder, tuple(cfg.sentences))
    video.category, video.category_score = best_category(video_embedding(embedder, frames), sentences,
                                                         cfg.sentences)
    return result
