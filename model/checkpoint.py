"""`mm_projector.bin` import/export with the release's key names, and compressor checkpoints.

The release trainer saves `model.named_parameters()` filtered on `mm_projector`, i.e. keys like
`model.mm_projector.local_compressor.readout.0.weight`, and its loader keeps only keys that contain
`mm_projector` (then strips through `mm_projector.`). So `save_mm_projector` writes the full-model
prefix by default, and `load_mm_projector_state` accepts keys with or without it.

A compressor checkpoint directory holds `compressor.safetensors` (release names, no prefix),
`mm_projector.bin` and `config.json` (the HicomConfig), so it can be rebuilt exactly.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from stages.storage import open_atomic, write_atomic

logger = logging.getLogger(__name__)

RELEASE_PREFIX = "model.mm_projector."
_MARK = "mm_projector."


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop everything up to and including `mm_projector.` from each key.

    A dict where some keys contain `mm_projector.` keeps only those (a full-model state dict);
    a dict with no such key is taken as already unprefixed.
    """
    if any(_MARK in k for k in state):
        return {k.split(_MARK, 1)[1]: v for k, v in state.items() if _MARK in k}
    return dict(state)


def load_mm_projector_state(source: str | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release-named compressor state dict from a `.bin`/`.safetensors` file, a directory holding
    `mm_projector.bin`, or an in-memory dict; prefixes removed."""
    if isinstance(source, dict):
        return strip_prefix(source)
    path = os.path.join(source, "mm_projector.bin") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mm_projector weights not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return strip_prefix(state)


def save_mm_projector(state: dict[str, torch.Tensor], path: str, prefix: str = RELEASE_PREFIX,
                      dtype: torch.dtype | None = None) -> None:
    """Write a release-compatible `mm_projector.bin` (torch.save of a flat dict).

    Args:
        state: unprefixed compressor state dict.
        path: output file; written to a temp name then renamed so a reader never sees half a file.
        prefix: prepended to every key (the release's `model.mm_projector.` by default; "" for none).
        dtype: optional cast (the release trained in bfloat16).
    """
    out = {prefix + k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in state.items()}
    with open_atomic(path) as f:
        torch.save(out, f)


def save_compressor_checkpoint(model, directory: str, extra: dict[str, Any] | None = None) -> None:
    """Save the trainable part of a HicomForConditionalPretraining: safetensors + mm_projector.bin +
    config.json (with `extra`, e.g. the step, merged under "extra")."""
    from safetensors.torch import save

    state = model.mm_projector_state_dict()
    write_atomic(os.path.join(directory, "compressor.safetensors"), save({k: v.contiguous() for k, v in state.items()}))
    save_mm_projector(state, os.path.join(directory, "mm_projector.bin"))
    meta = {"config": model.config.to_dict(), "extra": extra or {}}
    write_atomic(os.path.join(directory, "config.json"), json.dumps(meta, indent=2))


def load_checkpoint_config(directory: str):
    """HicomConfig stored by `save_compressor_checkpoint`."""
    from .config import HicomConfig

    with open(os.path.join(directory, "config.json")) as f:
        return HicomConfig.from_dict(json.load(f)["config"])
