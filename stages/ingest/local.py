"""In-process ingest: the same readers, locating and grouping as `input_dataset`, run in this process.

For tests, benches and small inputs. Unlike the Ray path it also hashes local sources here (when
`input.hash_files`); the build hashes in its workers instead (`source.local_source`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from schemas import reasons
from schemas.config import InputConfig
from schemas.records import Failure, VideoRecord
from stages.ingest import directory
from stages.ingest.entries import Entry, build_video, failure, locate
from stages.ingest.paths import Located
from stages.ingest.plan import InputPlan, located_entries, plan, unreadable_file
from stages.ingest.source import is_remote, sha256_file
from stages.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    videos: list[VideoRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def _located(input_plan: InputPlan, cfg: InputConfig) -> Iterator[tuple[Entry, Located] | Failure]:
    resolver = input_plan.resolver()
    if input_plan.kind == "directory":
        for entry in directory.list_all(cfg, input_plan.folder):
            found = locate(resolver, entry)
            yield from ([(entry, found)] if isinstance(found, Located) else found)
        return
    folder = Storage.from_uri(input_plan.folder)
    for name in input_plan.files:
        try:
            stream = folder.open_read(name)
        except OSError as exc:
            yield unreadable_file(name, exc)
            continue
        with stream:
            for raw in input_plan.read(stream, name):
                yield from located_entries(input_plan, cfg, name, raw, resolver)


def read_plan(input_plan: InputPlan, cfg: InputConfig) -> IngestResult:
    """Every video (entries grouped by source file, spans in row order) and every failure of the input."""
    grouped: dict[str, tuple[Located, list[Entry]]] = {}
    result = IngestResult()
    for item in _located(input_plan, cfg):
        if isinstance(item, Failure):
            result.failures.append(item)
            continue
        entry, found = item
        grouped.setdefault(found.source, (found, []))[1].append(entry)
    for found, entries in grouped.values():
        video, duplicates = build_video(found, entries)
        result.failures.extend(duplicates)
        if cfg.hash_files and not is_remote(video):
            try:
                video.sha256 = sha256_file(Path(video.source))
            except OSError as exc:
                result.failures.append(failure(video.id, reasons.UNREADABLE, str(exc), video.source))
                continue
        result.videos.append(video)
    return result


def read_all(cfg: InputConfig) -> IngestResult:
    """The whole input named by `cfg`, read in this process."""
    input_plan = plan(cfg)
    log.info("ingesting %s as %s", input_plan.folder, input_plan.kind)
    return read_plan(input_plan, cfg)


ingest = read_all  # the name the build and benches know


def ingest_directory(cfg: InputConfig, folder: str | Path) -> IngestResult:
    """Every file under `folder` (recursive) whose extension is a video extension."""
    return read_plan(InputPlan("directory", str(folder), (), cfg.data_root or str(folder)), cfg)


def ingest_manifest(cfg: InputConfig, manifest_path: str | Path) -> IngestResult:
    """A CSV/parquet/JSONL table: one row per video or per span."""
    path = Path(manifest_path)
    return read_plan(InputPlan("manifest", str(path.parent), (path.name,), cfg.data_root or str(path.parent)), cfg)


def ingest_llava(cfg: InputConfig, annotations: str | Path, video_root: str | Path) -> IngestResult:
    """LLaVA-format samples: HICom-248K's release format, each sample on a whole-file span of its video."""
    path = Path(annotations)
    return read_plan(InputPlan("llava", str(path.parent), (path.name,), str(video_root)), cfg)
