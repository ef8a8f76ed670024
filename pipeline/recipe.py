"""The recipe's record-level stages, in order, for `stage_pipeline` to insert after split:
length (5-120 s) -> keyframes (drop redundant clips). Category selection runs before the build
(`pipeline/category_select.py`). Empty without a `recipe:` section."""
from __future__ import annotations

from schemas.config import RunConfig
from stages import keyframes, length
from stages.ray_adapter import RayStage


def recipe_stages(cfg: RunConfig) -> list[RayStage]:
    recipe = cfg.recipe
    if recipe is None:
        return []
    if recipe.needs_embedder:
        cfg.embedder.require_model()  # before any video is processed
    stages = []
    if recipe.length is not None:
        stages.append(RayStage(length.STAGE, length.apply, recipe.length))
    if recipe.keyframes is not None:
        stages.append(RayStage(keyframes.STAGE, keyframes.apply, recipe.keyframes, cfg.embedder))
    return stages
