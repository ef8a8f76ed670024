"""Global compressor: learnable queries cross-attending to every frame token (release `global_compressor`).

`num_queries` learned queries (optionally replaced or modulated by the instruction, see
`GuideInjector`) attend with multi-head cross-attention over all T x H x W VALUE tokens plus a fixed
3-D sin/cos position encoding (sum of a t, an h and a w table; not a parameter, never saved; kept on
the device per clip shape). The output is readout(query + attention).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CompressorConfig
from .guide import GuideInjector, MultiheadAttention, build_mlp, init_weights

MAX_POS_TABLES = 4  # distinct clip shapes whose tables stay on the device (mixed frame counts in one run)


def sincos_table(n: int, dim: int) -> torch.Tensor:
    """(n, dim) float64 sin/cos table: pos / 10000^(2*(i//2)/dim), sin on even i, cos on odd i."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angles = pos / torch.pow(10000.0, (2 * torch.div(i, 2, rounding_mode="floor")) / dim)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table


def position_encoding_3d(t: int, h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(t, h, w, dim) fixed 3-D position encoding, computed in float64 like the release, cast to float32
    and then to `dtype`. Slicing a larger table gives the same values, so no max size is needed."""
    if device is not None and torch.device(device).type == "meta":
        return torch.empty(t, h, w, dim, device="meta", dtype=dtype or torch.float32)
    table = (sincos_table(t, dim)[:, None, None] + sincos_table(h, dim)[None, :, None]
             + sincos_table(w, dim)[None, None, :])
    return table.float().to(device=device, dtype=dtype)


class GlobalCompressor(nn.Module):
    """Parameters: `query` (num_queries, D), `attn_layer.{q,k,v,out}_proj`, `readout.*`
    (+ `guide_injector.*` for coarse/fine)."""

    def __init__(self, cfg: CompressorConfig):
        super().__init__()
        dim = cfg.vision_dim
        self.embed_dim = dim
        self.query = nn.Parameter(torch.zeros(cfg.num_queries, dim))
        self.guide_mode = cfg.global_guide_mode
        if self.guide_mode != "none":
            self.guide_injector = GuideInjector(self.guide_mode, cfg.text_dim, dim, cfg.mlp_depth,
                                                cfg.norm_eps, cfg.head_dim)
        self.attn_layer = MultiheadAttention(dim, dim // cfg.head_dim)
        self.readout = build_mlp(cfg.mlp_depth, dim, cfg.llm_dim)
        self.apply(init_weights)  # `query` stays zero, as in the release
        # position tables already on their device, per (t, h, w, device, dtype): built once, never copied per
        # forward (the release keeps one as a buffer); not parameters and never saved
        self._pos_tables: dict[tuple, torch.Tensor] = {}

    def position_table(self, t: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(t, h, w, D) position encoding on `device`, built on first use of that shape; the last
        `MAX_POS_TABLES` shapes are kept (one table is ~107 MB at 32 frames in float32)."""
        key = (t, h, w, torch.device(device), dtype)
        table = self._pos_tables.get(key)
        if table is None:
            if len(self._pos_tables) >= MAX_POS_TABLES:
                self._pos_tables.pop(next(iter(self._pos_tables)))
            table = self._pos_tables[key] = position_encoding_3d(t, h, w, self.embed_dim, device, dtype)
        return table

    def queries(self, batch: int, guide: torch.Tensor | None, guide_tokens: torch.Tensor | None) -> torch.Tensor:
        """(B, num_queries, D) queries after instruction injection. With `direct` every query is the
        instruction embedding (the release's behaviour with `--use_guide direct`)."""
        q = self.query[None].expand(batch, -1, -1)
        if self.guide_mode == "none":
            return q
        return self.guide_injector(q, guide, guide_tokens)

    def forward(self, value: torch.Tensor, guide: torch.Tensor | None = None,
                guide_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """value (B, T, H, W, D) -> (B, num_queries, llm_dim)."""
        b, t, h, w, d = value.shape
        kv = value + self.position_table(t, h, w, value.device, value.dtype)
        kv = kv.reshape(b, t * h * w, d)
        q = self.queries(b, guide, guide_tokens)
        return self.readout(q + self.attn_layer(q, kv, kv))
