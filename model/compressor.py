"""HICom compressor: the release's `mm_projector` (local + global level).

`HicomCompressor(cfg)(value, key, guide, guide_tokens)` maps a clip's patch features to the visual
tokens the LLM sees: the local tokens in (t, h, w) order, then the global tokens. For `local43_global32`
and 32 frames of 27 x 27 patches that is 8*9*9 + 32 = 680 tokens; one image gives 81 + 32 = 113.

State-dict keys equal the release's `mm_projector` (`local_compressor.readout.0.weight`, ...), so
`load_state_dict` takes a release `mm_projector.bin` once its `model.mm_projector.` prefix is removed
(see `checkpoint.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CompressorConfig
from .global_compressor import GlobalCompressor
from .local_compressor import LocalCompressor


class HicomCompressor(nn.Module):
    """Local + global compressor over one batch of equally sized clips."""

    def __init__(self, cfg: CompressorConfig):
        super().__init__()
        self.cfg = cfg
        self.local_compressor = LocalCompressor(cfg) if cfg.use_local else None
        self.global_compressor = GlobalCompressor(cfg) if cfg.use_global else None

    def unused_parameter_names(self) -> list[str]:
        """Parameters the forward never reads: with `direct` global injection the learned queries are
        replaced by the instruction (release quirk) but kept so weights stay release-compatible."""
        if self.global_compressor is not None and self.global_compressor.guide_mode == "direct":
            return ["global_compressor.query"]
        return []

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, value: torch.Tensor, key: torch.Tensor | None = None, guide: torch.Tensor | None = None,
                guide_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Compress clips into visual tokens.

        Args:
            value: (B, T, H, W, vision_dim) VALUE features (vision tower hidden_states[-2]).
            key: (B, T, H, W, key_dim) KEY features for the local level (last hidden + head MLP),
                or None to use `value` (the release without a guide).
            guide: (B, text_dim) pooled instruction embedding (`direct` / `coarse`).
            guide_tokens: (B, L, text_dim) instruction token features (`fine`).
        Returns:
            (B, N, llm_dim) with N = cfg.num_tokens(T, H, W): local tokens (t, h, w order), then global.
        """
        dtype = self.dtype
        value = value.to(dtype)
        key = key.to(dtype) if key is not None else None
        guide = guide.to(dtype) if guide is not None else None
        guide_tokens = guide_tokens.to(dtype) if guide_tokens is not None else None
        parts = []
        if self.local_compressor is not None:
            parts.append(self.local_compressor(value, key, guide, guide_tokens))
        if self.global_compressor is not None:
            parts.append(self.global_compressor(value, guide, guide_tokens))
        return torch.cat(parts, dim=1)
