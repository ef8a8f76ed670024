"""Resume: find what a run directory has committed and remove what a killed run left half-written."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from stages.shard import FAILURES_DIR, SHARDS_DIR

log = logging.getLogger(__name__)
_PART = re.compile(r"^shard-(\d{5,})\.")


@dataclass
class CommittedState:
    parts: list[int] = field(default_factory=list)
    video_ids: set[str] = field(default_factory=set)
    loose_failure_ids: set[str] = field(default_factory=set)
    removed: list[str] = field(default_factory=list)

    @property
    def next_index(self) -> int:
        return max(self.parts, default=-1) + 1


def _is_committed(stats_path: Path) -> dict | None:
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tar = stats_path.with_name(stats_path.name.replace(".stats.json", ".tar"))
    return stats if stats.get("num_samples", 0) == 0 or tar.exists() else None


def committed_stats(run_dir: Path) -> list[dict]:
    """Stats of every committed part, in part order (read-only: nothing is removed)."""
    out = []
    for path in sorted((Path(run_dir) / SHARDS_DIR).glob("shard-*.stats.json")):
        stats = _is_committed(path)
        if stats is not None:
            out.append(stats)
    return out


def scan_and_clean(run_dir: Path) -> CommittedState:
    """Committed parts and their ids; files of uncommitted parts and temp files are deleted."""
    state = CommittedState()
    for stats in committed_stats(run_dir):
        state.parts.append(int(stats["index"]))
        duplicated = state.video_ids.intersection(stats["video_ids"])
        if duplicated:
            log.warning("videos committed twice (kept both): %s", sorted(duplicated)[:5])
        state.video_ids.update(stats["video_ids"])
        state.loose_failure_ids.update(stats.get("loose_failure_ids", []))
    committed = set(state.parts)
    for folder in (Path(run_dir) / SHARDS_DIR, Path(run_dir) / FAILURES_DIR):
        if not folder.exists():
            continue
        for path in folder.iterdir():
            match = _PART.match(path.name)
            if path.name.endswith(".tmp") or (match and int(match.group(1)) not in committed):
                path.unlink()
                state.removed.append(path.name)
    if state.removed:
        log.info("removed %d files left by an interrupted run", len(state.removed))
    return state
