"""Ingest: list source videos from a directory, a manifest, or a LLaVA annotation file.

Every path is resolved under a declared data root; a path that escapes it is a failure, never a read.
The output is one `VideoRecord` per distinct source file (spans and annotation samples grouped onto it)
plus `Failure`s for inputs that cannot become a video.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import ValidationError

from schemas import reasons
from schemas.config import InputConfig
from schemas.records import AnnotationSample, Failure, Span, VideoRecord

log = logging.getLogger(__name__)
STAGE = "ingest"


@dataclass
class IngestResult:
    videos: list[VideoRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def video_id_for(relpath: str) -> str:
    """Stable, tar-key-safe id: a readable slug of the file stem plus a hash of the relative path."""
    stem = Path(relpath).stem
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-")[:48] or "video"
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{slug}-{digest}"


def printable(path: str) -> str:
    """A UTF-8-safe rendering of any path (undecodable bytes escaped) for records and logs."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


class PathResolver:
    """Resolves input paths under a data root and says why a path is refused."""

    def __init__(self, data_root: str | Path):
        self.root = Path(data_root).resolve()

    def resolve(self, given: str) -> tuple[Path | None, str | None, str]:
        """Return (path, None, relpath) when usable, else (None, reason, detail)."""
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", given) and not given.startswith("file://"):
            return None, reasons.UNSUPPORTED_URL, f"only local files are read: {given!r}"
        if given.startswith("file://"):
            given = given[len("file://"):]
        try:
            given.encode("utf-8")
        except UnicodeEncodeError:
            return None, reasons.BAD_NAME, f"file name is not valid UTF-8: {printable(given)!r}"
        candidate = Path(given)
        joined = candidate if candidate.is_absolute() else self.root / candidate
        try:
            resolved = joined.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # symlink loops raise here
            return None, reasons.UNREADABLE, f"cannot resolve {given!r}: {exc}"
        if not resolved.is_relative_to(self.root):
            reason = reasons.ABSOLUTE_PATH if candidate.is_absolute() else reasons.PATH_ESCAPES_ROOT
            return None, reason, f"{given!r} resolves outside the data root {str(self.root)!r}"
        if not resolved.exists():
            if joined.is_symlink():
                return None, reasons.UNREADABLE, f"broken or looping symlink: {given!r}"
            return None, reasons.MISSING_FILE, f"no such file: {given!r}"
        if not resolved.is_file():
            return None, reasons.NOT_A_FILE, f"not a regular file: {given!r}"
        if not os.access(resolved, os.R_OK):
            return None, reasons.UNREADABLE, f"permission denied: {given!r}"
        return resolved, None, resolved.relative_to(self.root).as_posix()


class VideoCollector:
    """Groups spans/samples by source file and turns refused paths into failures."""

    def __init__(self, resolver: PathResolver, hash_files: bool):
        self.resolver = resolver
        self.hash_files = hash_files
        self.by_path: dict[str, VideoRecord] = {}
        self.result = IngestResult()

    def fail(self, item_id: str, reason: str, detail: str, source: str = "") -> None:
        self.result.failures.append(
            Failure(item_id=item_id, stage=STAGE, reason=reason, detail=detail, source=printable(source))
        )

    def add(self, given: str, item_id: str | None, span: Span | None, metadata: dict[str, str]) -> None:
        path, reason, info = self.resolver.resolve(given)
        if path is None:
            ids = [s.id for s in span.samples] if span and span.samples else [item_id or printable(given)]
            for failed_id in ids:
                self.fail(failed_id, reason, info, given)
            return
        key = str(path)
        video = self.by_path.get(key)
        if video is None:
            video = VideoRecord(
                id=video_id_for(info),
                source=key,
                relpath=info,
                size_bytes=path.stat().st_size,
                metadata=metadata,
            )
            self.by_path[key] = video
        if span is not None:
            video.spans.append(span)

    def finish(self) -> IngestResult:
        for video in self.by_path.values():
            if self.hash_files:
                try:
                    video.sha256 = sha256_file(Path(video.source))
                except OSError as exc:
                    self.fail(video.id, reasons.UNREADABLE, str(exc), video.source)
                    continue
            self.result.videos.append(video)
        return self.result


def ingest_directory(cfg: InputConfig, directory: Path) -> IngestResult:
    """Every file under `directory` (recursive) whose extension is a video extension."""
    root = Path(cfg.data_root or directory)
    collector = VideoCollector(PathResolver(root), cfg.hash_files)
    exts = {e.lower() for e in cfg.extensions}
    links = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in exts:
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                links.append(full)  # after the regular files, so a file is ingested under its own name
            else:
                collector.add(os.path.relpath(full, root), None, None, {})
    for full in links:  # a link to a file already listed is a failure row, not a silent merge
        rel = os.path.relpath(full, root)
        target = collector.by_path.get(os.path.realpath(full))
        if target is not None:
            collector.fail(rel, reasons.DUPLICATE_SOURCE, f"symlink to {target.relpath}, ingested under that name",
                           rel)
        else:
            collector.add(rel, None, None, {})
    return collector.finish()


