"""Dataset-wide dedup on Ray with no central memory: the signature index and the instruction counts are
partitioned over `partitions` actors by key, each holding 1/N of the dataset's keys.

- `clip_dedup` runs before any LLM stage: a clip whose frames nearly repeat a committed clip, or a clip of
  another video now in flight with a smaller id, is dropped (stage `dedup`, reason `duplicate_clip`) and
  costs no request. Each partition answers and inserts atomically (one actor call), so of two in-flight
  near-duplicates the one with the larger id is dropped when it sees the other; never both. Two decided at
  the same instant on different workers may both be kept (the cost of no barrier).
- `instruction_cap` runs after the filter: an instruction seen `dataset_max_instruction_repeats` times
  (normalized) is dropped (`overused_instruction`).
On resume each actor reloads its partition from the committed index parquets (`frame_dhash`, instructions).
`hicom build` and `hicom caption` both run these stages: a build reloads the clips and instructions of its
committed parts (`shards/`), `hicom caption` those of the annotation version it writes (`annotations/<version>/`).
"""
from __future__ import annotations

import hashlib
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import caption_reasons
from schemas.caption import FilterConfig
from schemas.records import VideoResult
from stages import dedup
from stages.filter import drop_pair, normalize
from stages.ray_adapter import from_row, replace_state
from stages.shard import SHARDS_DIR
from stages.storage import Storage

log = logging.getLogger(__name__)
RESOURCES = {"num_cpus": 0.25}  # JPEG decode of k small frames per clip, then actor calls


def partition_of(key: int, partitions: int) -> int:
    return (key * 0x9E3779B97F4A7C15 >> 17) % partitions  # mix: band keys share their low bits


def instruction_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=8).digest(), "big")


class DedupPartition:
    """One partition of the dataset's clip index and instruction counts (a Ray actor)."""

    def __init__(self, index: int, partitions: int, max_distance: float):
        self.index, self.partitions = index, partitions
        self.signatures = dedup.SignatureIndex(max_distance)
        self.committed: set[str] = set()
        self.counts: dict[int, int] = {}

    def _mine(self, keys: list[int]) -> list[int]:
        return [k for k in keys if partition_of(k, self.partitions) == self.index]

    def load(self, run_uri: str, parts: list[str], sources: list[str], index_dir: str = SHARDS_DIR) -> int:
        """Index the committed clips and count the committed instructions of `parts` (this partition's keys),
        from their `clips`/`pairs` parquets in `index_dir` (`shards`, or an annotation version's folder)."""
        storage = Storage.from_uri(run_uri)
        for part in parts:
            with storage.open_read(f"{index_dir}/{part}.clips.parquet") as f:
                clips = pq.read_table(f, columns=["clip_id", "frame_dhash"]).to_pylist()
            for row in clips:
                sig = [int(h) for h in row["frame_dhash"] or []]
                mine = self._mine(dedup.band_keys(sig, self.signatures.max_distance))
                if mine:
                    self.signatures.add(row["clip_id"], sig, mine)
                    self.committed.add(row["clip_id"])
            with storage.open_read(f"{index_dir}/{part}.pairs.parquet") as f:
                pairs = pq.read_table(f, columns=["instruction", "source"]).to_pylist()
            for row in pairs:
                key = instruction_key(row["instruction"])
                if row["source"] in sources and partition_of(key, self.partitions) == self.index:
                    self.counts[key] = self.counts.get(key, 0) + 1
        return len(self.signatures.entries)

    def query_insert(self, items: list[tuple[str, list[int], list[int]]]) -> list[tuple[str, float] | None]:
        """For each (clip_id, signature, keys of this partition): the closest committed clip, or in-flight
        clip with a smaller id, within the threshold; then the clip is indexed. Atomic per call."""
        out: list[tuple[str, float] | None] = [None] * len(items)
        for i in sorted(range(len(items)), key=lambda i: items[i][0]):  # smaller ids first: they win
            clip_id, sig, keys = items[i]
            found = [(c, d) for c, d in self.signatures.candidates(sig, keys)
                     if c != clip_id and (c in self.committed or c < clip_id)]
            out[i] = found[0] if found else None
            self.signatures.add(clip_id, sig, keys)
        return out

    def admit(self, keys: list[int], limit: int) -> list[bool]:
        """Count each instruction key; False once it has been admitted `limit` times."""
        out = []
        for key in keys:
            seen = self.counts.get(key, 0)
            out.append(seen < limit)
            if seen < limit:
                self.counts[key] = seen + 1
        return out


def start_partitions(cfg: FilterConfig, run_uri: str, parts: list[str], partitions: int,
                     index_dir: str = SHARDS_DIR) -> list:
    """Start the partition actors and load the committed state into them (in parallel)."""
    import ray

    actor = ray.remote(num_cpus=0)(DedupPartition)
    handles = [actor.remote(i, partitions, cfg.clip_hash_max_distance) for i in range(partitions)]
    loaded = ray.get([h.load.remote(run_uri, parts, list(cfg.sources), index_dir) for h in handles])
    log.info("dataset dedup: %d partitions, %d committed clip keys loaded", partitions, sum(loaded))
    return handles


