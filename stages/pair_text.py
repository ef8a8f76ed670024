"""Text helpers of the pair filter: word lists, duplicate keys, repetition, a language guess, and lexical
grounding with a real tokenizer and stemmer (NLTK's Treebank rules and Snowball English stemmer)."""
from __future__ import annotations

import re
from functools import lru_cache

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
_ARTICLES = {"a", "an", "the"}
REFUSAL = re.compile(
    r"\bI (?:cannot|can't|can not|am unable to|'m unable to|am not able to|do not|don't) "
    r"(?:see|view|watch|determine|tell|provide|access|answer|know)\b|\bas an ai\b|\bI'?m sorry\b|\bI am sorry\b"
    r"|\bunable to (?:determine|tell|see)\b|\bnot possible to (?:tell|determine|know)\b"
    r"|\bno information (?:about|on|is)\b|\bcannot be determined\b", re.IGNORECASE)
MENTIONS_CAPTION = re.compile(
    r"\b(?:the|this|given) (?:description|caption|text|transcript)\b|\baccording to the\b", re.IGNORECASE)
MC_OPTION = re.compile(r"(?:^|\s)\(?([A-D])[.):]\s")
MC_ANSWER = re.compile(r"^\s*\(?([A-D])\b[.):]?")
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
