"""Frozen Qwen2 causal LM with the compressed visual tokens spliced in at `<video>`.

The collate step leaves one VIDEO_TOKEN_INDEX sentinel per sample in `input_ids`; `splice` replaces
it with that sample's visual tokens (labels there are IGNORE_INDEX), truncates to `max_length` and
right-pads the batch. The loss is the mean token cross-entropy over the supervised (last answer)
tokens of the batch, as Hugging Face computes it, but the LM head runs only on those positions so a
4k-token sequence never materialises full-vocabulary logits.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .conversation import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from .towers import require_dir

logger = logging.getLogger(__name__)


class HicomLLM(nn.Module):
    """Wraps a `Qwen2ForCausalLM` (frozen); gradients still flow into the spliced visual tokens."""

    def __init__(self, causal_lm: nn.Module, max_length: int = 4096, gradient_checkpointing: bool = False):
        super().__init__()
        self.causal_lm = causal_lm
        self.max_length = max_length
        self.causal_lm.requires_grad_(False)
        self.causal_lm.config.use_cache = False
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            # non-reentrant checkpointing lets grads reach the inputs although no LLM weight trains
            if hasattr(causal_lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
                causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def hidden_size(self) -> int:
        return self.causal_lm.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.causal_lm.get_input_embeddings().weight.dtype

    def splice(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
               visual: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace each row's sentinel with its visual tokens.

        Args:
            input_ids, labels, attention_mask: (B, L) from the collate (right padded).
            visual: B tensors (N_i, hidden) of visual tokens.
        Returns:
            inputs_embeds (B, L', hidden), labels (B, L'), attention_mask (B, L') with L' <= max_length.
        """
        embed = self.causal_lm.get_input_embeddings()
        embeds = embed(input_ids.clamp(min=0))
        rows_e, rows_l = [], []
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].sum())
            ids, lab, emb = input_ids[b, :n], labels[b, :n], embeds[b, :n]
            where = (ids == VIDEO_TOKEN_INDEX).nonzero().flatten()
            if len(where) != 1:
                raise ValueError(f"row {b}: expected one <video> placeholder, found {len(where)}")
            p = int(where[0])
            vis = visual[b].to(emb.dtype)
            rows_e.append(torch.cat([emb[:p], vis, emb[p + 1:]])[: self.max_length])
            ignore = lab.new_full((vis.shape[0],), IGNORE_INDEX)
            rows_l.append(torch.cat([lab[:p], ignore, lab[p + 1:]])[: self.max_length])
        length = max(r.shape[0] for r in rows_e)
        out_e = embeds.new_zeros(len(rows_e), length, embeds.shape[-1])
        out_l = labels.new_full((len(rows_l), length), IGNORE_INDEX)
        out_m = torch.zeros(len(rows_e), length, dtype=torch.long, device=input_ids.device)
        for b, (e, lab) in enumerate(zip(rows_e, rows_l)):
            out_e[b, : e.shape[0]] = e
            out_l[b, : lab.shape[0]] = lab
            out_m[b, : e.shape[0]] = 1
        return out_e, out_l, out_m

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                visual: list[torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of next-token prediction over the supervised tokens (scalar).

        A batch whose answers were all truncated away gives a zero loss that still has a graph.
        """
        embeds, labels, mask = self.splice(input_ids, labels, attention_mask, visual)
        hidden = self.causal_lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        if not bool(keep.any()):
            logger.warning("batch has no supervised tokens after truncation to %d", self.max_length)
            return hidden.sum() * 0.0
        logits = self.causal_lm.lm_head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, target[keep])


def load_qwen2(path: str, dtype: torch.dtype):
    """Qwen2 causal LM and its tokenizer from a local directory (`local_files_only=True`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_dir(path, "LLM (Qwen2)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer
