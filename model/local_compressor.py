"""Local compressor: grouped spatio-temporal attention (the release's `local_compressor`).

The (t, h, w) patch grid of a clip is cut into groups of kt x ks x ks tokens (`local43`: 4 x 3 x 3 =
36). Each group gets one query: the instruction embedding (`direct`), or the VALUE grid downsampled
(trilinear) to the group grid, optionally FiLM/attention-modulated by the instruction. A single-head
scaled dot-product attention of the query over the group's KEYs weights the group's VALUEs; the
result goes through the readout MLP. Output order is (t, h, w) over the group grid.

Uneven dims are split like the release's `balance_divide_feature`: ceil(n / k) groups of exactly k
items, the last groups shifted back to overlap their predecessor by one item, so every group stays
full. Where the release's rule breaks (it allows one overlap per group) the overlaps are spread
evenly; where n <= k there is one group of n items (what the release ends up with).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CompressorConfig
from .guide import GuideInjector, build_mlp, init_weights


@functools.lru_cache(maxsize=256)
def group_starts(n: int, k: int) -> tuple[int, ...]:
    """Start index of each group when n items are split into balanced groups of size k.

    Returns ceil(n / k) starts; group i covers [start_i, start_i + min(k, n)). Matches the release
    for every n it handles: the last `ceil(n/k) * k - n` groups overlap their predecessor by one.
    """
    if n <= k:
        return (0,)
    groups = -(-n // k)
    repeats = groups * k - n  # items that must appear twice
    boundaries = groups - 1
    base, extra = divmod(repeats, boundaries)
    starts, pos = [0], 0
    for b in range(1, groups):
        # later boundaries take the extra overlap, as the release shifts the *last* groups back
        overlap = base + (1 if b > boundaries - extra else 0)
        pos = pos + k - overlap
        starts.append(pos)
    return tuple(starts)


def group_index(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """(groups, min(k, n)) long tensor of item indices per balanced group along one axis."""
    size = min(k, n)
    starts = torch.tensor(group_starts(n, k), dtype=torch.long, device=device)
    return starts[:, None] + torch.arange(size, device=device)[None, :]


def divide(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Group a (B, T, H, W, D) grid into (B, G, K, D): G groups in (t, h, w) order, K = kt*kh*kw.

    Within a group the order is (t, h, w) too; attention does not depend on it.
    """
    b, t, h, w, d = x.shape
    ti = group_index(t, kernel[0], x.device)
    hi = group_index(h, kernel[1], x.device)
    wi = group_index(w, kernel[2], x.device)
    g = x[:, ti[:, :, None, None, None, None], hi[None, None, :, :, None, None], wi[None, None, None, None, :, :]]
    # g: (B, gt, kt, gh, kh, gw, kw, D) -> (B, gt, gh, gw, kt, kh, kw, D)
    g = g.permute(0, 1, 3, 5, 2, 4, 6, 7)
    gt, gh, gw, kt, kh, kw = g.shape[1:7]
    return g.reshape(b, gt * gh * gw, kt * kh * kw, d)


class LocalCompressor(nn.Module):
    """Grouped attention over the patch grid; parameters `readout.*` (+ `guide_injector.*`)."""

    def __init__(self, cfg: CompressorConfig):
        super().__init__()
        self.temporal_kernel = cfg.temporal_kernel
        self.spatial_kernel = cfg.spatial_kernel
        self.key_dim = cfg.key_dim
        self.guide_mode = cfg.local_guide_mode
        if self.guide_mode != "none":
            self.guide_injector = GuideInjector(self.guide_mode, cfg.text_dim, cfg.key_dim, cfg.mlp_depth,
                                                cfg.norm_eps, cfg.head_dim)
        if self.guide_mode in ("none", "coarse", "fine") and cfg.key_dim != cfg.vision_dim:
            raise ValueError("a VALUE-grid query needs key_dim == vision_dim")
        self.readout = build_mlp(cfg.mlp_depth, cfg.vision_dim, cfg.llm_dim)
        self.apply(init_weights)

    def kernel(self, t: int) -> tuple[int, int, int]:
        """Group kernel (kt, kh, kw); a single frame is an image, so kt = 1 (release)."""
        kt = 1 if t == 1 else self.temporal_kernel
        return (kt, self.spatial_kernel, self.spatial_kernel)

    def queries(self, value: torch.Tensor, guide: torch.Tensor | None,
                guide_tokens: torch.Tensor | None) -> torch.Tensor:
        """One query per group, (B, G, key_dim), groups in (t, h, w) order."""
        b, t, h, w, _ = value.shape
        kt, kh, kw = self.kernel(t)
        size = (math.ceil(t / kt), math.ceil(h / kh), math.ceil(w / kw))
        if self.guide_mode == "direct":
            # the downsampled grid would be discarded: the query is the instruction itself
            q = value.new_empty(b, size[0] * size[1] * size[2], self.key_dim)
            return self.guide_injector(q, guide, guide_tokens)
        grid = F.interpolate(value.permute(0, 4, 1, 2, 3), size=size, mode="trilinear")
        q = grid.flatten(2).transpose(1, 2)  # (B, G, D) in (t, h, w) order
        if self.guide_mode == "none":
            return q
        return self.guide_injector(q, guide, guide_tokens)

    def forward(self, value: torch.Tensor, key: torch.Tensor | None, guide: torch.Tensor | None = None,
                guide_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """value (B, T, H, W, Dv), key (B, T, H, W, Dk) or None (then key = value) -> (B, G, llm_dim)."""
        key = value if key is None else key
        kernel = self.kernel(value.shape[1])
        q = self.queries(value, guide, guide_tokens)  # (B, G, Dk)
        k = divide(key, kernel)  # (B, G, K, Dk)
        v = divide(value, kernel)  # (B, G, K, Dv)
        scores = torch.einsum("bgd,bgkd->bgk", q, k) / math.sqrt(self.key_dim)
        attn = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.einsum("bgk,bgkd->bgd", attn, v)
        return self.readout(out)
