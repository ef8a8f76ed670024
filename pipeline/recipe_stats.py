"""The recipe section of `hicom stats`: a run's figures beside HICom-248K's published ones and, with
`--compare FILE.json`, beside the same figures of any LLaVA-format file (the release's
`248328_qa_llavaformat.json` or another extension), so a user sees how an extension differs from the original.

A LLaVA file has no clip times, so clip length is `n/a` for it; pairs are human -> gpt exchanges.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import duckdb

from pipeline.stats import format_table

log = logging.getLogger(__name__)
# HICom-248K as published (paper section 3.2): 248K clips, mean 25.67 s, 5-120 s, 739K pairs.
PAPER = {"clips": 248_000, "pairs": 739_000, "pairs_per_clip": 2.98, "clip_mean_s": 25.67,
         "clip_min_s": 5.0, "clip_max_s": 120.0}
LENGTH_BINS_S = (0, 5, 10, 20, 30, 60, 120)
PAIR_STAGES = ("instruct", "filter", "dedup")  # their failure rows drop pairs; the other stages drop clips


def _words(text: str) -> int:
    return len(text.split())


def _bin_label(i: int) -> str:
    lo = LENGTH_BINS_S[i]
    return f"{lo}-{LENGTH_BINS_S[i + 1]} s" if i + 1 < len(LENGTH_BINS_S) else f">= {lo} s"


_BIN_SQL = " ".join(f"WHEN duration_s < {hi} THEN {i}" for i, hi in enumerate(LENGTH_BINS_S[1:]))


def run_figures(con: duckdb.DuckDBPyConnection) -> dict:
    """Recipe figures of a run (its DuckDB tables from `pipeline.stats.connect`)."""
    clips, mean_s, min_s, max_s = con.execute(
        "SELECT count(*), avg(duration_s), min(duration_s), max(duration_s) FROM clips").fetchone()
    pairs, instr, answer = con.execute(
        "SELECT count(*), avg(len(string_split(trim(instruction), ' '))), "
        "avg(len(string_split(trim(answer), ' '))) FROM pairs").fetchone()
    bins = dict(con.execute(f"SELECT CASE {_BIN_SQL} ELSE {len(LENGTH_BINS_S) - 1} END, count(*) "
                            "FROM clips GROUP BY 1").fetchall())
    columns = {r[0] for r in con.execute("DESCRIBE videos").fetchall()}
    categories = con.execute(
        "SELECT category, count(*) FILTER (WHERE status = 'ok'), count(*) FROM videos WHERE category IS NOT NULL "
        "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall() if "category" in columns else []
    return {"clips": clips, "pairs": pairs, "pairs_per_clip": pairs / clips if clips else None,
            "clip_mean_s": mean_s, "clip_min_s": min_s, "clip_max_s": max_s,
            "instruction_words": instr, "answer_words": answer,
            "length_bins": {_bin_label(i): bins.get(i, 0) for i in range(len(LENGTH_BINS_S))},
            "categories": categories, "drops": drop_shares(con, clips, pairs)}


def drop_shares(con: duckdb.DuckDBPyConnection, clips: int, pairs: int) -> list[tuple]:
    """(stage, reason, count, share of that level's items): pair-level stages over pairs kept + dropped,
    the others over clips kept + dropped."""
    rows = con.execute("SELECT stage, reason, count(*) FROM failures GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2").fetchall()
    pair_drops = sum(n for stage, _, n in rows if stage in PAIR_STAGES)
    clip_drops = sum(n for stage, _, n in rows if stage not in PAIR_STAGES)
    out = []
    for stage, reason, n in rows:
        total = (pairs + pair_drops) if stage in PAIR_STAGES else (clips + clip_drops)
        out.append((stage, reason, n, f"{100 * n / total:.1f} %" if total else ""))
    return out


def llava_figures(path: str | Path) -> dict:
    """The same figures of a LLaVA-format JSON/JSONL file (clip = distinct `video`)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        samples = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        samples = json.loads(text)
    if not isinstance(samples, list):
        raise ValueError(f"{path}: a LLaVA file is a JSON list of samples")
    videos, instr, answer = set(), [], []
    for sample in samples:
        if not isinstance(sample, dict):
            continue
        videos.add(sample.get("video") or sample.get("image") or sample.get("id"))
        turns = sample.get("conversations") or []
        for ask, reply in zip(turns[::2], turns[1::2]):
            if ask.get("from") == "human" and reply.get("from") == "gpt":
                instr.append(_words(str(ask.get("value", "")).replace("<video>", "")))
                answer.append(_words(str(reply.get("value", ""))))
    clips = len(videos)
    return {"samples": len(samples), "clips": clips, "pairs": len(instr),
            "pairs_per_clip": len(instr) / clips if clips else None,
            "instruction_words": sum(instr) / len(instr) if instr else None,
            "answer_words": sum(answer) / len(answer) if answer else None}


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


FIGURES = [("clips", "clips"), ("pairs", "pairs"), ("pairs per clip", "pairs_per_clip"),
           ("clip length mean (s)", "clip_mean_s"), ("clip length min (s)", "clip_min_s"),
           ("clip length max (s)", "clip_max_s"), ("instruction words (mean)", "instruction_words"),
           ("answer words (mean)", "answer_words")]


def recipe_report(con: duckdb.DuckDBPyConnection, compare: str | Path | None = None) -> str:
    """The recipe section: the run vs the paper (and vs `compare`, a LLaVA-format file)."""
    run = run_figures(con)
    other = llava_figures(compare) if compare else None
    columns = ["figure", "run", *([Path(compare).name] if other else []), "HICom-248K (paper)"]
    rows = [(label, _fmt(run.get(key)), *([_fmt(other.get(key))] if other else []), _fmt(PAPER.get(key)))
            for label, key in FIGURES]
    parts = ["== Recipe: run vs HICom-248K ==\n" + format_table(columns, rows),
             "== Recipe: clip length histogram ==\n" + format_table(
                 ["length", "clips"], list(run["length_bins"].items())),
             "== Recipe: categories (videos) ==\n" + format_table(["category", "built", "scored"], run["categories"]),
             "== Recipe: dropped per filter ==\n" + format_table(["stage", "reason", "dropped", "share"],
                                                                run["drops"])]
    return "\n\n".join(parts)
