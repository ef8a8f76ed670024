"""Resume: what a run has committed, and cleaning what a killed run left half-written.

The one reader of committed parts: a part exists iff its marker (`shards/<name>.stats.json`) exists and no
committed compacted shard lists it in `replaces`. Stats, export, the trainer and `hicom caption` read parts
through `committed_parts` / `committed_tars`, so a tar without its marker (a writer killed mid-commit, or an
object-store upload whose marker never came) is never read.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from schemas.index import PartMarker
from stages.shard import FAILURES_DIR, MARKER_SUFFIX, SHARDS_DIR
from stages.storage import TEMP_SUFFIX, Storage

log = logging.getLogger(__name__)
_NAME = re.compile(r"^((?:shard-\d{5,})|(?:part-[0-9a-f]+))\.")
_SHARD_INDEX = re.compile(r"^shard-(\d{5,})$")


def as_storage(run: str | Path | Storage) -> Storage:
    return run if isinstance(run, Storage) else Storage.from_uri(run)


def _order(name: str) -> tuple[int, int, str]:
    """Compacted shards in index order, then the workers' parts by name."""
    match = _SHARD_INDEX.match(name)
    return (0, int(match.group(1)), name) if match else (1, 0, name)


def _read_markers(storage: Storage) -> list[PartMarker]:
    markers = []
    for rel in storage.list(SHARDS_DIR):
        if not rel.endswith(MARKER_SUFFIX) or rel.endswith(TEMP_SUFFIX):
            continue
        try:
            markers.append(PartMarker.model_validate_json(storage.read_bytes(rel)))
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("ignoring unreadable marker %s: %s", rel, exc)
    return markers


def committed_parts(run: str | Path | Storage) -> list[PartMarker]:
    """Markers of every committed part, compacted shards first (read-only: nothing is removed)."""
    markers = _read_markers(as_storage(run))
    superseded = {name for m in markers for name in m.replaces}
    return sorted((m for m in markers if m.shard not in superseded), key=lambda m: _order(m.shard))


def committed_stats(run: str | Path | Storage) -> list[dict]:
    """`committed_parts` as plain dicts (what stats and `hicom caption` read)."""
    return [m.model_dump() for m in committed_parts(run)]


def committed_tars(run: str | Path | Storage) -> list[str]:
    """The tars of committed parts that hold samples, in part order, as paths or URIs."""
    storage = as_storage(run)
    return [storage.uri(f"{SHARDS_DIR}/{m.shard}.tar") for m in committed_parts(storage) if m.num_samples]


@dataclass
class CommittedState:
    """`video_ids`: videos committed whole (a fanned-out video once every one of its clip batches is);
    `partial`: fanned-out videos with some batches committed, video id -> (batch count, committed indexes)."""

    parts: list[str] = field(default_factory=list)
    video_ids: set[str] = field(default_factory=set)
    loose_failure_ids: set[str] = field(default_factory=set)
    partial: dict[str, tuple[int, set[int]]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    @property
    def next_shard_index(self) -> int:
        indexes = [int(m.group(1)) for p in self.parts if (m := _SHARD_INDEX.match(p))]
        return max(indexes, default=-1) + 1


def committed_state(run: str | Path | Storage) -> CommittedState:
    """Committed part names and the ids they commit (read-only)."""
    state = CommittedState()
    for marker in committed_parts(run):
        state.parts.append(marker.shard)
        duplicated = state.video_ids.intersection(marker.video_ids)
        if duplicated:
            log.warning("videos committed twice (kept both): %s", sorted(duplicated)[:5])
        state.video_ids.update(marker.video_ids)
        state.loose_failure_ids.update(marker.loose_failure_ids)
        for video_id, index, count in marker.batches:
            known, done = state.partial.setdefault(video_id, (count, set()))
            if count != known or index in done:
                log.warning("clip batch %d/%d of %s committed twice or with another count (kept both)", index,
                            count, video_id)
            done.add(index)
    for video_id, (count, done) in list(state.partial.items()):
        if len(done) >= count:  # every batch is committed: the video is
            state.video_ids.add(video_id)
            del state.partial[video_id]
    return state


def scan_and_clean(run: str | Path | Storage) -> CommittedState:
    """Committed parts and their ids; temp files, files of parts without a marker and parts superseded by a
    compacted shard are deleted (call only while no writer runs on this run directory)."""
    storage = as_storage(run)
    state = committed_state(storage)
    keep = set(state.parts)
    for folder in (SHARDS_DIR, FAILURES_DIR):
        files = storage.list(folder)
        # markers of superseded parts go first, so a part is never left half-deleted but still "committed"
        files.sort(key=lambda rel: not rel.endswith(MARKER_SUFFIX))
        for rel in files:
            name = rel.rsplit("/", 1)[-1]
            match = _NAME.match(name)
            if name.endswith(TEMP_SUFFIX) or (match and match.group(1) not in keep):
                storage.delete(rel)
                state.removed.append(name)
    if state.removed:
        log.info("removed %d files left by an interrupted run or superseded by compaction", len(state.removed))
    return state
