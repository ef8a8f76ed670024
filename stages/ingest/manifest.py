"""Manifest reader: CSV, JSONL or parquet tables with one row per video or per span (Panda-70M metadata).

Rows are streamed from a binary file with their row number: the 1-based line for CSV and JSONL (the header
is line 1), the 1-based row for parquet. A malformed row (wrong column count, a line that is not a JSON
object) becomes a `malformed_manifest_row` failure with its line number; the rest of the file is still read.
"""
from __future__ import annotations

import ast
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow.parquet as pq
from pydantic import ValidationError

from schemas import reasons
from schemas.config import InputConfig
from schemas.records import Failure, Span
from stages.ingest.entries import Entry, failure, row_item_id

FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_BATCH_ROWS = 4096


@dataclass
class RawRow:
    """One row as read: its record, or why it could not be read."""

    row: int
    record: dict | None = None
    error: str | None = None


def manifest_format(name: str) -> str:
    suffix = name[name.rfind("."):].lower() if "." in name else ""
    if suffix not in FORMATS:
        raise ValueError(f"unsupported manifest format {suffix!r} (use .csv, .parquet or .jsonl)")
    return FORMATS[suffix]


def _csv_rows(f: BinaryIO) -> Iterator[RawRow]:
    # Python's csv module, not pyarrow's: it reports the line of every row, good or malformed.
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    for fields in reader:
        if not fields:
            continue  # a blank line
        line = reader.line_num
        if len(fields) != len(header):
            yield RawRow(line, error=f"line {line}: {len(fields)} fields, the header has {len(header)}")
            continue
        yield RawRow(line, record={k: (v if v != "" else None) for k, v in zip(header, fields)})


def _jsonl_rows(f: BinaryIO) -> Iterator[RawRow]:
    for line_no, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape"), start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRow(line_no, error=f"line {line_no}: invalid JSON: {exc}")
            continue
        if not isinstance(record, dict):
            yield RawRow(line_no, error=f"line {line_no}: a JSON {type(record).__name__}, not an object")
            continue
        yield RawRow(line_no, record=record)


def _parquet_rows(f: BinaryIO) -> Iterator[RawRow]:
    row = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield RawRow(row, record=record)


def read_rows(f: BinaryIO, name: str) -> Iterator[RawRow]:
    """Every row of manifest `name` read from `f`; a file that cannot be read ends with one error row."""
    reader = {"csv": _csv_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows}[manifest_format(name)]
    last = 0
    try:
        for raw in reader(f):
            last = raw.row
            yield raw
    except (OSError, ValueError, csv.Error) as exc:  # a truncated parquet, a CSV with a NUL byte, ...
        yield RawRow(last + 1, error=f"cannot read {name} after row {last}: {exc}")


def _parse_timestamp(value) -> float:
    """'HH:MM:SS.mmm' (Panda-70M) or seconds -> seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    seconds = 0.0
    for part in str(value).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _as_list(value):
    if isinstance(value, str) and value.strip().startswith("["):
        return ast.literal_eval(value)
    return value


def spans_from_row(cfg: InputConfig, row: dict, line: int) -> list[Span]:
    """Spans from start/end columns, or Panda-70M's `timestamp` + `caption` lists; [] means whole file."""
    if row.get(cfg.timestamp_column) is not None:
        stamps = _as_list(row[cfg.timestamp_column])
        captions = _as_list(row.get(cfg.caption_column)) or [None] * len(stamps)
        if isinstance(captions, str):
            captions = [captions] * len(stamps)
        return [Span(start_s=_parse_timestamp(a), end_s=_parse_timestamp(b), caption=c, row=line)
                for (a, b), c in zip(stamps, captions, strict=True)]
    start, end = row.get(cfg.start_column), row.get(cfg.end_column)
    caption = row.get(cfg.caption_column)
    if start is None and end is None:
        return [Span(start_s=0.0, end_s=None, caption=caption, row=line)] if caption else []
    return [Span(start_s=float(start or 0.0), end_s=None if end is None else float(end), caption=caption,
                 row=line)]


def entries_from_row(cfg: InputConfig, file_name: str, raw: RawRow) -> list[Entry] | list[Failure]:
    """The entries of one manifest row (one per span, or one whole-file entry), or its failure."""
    item_id = row_item_id(file_name, raw.row)
    if raw.record is None:
        return [failure(item_id, reasons.MALFORMED_ROW, raw.error or "unreadable row", file_name)]
    row = raw.record
    column = cfg.path_column if cfg.path_column in row else "url"
    given = row.get(column)
    if not given:
        return [failure(item_id, reasons.BAD_ANNOTATION, f"row has no {cfg.path_column!r} value", file_name)]
    given = str(given)
    try:
        spans = spans_from_row(cfg, row, raw.row)
    except (ValueError, SyntaxError, TypeError, ValidationError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [failure(item_id, reasons.BAD_ANNOTATION, f"bad span/caption columns: {detail}", given)]
    skip = {column, cfg.start_column, cfg.end_column, cfg.caption_column, cfg.timestamp_column}
    metadata = {k: str(v) for k, v in row.items() if v is not None and k not in skip}
    if not spans:
        return [Entry(given, item_id, raw.row, 0, None, metadata)]
    if len(spans) > 1:  # each span of the row is its own item
        spans = [span.model_copy(update={"item_id": row_item_id(file_name, raw.row, i)}) for i, span in enumerate(spans)]
    else:
        spans = [spans[0].model_copy(update={"item_id": item_id})]
    return [Entry(given, span.item_id, raw.row, i, span, metadata) for i, span in enumerate(spans)]
