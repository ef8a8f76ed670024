"""LLaVA annotation reader: samples (`id`, `video`, `conversations`), HICom-248K's release format.

A `.json` file is one JSON list (read whole, in the worker that reads it); `.jsonl` is one sample per line.
Each sample is kept whole (multi-turn included) on a whole-file span of its video; its row is its 1-based
position in the list (or its line in a `.jsonl`).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import BinaryIO

from pydantic import ValidationError

from schemas import reasons
from schemas.records import AnnotationSample, Failure, Span
from stages.ingest.entries import Entry, failure, row_item_id
from stages.ingest.manifest import RawRow, read_rows


def read_samples(f: BinaryIO, name: str) -> Iterator[RawRow]:
    """Every sample of annotation file `name` with its row; a bad line or file is an error row."""
    if name.lower().endswith((".jsonl", ".ndjson")):
        yield from read_rows(f, name)
        return
    try:
        data = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        yield RawRow(0, error=f"cannot read annotation file: {exc}")
        return
    if not isinstance(data, list):
        yield RawRow(0, error="cannot read annotation file: a LLaVA annotation file is a JSON list of samples")
        return
    for index, entry in enumerate(data, start=1):
        if isinstance(entry, dict):
            yield RawRow(index, record=entry)
        else:
            yield RawRow(index, error=f"sample {index} is a JSON {type(entry).__name__}, not an object")


def entries_from_sample(file_name: str, raw: RawRow) -> list[Entry] | list[Failure]:
    """The one entry of a sample (a whole-file span carrying it), or its failure."""
    fallback_id = row_item_id(file_name, raw.row) if raw.row else file_name
    entry = raw.record
    if entry is None:
        return [failure(fallback_id, reasons.BAD_ANNOTATION, raw.error or "unreadable sample", file_name)]
    item_id = str(entry.get("id", fallback_id))
    try:
        if not isinstance(entry.get("video"), str):
            raise ValueError("sample needs a string 'video' field")
        sample = AnnotationSample(id=item_id, conversations=entry["conversations"])
        if not sample.conversations or sample.conversations[0].speaker != "human":
            raise ValueError("conversations must start with a human turn")
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        return [failure(item_id, reasons.BAD_ANNOTATION, str(exc).splitlines()[0])]
    span = Span(start_s=0.0, end_s=None, samples=[sample], row=raw.row, item_id=item_id)
    return [Entry(entry["video"], item_id, raw.row, 0, span, {})]
