"""Building blocks shared by the two compressor levels: the readout MLP, the release's multi-head
cross-attention and the instruction (guide) injector.

Module and parameter names follow the release's `mm_projector` so state dicts load both ways:
`readout.{0,2}`, `attn_layer.{q,k,v,out}_proj`, `guide_injector.{coarse_proj.{0,2},coarse_norm,
fine_proj.*,fine_norm,text2qk_proj.*}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_mlp(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, out) followed by (GELU, Linear(out, out)) * (depth - 1): the release's readout."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Release init: Linear weights trunc-normal(std 0.02) with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MultiheadAttention(nn.Module):
    """Cross-attention with separate q/k/v/out projections (bias on), as the release's `attn_layer`.

    Scores use 1/sqrt(head_dim) and a float32 softmax (the release upcasts too); computed with
    `scaled_dot_product_attention`, which picks a fused kernel on GPU.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible into {num_heads} heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (B, Nq, D), key/value (B, Nk, D) -> (B, Nq, D)."""
        b, nq, _ = query.shape
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        if q.dtype in (torch.float16, torch.bfloat16):
            # match the release's float32 softmax for half-precision inputs
            attn = torch.softmax((q @ k.transpose(-2, -1)).float() * self.head_dim**-0.5, dim=-1)
            out = attn.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, nq, self.embed_dim)
        return self.out_proj(out)


class GuideInjector(nn.Module):
    """Injects the instruction embedding into a level's queries.

    Modes (release `GuideInjector`):
      - `direct`: the query *is* the (projected) instruction embedding, repeated per query.
      - `coarse`: FiLM, [scale, shift] = MLP(g); query' = LayerNorm(query * (1 + scale) + shift).
      - `fine`: each query cross-attends to the instruction token features; LayerNorm(query + attn).
    `text2qk_proj` (an MLP) only exists when the text and query dims differ (not in the release).
    """

    def __init__(self, mode: str, text_dim: int, qk_dim: int, mlp_depth: int = 2,
                 norm_eps: float = 1e-6, head_dim: int = 128):
        super().__init__()
        if mode not in ("direct", "coarse", "fine"):
            raise ValueError(f"unknown guide mode {mode!r}")
        self.mode = mode
        self.text2qk_proj = build_mlp(mlp_depth, text_dim, qk_dim) if text_dim != qk_dim else nn.Identity()
        if mode == "coarse":
            self.coarse_proj = build_mlp(mlp_depth, qk_dim, qk_dim * 2)
            self.coarse_norm = nn.LayerNorm(qk_dim, eps=norm_eps)
        elif mode == "fine":
            self.fine_proj = MultiheadAttention(qk_dim, num_heads=max(1, qk_dim // head_dim))
            self.fine_norm = nn.LayerNorm(qk_dim, eps=norm_eps)

    @torch.no_grad()
    def start_as_identity(self) -> None:
        """Zero the layer that writes into the query (FiLM's last Linear, fine's out_proj), so a newly added
        injector starts as LayerNorm(query) and learns from there (used when it joins stage-1 weights)."""
        if self.mode == "coarse":
            last = self.coarse_proj[-1]
        elif self.mode == "fine":
            last = self.fine_proj.out_proj
        else:
            return  # `direct` has nothing that writes into the query
        last.weight.zero_()
        last.bias.zero_()

    def forward(self, query: torch.Tensor, guide: torch.Tensor | None,
                guide_tokens: torch.Tensor | None) -> torch.Tensor:
        """query (B, N, D); guide (B, Dt) pooled instruction; guide_tokens (B, L, Dt) -> (B, N, D)."""
        if self.mode == "fine":
            if guide_tokens is None:
                raise ValueError("fine guide injection needs guide_tokens")
            tokens = self.text2qk_proj(guide_tokens)
            return self.fine_norm(query + self.fine_proj(query, tokens, tokens))
        if guide is None:
            raise ValueError(f"{self.mode} guide injection needs the pooled guide embedding")
        g = self.text2qk_proj(guide).to(query.dtype)
        if self.mode == "direct":
            return g[:, None, :].expand_as(query)
        scale, shift = self.coarse_proj(g).chunk(2, dim=-1)
        return self.coarse_norm(query * (1 + scale[:, None]) + shift[:, None])
