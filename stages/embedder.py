"""Image-text embedder for the recipe's keyframe and category steps: SigLIP through `transformers`.

A real checkpoint loads from a local directory (`embedder.path`, nothing is downloaded); without one, a tiny
randomly initialised SigLIP is built from a `SiglipConfig` (`embedder.random_init`): the same code path, no
meaningful similarities. Embeddings are L2-normalised, so a dot product is the cosine similarity.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from schemas.recipe import EmbedderConfig

log = logging.getLogger(__name__)
_TEXT_MAX_TOKENS = 64  # SigLIP's text tower was trained on 64 tokens, padded to max length


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ImageTextEmbedder:
    """Embeds RGB frames and sentences into SigLIP's joint space (unit vectors)."""

    def __init__(self, model, tokenizer, image_size_px: int, mean: float, std: float, cfg: EmbedderConfig):
        self.model = model.eval().to(cfg.device)
        self.tokenizer = tokenizer
        self.image_size_px = image_size_px
        self.mean, self.std = mean, std
        self.cfg = cfg

    @torch.inference_mode()
    def embed_images(self, frames: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 frames at `image_size_px` -> (N, D) float32 unit vectors."""
        out = []
        for i in range(0, len(frames), self.cfg.batch_size):
            batch = torch.from_numpy(np.array(frames[i:i + self.cfg.batch_size]))  # a writable copy
            pixels = (batch.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
            feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.cfg.device)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        dim = self.model.config.vision_config.hidden_size
        return torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Sentences -> (N, D) float32 unit vectors."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=_TEXT_MAX_TOKENS, truncation=True,
                                return_tensors="pt")
        feats = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.cfg.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()


def _random_siglip(cfg: EmbedderConfig) -> ImageTextEmbedder:
    from transformers import SiglipConfig, SiglipModel

    from model.presets import tiny_guide_tokenizer

    tokenizer = tiny_guide_tokenizer(_TEXT_MAX_TOKENS)
    h = cfg.random_hidden
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=_TEXT_MAX_TOKENS, projection_size=h,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=2,
                           image_size=cfg.random_image_size_px, patch_size=max(1, cfg.random_image_size_px // 4)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.random_seed)
        model = SiglipModel(config)
    return ImageTextEmbedder(model, tokenizer, cfg.random_image_size_px, 0.5, 0.5, cfg)


def _local_siglip(cfg: EmbedderConfig) -> ImageTextEmbedder:
    from transformers import AutoTokenizer, SiglipImageProcessor, SiglipModel

    model = SiglipModel.from_pretrained(cfg.path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
    proc = SiglipImageProcessor.from_pretrained(cfg.path, local_files_only=True)
    size = int(proc.size.get("height", model.config.vision_config.image_size))
    return ImageTextEmbedder(model, tokenizer, size, float(proc.image_mean[0]), float(proc.image_std[0]), cfg)


def build_embedder(cfg: EmbedderConfig) -> ImageTextEmbedder:
    """A fresh embedder from config (a local checkpoint, or the tiny random model)."""
    cfg.require_model()
    log.info("loading the image-text embedder (%s)", cfg.path or "tiny random SigLIP")
    return _local_siglip(cfg) if cfg.path else _random_siglip(cfg)


@functools.lru_cache(maxsize=2)
def _cached(cfg_json: str) -> ImageTextEmbedder:
    return build_embedder(EmbedderConfig.model_validate_json(cfg_json))


def load_embedder(cfg: EmbedderConfig) -> ImageTextEmbedder:
    """Once per worker process: record-level stages call this per video, Ray reuses worker processes, and a
    SigLIP so400m load costs seconds, so the model is kept per config for the life of the process."""
    return _cached(cfg.model_dump_json())
