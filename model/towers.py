"""Frozen SigLIP towers: the vision tower (VALUE and KEY features per patch) and the text tower
(instruction embedding), plus the frame preprocessing they expect.

VALUE = hidden_states[-2] (release `mm_vision_select_layer -2`).
KEY   = last_hidden_state + head.mlp(head.layernorm(last_hidden_state)): the MAP head's MLP residual
        applied per patch (no attention pooling), which lands patches in the image-text joint space.
Guide = text tower `pooler_output` (direct / coarse) or head(last_hidden_state) per token (fine),
        tokenized with padding to max length (64) and truncation; the tokenizer's attention mask is
        passed to the text model, as the release does (`guide_encoder(**guided_input)`).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class FrameProcessor:
    """Pad to square with the mean colour, resize (bicubic), scale to [0, 1], normalise.

    Equivalent to the release's `image_aspect_ratio pad` + ModifiedSiglipImageProcessor.
    """

    image_size: int = 384
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.image_mean)

    def to_image(self, frame) -> Image.Image:
        """Accept a PIL image, an HxWx3 uint8 array or encoded (JPEG/PNG) bytes."""
        if isinstance(frame, Image.Image):
            return frame.convert("RGB")
        if isinstance(frame, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(frame))).convert("RGB")
        array = np.asarray(frame)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"frame must be HxWx3, got shape {array.shape}")
        return Image.fromarray(array.astype(np.uint8), "RGB")

    def expand_to_square(self, image: Image.Image) -> Image.Image:
        """Centre the image on a square canvas of the mean colour (release `expand2square`)."""
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), self.pad_colour)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas

    def square_uint8(self, frames) -> np.ndarray:
        """List of frames -> (T, image_size, image_size, 3) uint8, padded to square and resized."""
        out = []
        for frame in frames:
            image = self.expand_to_square(self.to_image(frame))
            if image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
            out.append(np.asarray(image))
        return np.stack(out)

    def __call__(self, frames) -> torch.Tensor:
        """List of frames -> (T, 3, image_size, image_size) float32 pixel values."""
        pixels = self.square_uint8(frames).astype(np.float32) / 255.0
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


class VisionTower(nn.Module):
    """Frozen SigLIP vision model -> per-patch VALUE and KEY grids."""

    def __init__(self, model: nn.Module, select_layer: int = -2):
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.model.requires_grad_(False)
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.patches_per_side = cfg.image_size // cfg.patch_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, with_key: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 3, S, S) -> VALUE (N, h, w, D) and KEY (N, h, w, D) or None."""
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        side = self.patches_per_side
        value = out.hidden_states[self.select_layer]
        value = value.reshape(value.shape[0], side, side, -1)
        if not with_key:
            return value, None
        last = out.last_hidden_state
        head = _inner(self.model, "vision_model").head
        key = last + head.mlp(head.layernorm(last))
        return value, key.reshape(key.shape[0], side, side, -1)


class GuideEncoder(nn.Module):
    """Frozen SigLIP text model -> pooled instruction embedding and per-token features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        self.hidden_size = model.config.projection_size

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                with_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L) ids (+ mask) -> pooled (B, D) and, with `with_tokens`, head(last_hidden_state) (B, L, D).

        The pooled output is SigLIP's: the head applied to the *last* position (a pad token for short
        texts, which is how SigLIP was trained with max-length padding)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = _inner(self.model, "text_model").head(out.last_hidden_state) if with_tokens else None
        return out.pooler_output, tokens


def _inner(model: nn.Module, name: str) -> nn.Module:
    """The module holding `head`: transformers 5 flattens SigLIP models, 4.x nests them under `name`."""
    return getattr(model, name, model)


def load_siglip(path: str, dtype: torch.dtype, need_text: bool):
    """Vision model, text model (or None) and FrameProcessor from a local SigLIP checkpoint directory.

    Reads only local files (`local_files_only=True`); raises FileNotFoundError with the path when the
    directory is missing.
    """
    from transformers import SiglipImageProcessor, SiglipTextModel, SiglipVisionModel

    require_dir(path, "vision tower (SigLIP)")
    vision = SiglipVisionModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    text = SiglipTextModel.from_pretrained(path, dtype=dtype, local_files_only=True) if need_text else None
    try:
        proc = SiglipImageProcessor.from_pretrained(path, local_files_only=True)
        frames = FrameProcessor(image_size=int(proc.size["height"]), image_mean=tuple(proc.image_mean),
                                image_std=tuple(proc.image_std))
    except OSError:
        logger.warning("no image processor config in %s; using SigLIP defaults", path)
        frames = FrameProcessor(image_size=vision.config.image_size)
    return vision.eval(), (text.eval() if text is not None else None), frames


def require_dir(path: str | None, what: str) -> None:
    if not path:
        raise FileNotFoundError(f"{what}: no local path given (nothing is downloaded at run time)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: local checkpoint directory not found: {path}")
