"""The pair filter's rules: small classes with one `keep(pair, ctx) -> (bool, detail)` each (datatrove's
shape), applied in order by `stages/filter.py`; the first rule that drops a pair gives its `reason` code.

`ClipContext` carries what rules need beyond the pair: the clip's dense caption, the pairs kept so far, the
text embeddings and the pair's scores. Text helpers live in `stages/pair_text.py`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from schemas import caption_reasons as reasons
from schemas.caption import FilterConfig
from schemas.records import QAPair
from stages.pair_text import MC_ANSWER, MC_OPTION, MENTIONS_CAPTION, QUESTION_WORDS, REFUSAL, \
    guess_language, jaccard, lexical_grounding, normalize, repeated_ngram_frac, words

__all__ = ["QUESTION_WORDS", "ClipContext", "PairRule", "default_rules", "lexical_grounding", "phrase_pattern"]


@dataclass
class ClipContext:
    """What the rules of one clip see besides the pair."""

    caption: str = ""
    seen: list[QAPair] = field(default_factory=list)  # pairs kept so far (and unfiltered sources)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # of the pair being judged; rules may add to it


class PairRule:
    """One rule: `keep(pair, ctx)` returns (True, "") or (False, detail); a drop is recorded as `reason`."""

    reason: str = ""

    def keep(self, pair: QAPair, ctx: ClipContext) -> tuple[bool, str]:
        raise NotImplementedError


class NotEmpty(PairRule):
    reason = reasons.EMPTY_TEXT

    def keep(self, pair, ctx):
        if not pair.instruction.strip():
            return False, "empty instruction"
        return (False, "empty answer") if not pair.answer.strip() else (True, "")


class WordCount(PairRule):
    """Instruction or answer length in words, at least or at most `limit`."""

    def __init__(self, field_name: str, at_least: bool, limit: int, reason: str):
        self.field_name, self.at_least, self.limit, self.reason = field_name, at_least, limit, reason

    def keep(self, pair, ctx):
        n = len(words(getattr(pair, self.field_name)))
        if (n < self.limit) if self.at_least else (n > self.limit):
            return False, f"{n} words {'<' if self.at_least else '>'} {self.limit}"
        return True, ""


class Repetition(PairRule):
    reason = reasons.REPETITIVE

    def __init__(self, max_frac: float):
        self.max_frac = max_frac

    def keep(self, pair, ctx):
        for name in ("instruction", "answer"):
            frac = repeated_ngram_frac(getattr(pair, name))
            if frac > self.max_frac:
                return False, f"{name}: {frac:.2f} of 3-grams repeated"
        return True, ""


class Pattern(PairRule):
    """A regular expression that must not occur in the answer (nor, with `instruction`, the instruction)."""

    def __init__(self, pattern: re.Pattern, reason: str, instruction: bool = True):
        self.pattern, self.reason, self.instruction = pattern, reason, instruction

    def keep(self, pair, ctx):
        match = self.pattern.search(pair.answer) or (self.instruction and self.pattern.search(pair.instruction))
        return (False, f"matched {match.group(0)!r}") if match else (True, "")


def phrase_pattern(phrases: list[str]) -> re.Pattern:
    """Case-insensitive phrases on word boundaries, whitespace-tolerant (`not  provided` matches)."""
    alternatives = [r"\s+".join(map(re.escape, p.split())) for p in phrases if p.strip()]
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


class CopiesInstruction(PairRule):
    reason = reasons.ANSWER_COPIES_INSTRUCTION

    def __init__(self, overlap: float):
        self.overlap = overlap

    def keep(self, pair, ctx):
        overlap = jaccard(pair.instruction, pair.answer)
        n_instr, n_answer = len(words(pair.instruction)), len(words(pair.answer))
        if normalize(pair.answer) == normalize(pair.instruction) or (overlap >= self.overlap
                                                                     and n_answer <= n_instr * 1.2):
            return False, f"token overlap {overlap:.2f}"
        return True, ""


class Language(PairRule):
    reason = reasons.WRONG_LANGUAGE

    def __init__(self, target: str):
        self.target = target

    def keep(self, pair, ctx):
        for name in ("instruction", "answer"):
            lang = guess_language(getattr(pair, name))
            if lang is not None and lang != self.target:
                return False, f"{name} looks {lang}, target {self.target}"
        return True, ""


class MultipleChoiceForm(PairRule):
    """A multiple-choice pair has options and answers with one of them; other kinds carry no options."""

    reason = reasons.BAD_MULTIPLE_CHOICE

    def keep(self, pair, ctx):
        options = set(MC_OPTION.findall(pair.instruction))
        if pair.kind == "multiple_choice":
            letter = MC_ANSWER.match(pair.answer)
            if len(options) < 2 or not letter or letter.group(1) not in options:
                return False, f"options {sorted(options)}, answer {pair.answer[:20]!r}"
        elif len(options) >= 2:
            return False, f"options {sorted(options)} in a {pair.kind} pair"
        return True, ""


class SameInstruction(PairRule):
    """The same normalized instruction as a pair already kept in the clip."""

    reason = reasons.DUPLICATE_INSTRUCTION

    def keep(self, pair, ctx):
        key = normalize(pair.instruction)
        other = next((o for o in ctx.seen if normalize(o.instruction) == key), None)
        return (False, f"same instruction as {other.sample_id}") if other else (True, "")


class NearInstruction(PairRule):
    """Token overlap or embedding cosine with a kept instruction at or above the thresholds; records the
    highest cosine as `max_instruction_sim`."""

    reason = reasons.NEAR_DUPLICATE_INSTRUCTION

    def __init__(self, max_jaccard: float, max_cosine: float):
        self.max_jaccard, self.max_cosine = max_jaccard, max_cosine

    def keep(self, pair, ctx):
        best = 0.0
        for other in ctx.seen:
            if jaccard(pair.instruction, other.instruction) >= self.max_jaccard:
                return False, f"token overlap with {other.sample_id}"
            a, b = ctx.vectors.get(pair.instruction), ctx.vectors.get(other.instruction)
            if a is not None and b is not None:
                sim = float(a @ b)
                best = max(best, sim)
                if sim >= self.max_cosine:
                    ctx.scores["max_instruction_sim"] = sim
                    return False, f"cosine {sim:.3f} with {other.sample_id}"
        ctx.scores["max_instruction_sim"] = best
        return True, ""


class MinScore(PairRule):
    """A score below `limit` drops the pair (a missing score passes); `needs_caption`: only when the clip
    has a caption to be grounded in."""

    def __init__(self, score: str, limit: float, reason: str, needs_caption: bool = False):
        self.score, self.limit, self.reason, self.needs_caption = score, limit, reason, needs_caption

    def keep(self, pair, ctx):
        if self.needs_caption and not ctx.caption:
            return True, ""
        value = ctx.scores.get(self.score, 1.0)
        return (False, f"{self.score} {value:.3f} < {self.limit}") if value < self.limit else (True, "")


def default_rules(cfg: FilterConfig) -> list[PairRule]:
    """The filter's rules in order: form and content first, then duplicates, then encoder scores."""
    rules: list[PairRule] = [
        NotEmpty(),
        WordCount("instruction", True, cfg.min_instruction_words, reasons.INSTRUCTION_TOO_SHORT),
        WordCount("instruction", False, cfg.max_instruction_words, reasons.INSTRUCTION_TOO_LONG),
        WordCount("answer", True, cfg.min_answer_words, reasons.ANSWER_TOO_SHORT),
        WordCount("answer", False, cfg.max_answer_words, reasons.ANSWER_TOO_LONG),
        Repetition(cfg.max_repeated_ngram_frac),
        Pattern(REFUSAL, reasons.REFUSAL),
    ]
    rules.append(Pattern(MENTIONS_CAPTION, reasons.MENTIONS_CAPTION))
    if cfg.invalid_answer_phrases:
        rules.append(Pattern(phrase_pattern(cfg.invalid_answer_phrases), reasons.INVALID_ANSWER, instruction=False))
    rules.append(CopiesInstruction(cfg.copy_overlap))
    if cfg.target_language:
        rules.append(Language(cfg.target_language))
    rules += [MultipleChoiceForm(), SameInstruction(),
              NearInstruction(cfg.near_duplicate_jaccard, cfg.near_duplicate_cosine)]
    for score, limit, reason, needs_caption in (
            ("relevance", cfg.min_relevance, reasons.LOW_RELEVANCE, False),
            ("grounding", cfg.min_grounding, reasons.NOT_GROUNDED, True),
            ("lexical_grounding", cfg.min_lexical_grounding, reasons.NOT_GROUNDED_LEXICAL, True),
            ("instruction_grounding", cfg.min_instruction_grounding, reasons.INSTRUCTION_NOT_GROUNDED, True)):
        if limit > 0:
            rules.append(MinScore(score, limit, reason, needs_caption))
    return rules