def _parse_timestamp(value: str) -> float:
    """'HH:MM:SS.mmm' (Panda-70M) or seconds -> seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    parts = [float(p) for p in str(value).split(":")]
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds


def _as_list(value):
    if isinstance(value, str) and value.strip().startswith("["):
        return ast.literal_eval(value)
    return value


def _read_manifest_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        return pacsv.read_csv(path).to_pylist()
    if suffix in {".jsonl", ".ndjson"}:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
        return rows
    raise ValueError(f"unsupported manifest format {suffix!r} (use .csv, .parquet or .jsonl)")


def _spans_from_row(cfg: InputConfig, row: dict) -> list[Span]:
    """Spans from start/end columns, or Panda-70M's `timestamp` + `caption` lists; [] means whole file."""
    if row.get(cfg.timestamp_column) is not None:
        stamps = _as_list(row[cfg.timestamp_column])
        captions = _as_list(row.get(cfg.caption_column)) or [None] * len(stamps)
        if isinstance(captions, str):
            captions = [captions] * len(stamps)
        return [
            Span(start_s=_parse_timestamp(a), end_s=_parse_timestamp(b), caption=c)
            for (a, b), c in zip(stamps, captions, strict=True)
        ]
    start, end = row.get(cfg.start_column), row.get(cfg.end_column)
    caption = row.get(cfg.caption_column)
    if start is None and end is None:
        return [Span(start_s=0.0, end_s=None, caption=caption)] if caption else []
    return [Span(start_s=float(start or 0.0), end_s=None if end is None else float(end), caption=caption)]


def ingest_manifest(cfg: InputConfig, manifest: Path) -> IngestResult:
    """A CSV/parquet/JSONL table: one row per video or per span."""
    root = Path(cfg.data_root or manifest.parent)
    collector = VideoCollector(PathResolver(root), cfg.hash_files)
    for line_no, row in enumerate(_read_manifest_rows(manifest)):
        column = cfg.path_column if cfg.path_column in row else "url"
        given = row.get(column)
        item_id = f"{manifest.name}:{line_no}"
        if not given:
            collector.fail(item_id, reasons.BAD_ANNOTATION, f"row has no {cfg.path_column!r} value")
            continue
        try:
            spans = [s.model_copy(update={"row": line_no}) for s in _spans_from_row(cfg, row)]
        except (ValueError, SyntaxError, TypeError, ValidationError) as exc:
            collector.fail(item_id, reasons.BAD_ANNOTATION, f"bad span/caption columns: {exc}", str(given))
            continue
        metadata = {
            k: str(v)
            for k, v in row.items()
            if v is not None and k not in {column, cfg.start_column, cfg.end_column, cfg.caption_column,
                                           cfg.timestamp_column}
        }
        if not spans:
            collector.add(str(given), item_id, None, metadata)
        for span in spans:
            collector.add(str(given), item_id, span, metadata)
    return collector.finish()


def _read_llava_entries(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        entries = []
        for line_no, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                entries.append(_BadEntry(f"{path.name}:{line_no}", f"invalid JSON: {exc}"))
        return entries
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("a LLaVA annotation file is a JSON list of samples")
    return data


@dataclass
class _BadEntry:
    item_id: str
    detail: str


def ingest_llava(cfg: InputConfig, annotations: Path, video_root: Path) -> IngestResult:
    """LLaVA-format samples (`id`, `video`, `conversations`): HICom-248K's release format.

    Each sample is kept whole (multi-turn included) on a whole-file span of its video.
    """
    collector = VideoCollector(PathResolver(video_root), cfg.hash_files)
    try:
        entries = _read_llava_entries(annotations)
    except (ValueError, UnicodeDecodeError) as exc:
        collector.fail(annotations.name, reasons.BAD_ANNOTATION, f"cannot read annotation file: {exc}")
        return collector.finish()
    for index, entry in enumerate(entries):
        if isinstance(entry, _BadEntry):
            collector.fail(entry.item_id, reasons.BAD_ANNOTATION, entry.detail)
            continue
        item_id = str(entry.get("id", f"{annotations.name}:{index}")) if isinstance(entry, dict) else (
            f"{annotations.name}:{index}")
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
                raise ValueError("sample needs a string 'video' field")
            sample = AnnotationSample(id=item_id, conversations=entry["conversations"])
            if not sample.conversations or sample.conversations[0].speaker != "human":
                raise ValueError("conversations must start with a human turn")
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            collector.fail(item_id, reasons.BAD_ANNOTATION, str(exc).splitlines()[0])
            continue
        collector.add(entry["video"], item_id, Span(start_s=0.0, end_s=None, samples=[sample]), {})
    return collector.finish()


def detect_kind(path: Path) -> str:
    if path.is_dir():
        return "directory"
    if path.suffix.lower() == ".json":
        return "llava"
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "{}")
        try:
            return "llava" if "conversations" in json.loads(first) else "manifest"
        except json.JSONDecodeError:
            return "llava"
    return "manifest"


def ingest(cfg: InputConfig) -> IngestResult:
    """Dispatch on `cfg.kind` (auto-detected from the path when `auto`)."""
    if not cfg.path:
        raise ValueError("input.path is not set (give --input or set it in the config)")
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"input path does not exist: {path}")
    kind = detect_kind(path) if cfg.kind == "auto" else cfg.kind
    log.info("ingesting %s as %s", path, kind)
    if kind == "directory":
        return ingest_directory(cfg, path)
    if kind == "manifest":
        return ingest_manifest(cfg, path)
    if not cfg.data_root:
        raise ValueError("a LLaVA annotation input needs input.data_root (the clip root, e.g. split_videos/)")
    return ingest_llava(cfg, path, Path(cfg.data_root))

