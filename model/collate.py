"""From shard samples to model inputs; shared by the trainer and the tests.

A shard sample is one clip: `{"__key__": clip_id, "frames": [HxWx3 uint8 arrays | PIL images | JPEG
bytes], "json": {"id": ..., "conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}}`.
`expand_clip_sample` turns it into one training example per answer (same dict shape, conversation
cut after that answer), so a loader can shuffle examples; `collate` batches examples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .conversation import IGNORE_INDEX, expand_turns, extract_guide_text, tokenize_example
from .towers import FrameProcessor

logger = logging.getLogger(__name__)


def expand_clip_sample(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """One example per human/gpt pair: conversations[:2], conversations[:4], ... (release rule).

    Examples share the clip's frames (no copy). Keys are `<clip key>/<turn index>`. Raises
    ValueError on a malformed conversation, so the caller can record the reject.
    """
    meta = sample.get("json") or {}
    turns = expand_turns(meta.get("conversations") or [])
    key = sample.get("__key__", meta.get("id", ""))
    return [
        {"__key__": f"{key}/{i}", "frames": sample["frames"], "json": {**meta, "conversations": prefix}}
        for i, prefix in enumerate(turns)
    ]


@dataclass
class HicomProcessor:
    """Everything needed to turn examples into a batch: tokenizers, frame preprocessing, prompt rules."""

    tokenizer: Any  # LLM tokenizer (Qwen2 or the tiny offline one)
    guide_tokenizer: Any | None  # SigLIP text tokenizer; None when no level uses the instruction
    frames: FrameProcessor
    system_prompt: str | None = None  # None: the chat template's own default system prompt (release)
    guide_max_length: int = 64
    guide_text_quirks: bool = True

    def guide_text(self, conversations: list[dict]) -> str:
        """Cleaned last user question (the instruction the compressor is conditioned on)."""
        return extract_guide_text(conversations[-2]["value"], quirks=self.guide_text_quirks)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch examples (each a clip sample whose last turn is the target).

        Returns a dict of
            keys: list of example keys,
            pixel_values: (sum of frames, 3, S, S) float32, clips concatenated in order,
            num_frames: (B,) long, frames per example,
            input_ids / labels / attention_mask: (B, L) long, right padded; input_ids hold one
                VIDEO_TOKEN_INDEX per row where the visual tokens go,
            guide_input_ids / guide_attention_mask: (B, guide_max_length) long, or None without a
                guide (the mask is None too when the guide tokenizer returns none),
            guide_texts: list of instruction strings.
        """
        if not examples:
            raise ValueError("cannot collate an empty batch")
        pixels, ids, labels, guides, keys = [], [], [], [], []
        for ex in examples:
            conv = ex["json"]["conversations"]
            frames = ex["frames"]
            if len(frames) == 0:
                raise ValueError(f"example {ex.get('__key__')!r} has no frames")
            pixels.append(self.frames(frames))
            i, lab = tokenize_example(conv, self.tokenizer, self.system_prompt)
            ids.append(i)
            labels.append(lab)
            guides.append(self.guide_text(conv))
            keys.append(ex.get("__key__", ""))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
        label_t = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for b, (i, lab) in enumerate(zip(ids, labels)):
            input_ids[b, : len(i)] = i
            label_t[b, : len(lab)] = lab
            mask[b, : len(i)] = 1
        guide_ids = guide_mask = None
        if self.guide_tokenizer is not None:
            enc = self.guide_tokenizer(guides, padding="max_length", truncation=True,
                                       max_length=self.guide_max_length, return_tensors="pt")
            guide_ids, guide_mask = enc["input_ids"], enc.get("attention_mask")
        return {
            "keys": keys,
            "pixel_values": torch.cat(pixels),
            "num_frames": torch.tensor([p.shape[0] for p in pixels], dtype=torch.long),
            "input_ids": input_ids,
            "labels": label_t,
            "attention_mask": mask,
            "guide_input_ids": guide_ids,
            "guide_attention_mask": guide_mask,
            "guide_texts": guides,
        }


def collate(examples: list[dict[str, Any]], processor: HicomProcessor) -> dict[str, Any]:
    """Function form of `HicomProcessor.collate` (e.g. `functools.partial(collate, processor=...)`)."""
    return processor.collate(examples)


def move_batch(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Copy of the batch with every tensor moved to `device` (non-tensors kept)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
