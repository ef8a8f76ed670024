"""Where a training run's shards are, how an epoch deals them out, and how a run still being built is followed.

- Shards come from a run directory (`RUN_DIR` or `RUN_DIR/shards`), a directory of `shard-*.tar`, a glob
  or a brace-expanded URL list (`s3://b/shard-{00000..00099}.tar`, read through webdataset's gopen).
- Split: the epoch's shard list (seeded permutation, or commit order when following) is dealt round
  robin: shard j goes to rank j % world, then to loader worker (j // world) % loader_workers. Workers of
  different ranks therefore never read the same shard.
- Follow mode reads a run that is still being built: a worker waits for each of its parts in commit
  order (a tar exists only once complete; a part with no samples has a stats file and no tar), says what
  it waits for every `log_every_s`, and stops when the run's manifest says `finished` and its next part
  does not exist, or after `idle_timeout_s` without that part (an `incomplete` build changes no more).
- `shard_record` names the shards an epoch plan was made from (with sizes), so a checkpoint can replay
  that plan exactly even when shards were added since.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

logger = logging.getLogger(__name__)
_PART_RE = re.compile(r"shard-(\d+)\.tar$")


@dataclass
class ShardSource:
    """A fixed list of shard paths/URLs, or a run directory that can be followed while it is built."""

    shards: list[str]
    run_dir: Path | None = None  # set when the shards live in RUN_DIR/shards next to a manifest.json

    @property
    def shards_dir(self) -> Path | None:
        return self.run_dir / "shards" if self.run_dir else None

    def status(self) -> str:
        """The run manifest's status (`running`, `finished`, `incomplete`, ...); `finished` without a run dir."""
        if self.run_dir is None:
            return "finished"
        try:
            return str(json.loads((self.run_dir / "manifest.json").read_text())["status"])
        except (OSError, ValueError, KeyError):
            return "unknown (no readable manifest.json)"

    def finished(self) -> bool:
        """True when the run's manifest says the build finished (always True without a run dir)."""
        return self.status() == "finished"

    def refresh(self) -> "ShardSource":
        """Same source with the committed tars listed again."""
        return ShardSource(committed_tars(self.shards_dir), self.run_dir) if self.run_dir else self


def shard_record(shards: list[str]) -> list[list]:
    """[[shard, size in bytes or None], ...]: what an epoch plan was made from (sizes of local files only)."""
    return [[s, os.path.getsize(s) if "://" not in s and os.path.isfile(s) else None] for s in shards]


def check_record(record: list[list]) -> list[str]:
    """Shards of a stored record, after checking each is still there with the same size; ValueError otherwise."""
    changed = [f"{s} ({size} -> {os.path.getsize(s) if os.path.isfile(s) else 'missing'} bytes)"
               for s, size in record if size is not None and (not os.path.isfile(s) or os.path.getsize(s) != size)]
    if changed:
        raise ValueError(f"the checkpoint's epoch was planned on shards that changed since: {', '.join(changed[:3])}"
                         f"{' ...' if len(changed) > 3 else ''}; the epoch cannot be replayed exactly: restore them "
                         "or train with a new checkpoint_dir")
    return [s for s, _ in record]


def part_index(path: str) -> int:
    match = _PART_RE.search(str(path))
    if not match:
        raise ValueError(f"not a shard name (shard-NNNNN.tar): {path}")
    return int(match.group(1))


def committed_tars(shards_dir: Path) -> list[str]:
    """Complete shards in commit order. In a run directory (markers beside the tars) the project's one
    committed-parts reader decides, so workers' `part-*` parts count and superseded parts never do; a plain
    folder of `shard-*.tar` (no markers) is read as it is."""
    shards_dir = Path(shards_dir)
    if any(shards_dir.glob("*.stats.json")):
        from pipeline.resume import committed_tars as run_tars  # lazy: pipeline is the layer above

        return run_tars(shards_dir.parent)
    return sorted((str(p) for p in shards_dir.glob("shard-*.tar")), key=part_index)


def resolve_source(spec: str | Path | list[str]) -> ShardSource:
    """A run dir, a shards dir, one tar, a glob, or a brace-expanded list of paths/URLs."""
    if isinstance(spec, (list, tuple)):
        return ShardSource([str(s) for s in spec])
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if (path / "shards").is_dir():
            return ShardSource(committed_tars(path / "shards"), path)
        if (path.parent / "manifest.json").exists():
            return ShardSource(committed_tars(path), path.parent)
        return ShardSource(committed_tars(path))
    if any(c in text for c in "*?["):
        return ShardSource(sorted(glob.glob(text)))
    shards = wds.shardlists.expand_urls(text)
    if len(shards) == 1 and "://" not in text and not path.is_file():
        raise FileNotFoundError(f"no shards at {text}")
    return ShardSource(shards)


def shard_order(shards: list[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """The epoch's shard order: a seeded permutation, or commit order."""
    if not shuffle:
        return list(shards)
    perm = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in perm]


def deal(items: list, rank: int, world: int, worker: int = 0, workers: int = 1) -> list:
    """Round-robin share of one loader worker of one rank: item j -> rank j % world, worker (j//world) % workers."""
    return [x for j, x in enumerate(items) if j % world == rank and (j // world) % workers == worker]


def follow_tars(source: ShardSource, slot: int, stride: int, poll_s: float = 2.0,
                idle_timeout_s: float | None = None, log_every_s: float = 60.0) -> Iterator[str]:
    """Tars of parts slot, slot + stride, ... in commit order, waiting for each while the build runs.

    While waiting it logs what for (part, run status, parts committed) every `log_every_s`; it stops after
    `idle_timeout_s` without the part, with a message that says why (an `incomplete` build has stopped and
    will commit nothing until it is run again).
    """
    shards, part, waited, said = source.shards_dir, slot, 0.0, 0.0
    while True:
        tar, stats = shards / f"shard-{part:05d}.tar", shards / f"shard-{part:05d}.stats.json"
        if tar.exists():
            yield str(tar)
        elif stats.exists() and _no_samples(stats):
            pass  # a part that holds only failures has no tar
        elif source.finished():
            if tar.exists():
                continue
            later = [p for p in committed_tars(shards) if (m := _PART_RE.search(p)) and int(m.group(1)) > part]
            if not later:
                return
            logger.warning("part %d is missing in a finished run; skipping it", part)
        else:
            status = source.status()
            if idle_timeout_s is not None and waited >= idle_timeout_s:
                why = ("the build is marked incomplete (it exited with failures) and committed nothing since: rerun "
                       "the build to finish it" if status == "incomplete" else f"the build is {status}")
                logger.warning("follow: stopping after %.0fs without part %d of %s: %s", waited, part,
                               source.run_dir, why)
                return
            if waited >= said:
                logger.info("follow: waiting for part %d of %s (build %s, %d parts committed, waited %.0fs, "
                            "timeout %s)", part, source.run_dir, status, len(committed_tars(shards)), waited,
                            f"{idle_timeout_s:.0f}s" if idle_timeout_s is not None else "none")
                said = waited + log_every_s
            time.sleep(poll_s)
            waited += poll_s
            continue
        part, waited, said = part + stride, 0.0, 0.0


def _no_samples(stats: Path) -> bool:
    try:
        return json.loads(stats.read_text()).get("num_samples", 1) == 0
    except (OSError, ValueError):
        return False
