"""What an input config names: its kind, the files to read, the data root; and the one-row-at-a-time logic
shared by the in-process and the Ray readers (raw row -> entries -> located entries)."""
from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from schemas import reasons
from schemas.config import InputConfig
from schemas.records import Failure
from stages.ingest import llava, manifest
from stages.ingest.entries import Entry, failure, locate
from stages.ingest.paths import Located, ObjectResolver, PathResolver, resolver_for
from stages.storage import Storage, is_uri, redact

log = logging.getLogger(__name__)
ANNOTATION_SUFFIXES = (".json", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class InputPlan:
    """A resolved input: `kind`, the folder it lives in, the files to read there, the data root."""

    kind: str  # directory | manifest | llava
    folder: str  # the input directory, or the folder holding the manifest/annotation files
    files: tuple[str, ...]  # names under `folder` (manifest/llava); empty for a directory
    data_root: str

    def resolver(self) -> PathResolver | ObjectResolver:
        return resolver_for(self.data_root)

    def entries(self, cfg: InputConfig, file_name: str, raw: manifest.RawRow) -> list[Entry] | list[Failure]:
        if self.kind == "llava":
            return llava.entries_from_sample(file_name, raw)
        return manifest.entries_from_row(cfg, file_name, raw)

    def read(self, f, file_name: str) -> Iterator[manifest.RawRow]:
        return llava.read_samples(f, file_name) if self.kind == "llava" else manifest.read_rows(f, file_name)


def remote_input(cfg: InputConfig) -> bool:
    """Whether the input or its data root is on an object store (sources must be fetched before FFmpeg)."""
    return any(is_uri(p) and not p.startswith("file://") for p in (cfg.path or "", cfg.data_root or ""))


def _first_line(storage: Storage, name: str) -> str:
    with storage.open_read(name) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8", errors="replace"):
            if line.strip():
                return line
    return "{}"


def detect_kind(path: str) -> str:
    """`directory` for a folder; `llava` for .json, or .jsonl whose first sample has `conversations`;
    else `manifest`."""
    storage = Storage.from_uri(path)
    if storage.fs.get_file_info(storage.fs_path()).type == pafs.FileType.Directory:
        return "directory"
    folder, name = posixpath.split(storage.uri())
    lower = name.lower()
    if lower.endswith(".json"):
        return "llava"
    if lower.endswith((".jsonl", ".ndjson")):
        try:
            return "llava" if "conversations" in json.loads(_first_line(Storage.from_uri(folder), name)) else "manifest"
        except (json.JSONDecodeError, TypeError):
            return "llava"
    return "manifest"


def plan(cfg: InputConfig) -> InputPlan:
    """Resolve `cfg` into an `InputPlan`; a missing input or an impossible config fails here, loudly."""
    if not cfg.path:
        raise ValueError("input.path is not set (give --input or set it in the config)")
    storage = Storage.from_uri(cfg.path)
    if not storage.exists(""):
        raise FileNotFoundError(f"input path does not exist: {storage.uri()}")
    kind = detect_kind(cfg.path) if cfg.kind == "auto" else cfg.kind
    is_dir = storage.fs.get_file_info(storage.fs_path()).type == pafs.FileType.Directory
    if kind == "directory":
        return InputPlan(kind, cfg.path, (), cfg.data_root or cfg.path)
    if is_dir:  # a folder of manifest parts (or annotation files): every file of a known format in it
        known = manifest.FORMATS if kind == "manifest" else dict.fromkeys(ANNOTATION_SUFFIXES)
        files = tuple(n for n in storage.list("") if posixpath.splitext(n)[1].lower() in known)
        folder = cfg.path
    else:
        folder, name = _split(cfg.path)
        files = (name,)
    if kind == "llava" and not cfg.data_root:
        raise ValueError("a LLaVA annotation input needs input.data_root (the clip root, e.g. split_videos/)")
    return InputPlan(kind, folder, files, cfg.data_root or folder)


def _split(path: str) -> tuple[str, str]:
    """(folder, name) of a file path or URI; a URI keeps its query (pyarrow options) on the folder part."""
    if not is_uri(path):
        folder, name = posixpath.split(path.rstrip("/"))
        return folder or ".", name
    base, sep, query = path.partition("?")
    folder, name = posixpath.split(base.rstrip("/"))
    return folder + (sep + query if sep else ""), name


def located_entries(input_plan: InputPlan, cfg: InputConfig, file_name: str, raw: manifest.RawRow,
                    resolver) -> Iterator[tuple[Entry, Located] | Failure]:
    """The located entries of one raw row, or its failures."""
    for item in input_plan.entries(cfg, file_name, raw):
        if isinstance(item, Failure):
            yield item
            continue
        found = locate(resolver, item)
        if isinstance(found, Located):
            yield item, found
        else:
            yield from found


def unreadable_file(file_name: str, exc: Exception) -> Failure:
    return failure(file_name, reasons.MALFORMED_ROW, f"cannot open {file_name}: {redact(str(exc))}", file_name)
