"""The pair filter's rules: small classes with one `keep(pair, ctx) -> (bool, detail)` each (datatrove's
shape), applied in order by `stages/filter.py`; the first rule that drops a pair gives its `reason` code.

`ClipContext` carries what rules need beyond the pair: the clip's dense caption, the pairs kept so far, the
text embeddings and the pair's scores. Text helpers (word lists, duplicate keys, lexical grounding with a
real tokenizer and stemmer) live here too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from schemas import caption_reasons as reasons
from schemas.caption import FilterConfig
from schemas.records import QAPair

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
_ARTICLES = {"a", "an", "the"}
_REFUSAL = re.compile(
    r"\bI (?:cannot|can't|can not|am unable to|'m unable to|am not able to|do not|don't) "
    r"(?:see|view|watch|determine|tell|provide|access|answer|know)\b|\bas an ai\b|\bI'?m sorry\b|\bI am sorry\b"
    r"|\bunable to (?:determine|tell|see)\b|\bnot possible to (?:tell|determine|know)\b"
    r"|\bno information (?:about|on|is)\b|\bcannot be determined\b", re.IGNORECASE)
_MENTIONS_CAPTION = re.compile(
    r"\b(?:the|this|given) (?:description|caption|text|transcript)\b|\baccording to the\b", re.IGNORECASE)
MC_OPTION = re.compile(r"(?:^|\s)\(?([A-D])[.):]\s")
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
QUESTION_WORDS = set("what which who whom whose where when why how many much does did do can could would is are "
                     "describe tell explain happens happen happening clip video scene seen see shown visible "
                     "detail details look looks like kind type doing goes going end beginning start first "
                     "next after before then during while appear appears main person people someone thing "
                     "things object objects behavior behaviour appearance setting background action actions "
                     "activity activities color colour size wearing wear".split())


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


@lru_cache(maxsize=1)
def _nlp():
    """NLTK's Treebank tokenizer (splits possessives "rabbit's" -> "rabbit" "'s") and the Snowball English
    stemmer (plurals and verb forms: "rabbits" -> "rabbit"); both are rule sets, no data files."""
    from nltk.stem.snowball import SnowballStemmer
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer(), SnowballStemmer("english")


def terms(text: str, ignore: set[str] = frozenset()) -> list[str]:
    """Stemmed content words: tokens split at hyphens, without punctuation, clitics, stopwords and `ignore`."""
    tokenizer, stemmer = _nlp()
    out = []
    for token in tokenizer.tokenize(text.lower()):
        for part in token.split("-"):
            if len(part) > 2 and part.isalpha() and part not in _STOPSETS["en"] and part not in ignore:
                out.append(stemmer.stem(part))
    return out


def lexical_grounding(text: str, caption: str, ignore: set[str] = frozenset()) -> float:
    """Share of the text's content terms (not stopwords or `ignore`) that occur in the caption."""
    cap = set(terms(caption))
    content = terms(text, ignore)
    return sum(1 for w in content if w in cap) / len(content) if content else 1.0


def question_part(instruction: str) -> str:
    """The instruction without multiple-choice options (distractors are not in the caption by design)."""
    match = MC_OPTION.search(instruction)
    return instruction[:match.start()] if match else instruction


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
            letter = _MC_ANSWER.match(pair.answer)
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
        Pattern(_REFUSAL, reasons.REFUSAL),
    ]
    rules.append(Pattern(_MENTIONS_CAPTION, reasons.MENTIONS_CAPTION))
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
