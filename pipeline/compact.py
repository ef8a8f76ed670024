"""Compaction: merge the small parts that workers commit into full-size `shard-NNNNN` shards.

Exactly-once holds at every instant: a compacted shard is written like any part (data first, marker last)
and its marker lists the parts it `replaces`; readers ignore replaced parts from the moment that marker
exists, and the replaced files are deleted afterwards (again by `scan_and_clean` if a kill came between).
A killed compaction leaves either nothing visible (no marker: the rerun writes the same shard again from the
same parts) or a complete shard plus parts no reader sees. Grouping is deterministic: parts in name order,
whole parts, up to `shard.max_samples` / `shard.max_bytes`.

`hicom compact RUN` runs the groups in this process; a build runs them as Ray tasks on the workers, so the
driver never reads sample bytes.
"""
from __future__ import annotations

import logging
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.resume import as_storage, scan_and_clean
from schemas.config import ShardConfig
from schemas.index import FAILURE_SCHEMA, PartMarker
from stages.shard import FAILURES_DIR, INDEX_FILES, SHARDS_DIR, part_files, shard_name, write_marker, write_table
from stages.storage import Storage

log = logging.getLogger(__name__)
COPY_CHUNK = 4 << 20


def run_shard_config(run: str | Path | Storage) -> ShardConfig:
    """The shard limits the run was built with (its saved config), or the defaults."""
    import yaml

    storage = as_storage(run)
    if not storage.exists("config.yaml"):
        return ShardConfig()
    return ShardConfig.model_validate((yaml.safe_load(storage.read_text("config.yaml")) or {}).get("shard", {}))


def plan(markers: list[PartMarker], cfg: ShardConfig) -> list[list[PartMarker]]:
    """Groups of workers' parts (not yet compacted), each under the shard limits; a part is never split."""
    groups: list[list[PartMarker]] = []
    samples = size = 0
    for marker in sorted((m for m in markers if m.shard.startswith("part-")), key=lambda m: m.shard):
        if groups and groups[-1] and (samples + marker.num_samples > cfg.max_samples
                                      or size + marker.tar_bytes > cfg.max_bytes):
            groups.append([])
            samples = size = 0
        if not groups:
            groups.append([])
        groups[-1].append(marker)
        samples += marker.num_samples
        size += marker.tar_bytes
    return [g for g in groups if g]


def _members_end(f) -> int:
    """Where a tar's members end (its end-of-archive zero blocks start), from its headers alone (seeks past the
    data): the offset after the last member's data, rounded up to the block. Only for parts whose marker does not
    record it (`tar_members_end`: written by earlier versions); reading every header was half of compaction's CPU."""
    last = None
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for last in tar:
            pass
    if last is None:
        return 0
    return last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _concatenate_tars(storage: Storage, parts: list[PartMarker], out) -> int:
    """The parts' tars, in part order, as one tar: each one's member bytes copied as they are (no member is
    re-encoded), then the end-of-archive blocks and the record padding `tarfile` writes. The bytes equal a
    member-by-member copy through `tarfile` (`tests/stages/test_shard.py`), at a fraction of its CPU.
    Returns where the members of the result end."""
    written = 0
    for marker in parts:
        if not marker.num_samples:
            continue
        with storage.open_read(f"{SHARDS_DIR}/{marker.shard}.tar") as f:
            left = marker.tar_members_end
            if left is None:
                left = _members_end(f)
                f.seek(0)
            while left:
                chunk = f.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise OSError(f"{marker.shard}.tar ended before its last member's data")
                out.write(chunk)
                left -= len(chunk)
                written += len(chunk)
    trailer = 2 * tarfile.BLOCKSIZE
    out.write(b"\0" * (trailer + (-(written + trailer) % tarfile.RECORDSIZE)))
    return written


def _merged_rows(storage: Storage, rels: list[str], schema: pa.Schema, name: str) -> list[dict]:
    rows = []
    for rel in rels:
        with storage.open_read(rel) as f:
            rows += pq.read_table(f).to_pylist()
    for row in rows:
        row["shard"] = name
    return [{k: row.get(k) for k in schema.names} for row in rows]


def compact_group(storage: Storage, name: str, parts: list[PartMarker], writer_node_id: str | None = None
                  ) -> PartMarker:
    """Write shard `name` from `parts` (data, then its marker), then delete the parts it replaces."""
    members_end = None
    if any(m.num_samples for m in parts):
        with storage.open_write(f"{SHARDS_DIR}/{name}.tar") as f:
            members_end = _concatenate_tars(storage, parts, f)
    for kind, schema in INDEX_FILES.items():
        rows = _merged_rows(storage, [f"{SHARDS_DIR}/{m.shard}.{kind}.parquet" for m in parts], schema, name)
        write_table(storage, f"{SHARDS_DIR}/{name}.{kind}.parquet", rows, schema)
    failures = _merged_rows(storage, [f"{FAILURES_DIR}/{m.shard}.parquet" for m in parts], FAILURE_SCHEMA, name)
    write_table(storage, f"{FAILURES_DIR}/{name}.parquet", failures, FAILURE_SCHEMA)
    reasons: Counter = Counter()
    for m in parts:
        reasons.update(m.failures_by_reason)
    marker = PartMarker(
        shard=name, num_samples=sum(m.num_samples for m in parts), num_videos=sum(m.num_videos for m in parts),
        num_failures=sum(m.num_failures for m in parts), num_pairs=sum(m.num_pairs for m in parts),
        tar_bytes=sum(m.tar_bytes for m in parts), tar_members_end=members_end,
        failures_by_reason=dict(reasons), committed_at=time.time(),
        video_ids=[v for m in parts for v in m.video_ids],
        loose_failure_ids=[i for m in parts for i in m.loose_failure_ids],
        batches=[b for m in parts for b in m.batches],
        writer_node_id=writer_node_id, replaces=[m.shard for m in parts])
    write_marker(storage, marker)
    for m in parts:  # the marker first: a part is gone for readers before any of its data is
        for rel in reversed(part_files(m.shard)):
            storage.delete(rel)
    return marker


def _groups(storage: Storage, cfg: ShardConfig) -> Iterator[tuple[str, list[PartMarker]]]:
    state = scan_and_clean(storage)
    from pipeline.resume import committed_parts

    for i, group in enumerate(plan(committed_parts(storage), cfg)):
        yield shard_name(state.next_shard_index + i), group


def compact(run: str | Path | Storage, cfg: ShardConfig,
            run_groups: Callable[[Storage, list[tuple[str, list[PartMarker]]]], list[PartMarker]] | None = None
            ) -> list[PartMarker]:
    """Compact a run's parts; `run_groups` runs the groups elsewhere (Ray tasks), else in this process.
    Call only while no build writes to the run."""
    storage = as_storage(run)
    groups = list(_groups(storage, cfg))
    if not groups:
        return []
    num_parts = sum(len(p) for _, p in groups)
    log.info("compacting %s into %s", _counted(num_parts, "part"), _counted(len(groups), "shard"))
    if run_groups is not None:
        done = run_groups(storage, groups)
    else:
        done = [compact_group(storage, name, parts) for name, parts in groups]
    log.info("compacted %s into %s", _counted(num_parts, "part"), _counted(len(done), "shard"))
    return done


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