def _batch(fn, batch: pa.Table, **kwargs) -> pa.Table:
    return replace_state(batch, fn([from_row(r) for r in batch.to_pylist()], **kwargs))


def _clip_dedup(results: list[VideoResult], cfg: FilterConfig, actors: list) -> list[VideoResult]:
    import ray

    entries = []  # (result, sample, clip_id, signature)
    for result in results:
        if result.failed:
            continue
        for sample in result.samples:
            sig = dedup.clip_signature(sample.frames, cfg.clip_hash_frames)
            if sig:
                entries.append((result, sample, sample.clip.id, sig))
    n = len(actors)
    per_actor: list[list] = [[] for _ in range(n)]
    where: list[list[tuple[int, int]]] = [[] for _ in entries]
    for i, (_, _, clip_id, sig) in enumerate(entries):
        keys = dedup.band_keys(sig, cfg.clip_hash_max_distance)
        for p in range(n):
            mine = [k for k in keys if partition_of(k, n) == p]
            if mine:
                where[i].append((p, len(per_actor[p])))
                per_actor[p].append((clip_id, sig, mine))
    answers = ray.get([actors[p].query_insert.remote(per_actor[p]) for p in range(n)])
    for i, (result, sample, _, _) in enumerate(entries):
        found = sorted((m for p, j in where[i] if (m := answers[p][j]) is not None), key=lambda m: (m[1], m[0]))
        if found and not dedup.annotated(sample):
            dedup.drop_clip(result, sample, f"near-duplicate of {found[0][0]} in the dataset "
                                            f"(mean Hamming {found[0][1]:.1f} bits)")
    return results


def clip_dedup(batch: pa.Table, cfg: dict, actors: list) -> pa.Table:
    """`map_batches` function: drop dataset-wide near-duplicate clips before any LLM call."""
    return _batch(_clip_dedup, batch, cfg=FilterConfig.model_validate(cfg), actors=actors)


def _instruction_cap(results: list[VideoResult], cfg: FilterConfig, actors: list) -> list[VideoResult]:
    import ray

    limit = cfg.dataset_max_instruction_repeats
    pairs = [(r, s, p) for r in results if not r.failed for s in r.samples for p in s.pairs
             if p.source in cfg.sources]
    if limit is None or not pairs:
        return results
    n = len(actors)
    keys = [instruction_key(p.instruction) for _, _, p in pairs]
    by_actor = [[i for i, k in enumerate(keys) if partition_of(k, n) == a] for a in range(n)]
    answers = ray.get([actors[a].admit.remote([keys[i] for i in by_actor[a]], limit) for a in range(n)])
    refused = {i for a in range(n) for i, ok in zip(by_actor[a], answers[a]) if not ok}
    for i in sorted(refused):
        result, sample, pair = pairs[i]
        result.failures.append(drop_pair(pair, result.video_id, sample.clip.source, caption_reasons.OVERUSED_INSTRUCTION,
                                         f"seen {limit} times in the dataset", pair.scores, dedup.STAGE))
    dropped = {pairs[i][2].sample_id for i in refused}
    for result in results:
        result.samples = [s.model_copy(update={"pairs": [p for p in s.pairs if p.sample_id not in dropped],
                                               "samples": [x for x in s.samples if x.id not in dropped]})
                          if any(p.sample_id in dropped for p in s.pairs) else s for s in result.samples]
    return results


def instruction_cap(batch: pa.Table, cfg: dict, actors: list) -> pa.Table:
    """`map_batches` function: drop instructions already seen `dataset_max_instruction_repeats` times."""
    return _batch(_instruction_cap, batch, cfg=FilterConfig.model_validate(cfg), actors=actors)


def dedup_stages(cfg: FilterConfig, run_uri: str, parts: list[str], partitions: int = 2,
                 batch_videos: int = 4, index_dir: str = SHARDS_DIR) -> tuple[list, list]:
    """(stages before the LLM stages, stages after the filter) as `(fn, map_batches options)`; `parts` are
    the committed parts whose clips and instructions (indexes in `index_dir`) count as already in the dataset."""
    if not cfg.drop_duplicate_clips and cfg.dataset_max_instruction_repeats is None:
        return [], []
    actors = start_partitions(cfg, run_uri, parts, partitions, index_dir)
    common = {"batch_size": batch_videos, "batch_format": "pyarrow", **RESOURCES}
    kwargs = {"cfg": cfg.model_dump(mode="json"), "actors": actors}
    before = [(clip_dedup, {**common, "fn_kwargs": kwargs})] if cfg.drop_duplicate_clips else []
    after = [(instruction_cap, {**common, "fn_kwargs": kwargs})] if cfg.dataset_max_instruction_repeats else []
    return before, after
