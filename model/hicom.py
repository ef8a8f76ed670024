"""HICom conditional pre-training model: frozen SigLIP towers and Qwen2 LLM, trainable compressor.

    frames ──SigLIP vision──> VALUE, KEY ─┐
    last question ──SigLIP text──> guide ─┴─> compressor (mm_projector) ──> visual tokens ──> Qwen2 ──> loss

Only `mm_projector` has trainable parameters. `forward(batch)` takes the dict from
`HicomProcessor.collate` and returns the scalar LM loss on the last answer.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint import load_mm_projector_state, save_mm_projector
from .collate import HicomProcessor
from .compressor import HicomCompressor
from .config import HicomConfig
from .llm import HicomLLM
from .towers import GuideEncoder, VisionTower

logger = logging.getLogger(__name__)


class HicomForConditionalPretraining(nn.Module):
    """Towers + compressor + LLM. Build it with `model.presets.build_model(config)`."""

    def __init__(self, config: HicomConfig, vision_tower: VisionTower, guide_encoder: GuideEncoder | None,
                 llm: HicomLLM, processor: HicomProcessor):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.guide_encoder = guide_encoder
        self.mm_projector = HicomCompressor(config.compressor)
        self.llm = llm
        self.processor = processor
        self.requires_grad_(False)
        self.mm_projector.requires_grad_(True)
        # never-read parameters stay frozen, so DDP needs no find_unused_parameters and the
        # optimiser skips them; they are still saved and loaded with the rest of mm_projector
        unused = set(self.mm_projector.unused_parameter_names())
        for name, param in self.mm_projector.named_parameters():
            if name in unused:
                param.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "HicomForConditionalPretraining":
        """Only the compressor switches mode; frozen parts stay in eval (the LLM follows `mode`
        when gradient checkpointing is on, since HF only checkpoints in training mode)."""
        self.training = mode
        self.mm_projector.train(mode)
        self.vision_tower.eval()
        if self.guide_encoder is not None:
            self.guide_encoder.eval()
        self.llm.train(mode and self.llm.gradient_checkpointing)
        return self

    # --- parameters and weights ---------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser should update: the compressor's (minus never-read ones)."""
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def mm_projector_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Compressor weights under the release's names (`local_compressor.readout.0.weight`, ...),
        detached on CPU; `prefix="model.mm_projector."` gives full-model names."""
        return {prefix + k: v.detach().cpu() for k, v in self.mm_projector.state_dict().items()}

    def save_mm_projector(self, path: str, prefix: str = "model.mm_projector.") -> None:
        """Write `mm_projector.bin` as the release does (full-model key names by default)."""
        save_mm_projector(self.mm_projector_state_dict(), path, prefix=prefix)

    def load_mm_projector(self, source: str | dict[str, torch.Tensor], strict: bool = True):
        """Load release-named compressor weights from a `mm_projector.bin` path or a state dict.

        Keys may carry any prefix ending in `mm_projector.`; tensors are cast to the compressor's
        dtype. Returns the (missing, unexpected) keys result; with `strict` a mismatch raises.
        """
        state = load_mm_projector_state(source)
        dtype = self.mm_projector.dtype
        state = {k: v.to(dtype) for k, v in state.items()}
        return self.mm_projector.load_state_dict(state, strict=strict)

    def load_stage1(self, source: str | dict[str, torch.Tensor]) -> list[str]:
        """Start from a stage-1 (alignment) `mm_projector.bin` in the release's format; returns the keys it lacked.

        Exactly the parameters the release's wiring does not have (the paper's `guide_injector.*`) may be
        missing; any other missing or unexpected key is an error. A new injector starts as identity
        (`GuideInjector.start_as_identity`), and an all-zero global `query` (the release never reads it
        under `direct` wiring, so stage 1 leaves it at its zero init) gets the release's Linear init
        (trunc-normal, std 0.02), so the global queries differ at step 0.
        """
        state = load_mm_projector_state(source)
        expected = set(self.mm_projector.state_dict())
        with torch.device("meta"):
            release_keys = set(HicomCompressor(replace(self.config.compressor, behaviour="release")).state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if unexpected or missing - (expected - release_keys):
            raise ValueError(f"{source if isinstance(source, str) else 'stage-1 state'} does not fit this compressor "
                             f"({self.config.compressor.spec}, {self.config.compressor.behaviour}): missing "
                             f"{sorted(missing - (expected - release_keys))}, unexpected {sorted(unexpected)}")
        self.load_mm_projector(state, strict=False)
        for name in ("local_compressor", "global_compressor"):
            injector = getattr(getattr(self.mm_projector, name), "guide_injector", None)
            if injector is not None and any(k.startswith(f"{name}.guide_injector.") for k in missing):
                injector.start_as_identity()
        gc = self.mm_projector.global_compressor
        if missing and gc is not None and not gc.query.detach().any():
            with torch.no_grad():
                nn.init.trunc_normal_(gc.query, std=0.02)
            logger.info("global query was all zero in the stage-1 file: initialised (trunc-normal, std 0.02)")
        logger.info("loaded stage-1 weights; new keys initialised here: %s", sorted(missing))
        return sorted(missing)

    # --- forward ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.mm_projector.parameters()).device

    def encode_visual(self, pixel_values: torch.Tensor, num_frames: torch.Tensor,
                      guide_input_ids: torch.Tensor | None = None,
                      guide_attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Visual tokens per example: a list of (N_i, llm_hidden) tensors (grad flows to the compressor)."""
        cfg = self.config.compressor
        need_key = cfg.use_local and cfg.local_guide_mode != "none"
        value, key = self.vision_tower(pixel_values, with_key=need_key)
        guide = guide_tokens = None
        if cfg.uses_guide:
            if self.guide_encoder is None or guide_input_ids is None:
                raise ValueError("this compressor uses the instruction but the batch has no guide_input_ids")
            guide, guide_tokens = self.guide_encoder(guide_input_ids, guide_attention_mask,
                                                     with_tokens=cfg.uses_guide_tokens)
        counts = [int(n) for n in num_frames]
        if len(set(counts)) == 1:  # the usual case: one compressor call on a view, no copies
            shape = (len(counts), counts[0], *value.shape[1:])
            tokens = self.mm_projector(value.view(shape), key.view(*shape[:4], -1) if key is not None else None,
                                       guide, guide_tokens)
            return list(tokens.unbind(0))
        values = value.split(counts)
        keys = key.split(counts) if key is not None else [None] * len(counts)
        out: list[torch.Tensor | None] = [None] * len(counts)
        # mixed frame counts: examples with the same count go through the compressor together
        for t in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == t]
            sel = torch.tensor(idx, device=value.device)
            tokens = self.mm_projector(
                torch.stack([values[i] for i in idx]),
                torch.stack([keys[i] for i in idx]) if key is not None else None,
                guide.index_select(0, sel) if guide is not None else None,
                guide_tokens.index_select(0, sel) if guide_tokens is not None else None,
            )
            for j, i in enumerate(idx):
                out[i] = tokens[j]
        return out  # type: ignore[return-value]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scalar LM loss over the last answer of each example in a collated batch."""
        device = self.device

        def opt(name):
            value = batch.get(name)
            return value.to(device) if value is not None else None

        visual = self.encode_visual(batch["pixel_values"].to(device), batch["num_frames"],
                                    opt("guide_input_ids"), opt("guide_attention_mask"))
        return self.llm(batch["input_ids"].to(device), batch["labels"].to(device),
                        batch["attention_mask"].to(device), visual)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Shortcut for `self.processor.collate(examples)`."""
        return self.processor.collate(examples)
