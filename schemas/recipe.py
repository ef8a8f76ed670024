"""The HICom-248K construction recipe as config: clip length rule, keyframe selection, category balance,
and the image-text embedder both of the latter use.

The generic build runs none of this (`RunConfig.recipe` is None); `configs/hicom248k.yaml` turns it on with
the paper's values (arXiv 2503.16036, section 3.2; `shared/reference/hicom.md`, "How the paper built it").
"""
from __future__ import annotations

from pydantic import Field, model_validator

from schemas.config_base import StrictConfig


class _Config(StrictConfig):
    pass


class EmbedderConfig(_Config):
    """The image-text model that scores frames (keyframes) and videos against category sentences.

    The paper used CLIP (keyframes) and InternVideo2 (categories); we use one SigLIP for both, the vision tower
    the model already uses, so one checkpoint serves the whole recipe.
    """

    path: str | None = None  # local SigLIP checkpoint directory (e.g. siglip-so400m-patch14-384); never downloaded
    # No weights offline: a tiny randomly initialised SigLIP built from a config. Plumbing only, never quality,
    # so it must be asked for explicitly.
    random_init: bool = False
    random_seed: int = 0
    random_image_size_px: int = Field(32, ge=8)  # the tiny model's input size
    random_hidden: int = Field(32, ge=8)
    device: str = "cpu"  # "cuda" where the worker owns a GPU
    batch_size: int = Field(32, ge=1)  # images per forward pass

    def require_model(self) -> None:
        """Called when a build starts (the shipped recipe config leaves the path to the user)."""
        if self.path is None and not self.random_init:
            raise ValueError("embedder.path must name a local SigLIP checkpoint (or set embedder.random_init: true "
                             "for a tiny random model: plumbing tests only)")


class LengthConfig(_Config):
    """Keep clips of min..max seconds; the rest are failure rows `too_short` / `too_long` (paper: 5-120 s)."""

    min_clip_s: float = Field(5.0, ge=0)
    max_clip_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "LengthConfig":
        if self.min_clip_s > self.max_clip_s:
            raise ValueError("recipe.length.min_clip_s must be <= max_clip_s")
        return self


class KeyframeConfig(_Config):
    """ShareGPT4Video-style keyframes: embed densely sampled frames, keep a frame as a keyframe when it is less
    similar than `max_similarity` to the previous keyframe; clips that contain no keyframe are `redundant_clip`."""

    sample_fps: float = Field(1.0, gt=0)  # dense sampling rate of the source video
    max_frames: int = Field(600, ge=2)  # cap per video (the rate drops for long videos): bounds memory and time
    max_similarity: float = Field(0.9, ge=-1, le=1)  # cosine; lower keeps fewer keyframes
    timeout_s: float = Field(600.0, gt=0)  # the FFmpeg decode of one video


class CategoryConfig(_Config):
    """Category balance: every video is scored against every sentence; each video belongs to its best
    category; up to `per_category` videos per category by similarity, plus `random_others` random ones of the
    rest; the others are failure rows `category_quota_full`."""

    sentences: list[str] = Field(min_length=1)
    per_category: int = Field(1500, ge=0)
    random_others: int = Field(10000, ge=0)
    seed: int = 0  # the random pick is a hash of (seed, video id): the same on every rerun
    RENAMED = {"num_frames": "recipe.categories.frames_per_video"}
    frames_per_video: int = Field(8, ge=1)  # uniformly spread over the video, averaged into its embedding
    timeout_s: float = Field(600.0, gt=0)


class RecipeConfig(_Config):
    """The recipe's extra steps; each is off when absent."""

    length: LengthConfig | None = None
    keyframes: KeyframeConfig | None = None
    categories: CategoryConfig | None = None

    @property
    def needs_embedder(self) -> bool:
        return self.keyframes is not None or self.categories is not None
