"""Captioning in a run: caption -> instruct -> filter on Ray actor pools, and `hicom caption RUN_DIR`.

In `hicom build`, `captioning_session(cfg, run_dir, committed_ids)` starts the embedded server when
configured, gives the Ray stages to append after the pairs stage (`ds.map_batches(stage, **options)`),
and `session.finish(result)` applies the dataset-wide dedup in the driver before a video is committed.

`run_caption(run_dir)` (re)generates pairs for the clips of committed shards as a new annotation version,
without touching video:
    annotations/<version>/captioning.yaml                the captioning config used
    annotations/<version>/shard-NNNNN.pairs.parquet      all pairs of the part's clips (index schema)
    annotations/<version>/shard-NNNNN.failures.parquet   what was lost, with reasons
    annotations/<version>/shard-NNNNN.stats.json         written last: the part is committed
A rerun skips committed parts; the response cache makes redone requests free.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from schemas import reasons as video_reasons
from schemas.caption import CaptioningConfig
from schemas.config import RunConfig
from schemas.records import AnnotationSample, ClipRecord, QAPair, ShardSample, VideoResult
from stages import caption, dedup, filter as pair_filter, instruct
from stages.llm_client import LLMClient, ResponseCache, SyncRunner, read_usage, write_usage
from stages.ray_adapter import from_row, to_row

log = logging.getLogger(__name__)
ANNOTATIONS_DIR = "annotations"
USAGE_DIR = "logs/llm_usage"


def cache_dir(cap: CaptioningConfig, run_dir: str | Path) -> Path:
    return Path(cap.cache_dir) if cap.cache_dir else Path(run_dir) / "cache" / "llm"


def with_server(cap: CaptioningConfig, base_url: str | None) -> CaptioningConfig:
    """The config as the stages see it: the embedded server replaces the instruct endpoint."""
    if base_url is None:
        return cap
    endpoint = cap.instruct.endpoint.model_copy(update={
        "base_url": base_url, "model": cap.embedded_server.model_alias, "api_key_env": None,
        "json_mode": "json_object_schema"})
    return cap.model_copy(update={"instruct": cap.instruct.model_copy(update={"endpoint": endpoint})})


# --- Ray: map_batches callables, one client / encoder per actor --------------------------------------

class _BatchStage:
    """A `map_batches` callable class over pyarrow batches of `{"video_id", "state"}` rows. Each video is
    guarded: an exception fails that video (internal_error), never the batch or the run."""

    name = "stage"

    def __init__(self, captioning: dict, cache: str, usage_dir: str):
        self.cfg = CaptioningConfig.model_validate(captioning)
        self.cache = ResponseCache(cache)
        self.usage_path = Path(usage_dir) / f"{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.runner = SyncRunner()
        self.clients: dict[str, LLMClient] = {}

    async def process(self, result: VideoResult) -> VideoResult:
        raise NotImplementedError

    async def _guarded(self, result: VideoResult) -> VideoResult:
        if result.failed:
            return result
        try:
            return await self.process(result)
        except Exception as exc:  # the record boundary
            log.exception("%s failed on %s", self.name, result.video_id)
            return result.fail_video(self.name, video_reasons.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    async def _all(self, results: list[VideoResult]) -> list[VideoResult]:
        return list(await asyncio.gather(*(self._guarded(r) for r in results)))

    def run(self, results: list[VideoResult]) -> list[VideoResult]:
        results = self.runner.run(self._all(results))
        if self.clients:
            write_usage(self.usage_path, {name: c.usage for name, c in self.clients.items()})
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = self.run([from_row(r) for r in rows])
        out = [to_row(r) for r in results]
        return pa.table({"video_id": pa.array([r["video_id"] for r in out], pa.string()),
                         "state": pa.array([r["state"] for r in out], pa.binary())})


class CaptionStage(_BatchStage):
    """Drop near-duplicate clips of a video (before any LLM is paid), then dense captions."""

    name = caption.STAGE

    def __init__(self, captioning: dict, cache: str, usage_dir: str):
        super().__init__(captioning, cache, usage_dir)
        if self.cfg.caption.mode != "source":
            self.clients["caption"] = LLMClient(self.cfg.caption.endpoint, self.cache)

    async def process(self, result: VideoResult) -> VideoResult:
        result = dedup.dedup_clips(result, self.cfg.filter)
        return await caption.acaption(result, self.cfg.caption, self.clients.get("caption"))


class InstructStage(_BatchStage):
    name = instruct.STAGE

    def __init__(self, captioning: dict, cache: str, usage_dir: str):
        super().__init__(captioning, cache, usage_dir)
        self.clients["instruct"] = LLMClient(self.cfg.instruct.endpoint, self.cache)

    async def process(self, result: VideoResult) -> VideoResult:
        return await instruct.ainstruct(result, self.cfg.instruct, self.clients["instruct"],
                                        self.cfg.keep_source_caption_pair)


class FilterStage(_BatchStage):
    """Rules, duplicates and encoder scores; the encoder is loaded on the actor's first batch."""

    name = pair_filter.STAGE

    def __init__(self, captioning: dict, cache: str, usage_dir: str):
        super().__init__(captioning, cache, usage_dir)
        self.encoder = pair_filter.TextEncoder(self.cfg.filter.encoder, self.cfg.filter.encoder_batch_size)

    def run(self, results: list[VideoResult]) -> list[VideoResult]:
        live = [r for r in results if not r.failed]
        try:
            pair_filter.filter_results(live, self.cfg.filter, self.encoder)
        except Exception:  # isolate the video that breaks the batch
            log.exception("filter batch failed; retrying video by video")
            for r in live:
                try:
                    pair_filter.filter_results([r], self.cfg.filter, self.encoder)
                except Exception as exc:
                    r.fail_video(self.name, video_reasons.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        return results


def caption_stages(cfg: RunConfig, run_dir: str | Path, base_url: str | None = None,
                   run_stamp: str | None = None) -> list[tuple[type, dict]]:
    """The captioning stages to append after `pairs`: `ds = ds.map_batches(stage, **options)` for each.
    `base_url`: the embedded server's URL when one runs (see `captioning_session`). Empty when the run has
    no enabled `captioning` section."""
    cap = getattr(cfg, "captioning", None)
    if cap is None or not cap.enabled:
        return []
    cap = with_server(cap, base_url)
    usage_dir = Path(run_dir) / USAGE_DIR / (run_stamp or time.strftime("%Y%m%d-%H%M%S"))
    kwargs = {"captioning": cap.model_dump(mode="json"), "cache": str(cache_dir(cap, run_dir)),
              "usage_dir": str(usage_dir)}
    a = cap.actors
    common = {"fn_constructor_kwargs": kwargs, "batch_size": a.batch_videos, "batch_format": "pyarrow"}
    return [
        (CaptionStage, {**common, "concurrency": a.llm_actors, "num_cpus": a.llm_actor_cpus}),
        (InstructStage, {**common, "concurrency": a.llm_actors, "num_cpus": a.llm_actor_cpus}),
        (FilterStage, {**common, "concurrency": a.filter_actors, "num_cpus": a.filter_actor_cpus}),
    ]


def dataset_dedup(cap: CaptioningConfig, state_path: Path, committed_video_ids: set[str]):
    return dedup.DatasetDedup(state_path, cap.filter).load(committed_video_ids)


@dataclass
class CaptioningSession:
    """What `hicom build` needs for captioning: Ray stages, the driver-side dedup, usage totals."""

    stages: list[tuple[type, dict]] = field(default_factory=list)
    dedup: dedup.DatasetDedup | None = None
    usage_dir: Path | None = None

    def finish(self, result: VideoResult) -> VideoResult:
        """Dataset-wide duplicates (driver side, commit order); call on each result before committing it."""
        return self.dedup.apply(result) if self.dedup is not None and not result.failed else result

    def usage(self) -> dict:
        return read_usage(self.usage_dir) if self.usage_dir and self.usage_dir.exists() else {}


@contextlib.contextmanager
def captioning_session(cfg: RunConfig, run_dir: str | Path,
                       committed_video_ids: set[str] = frozenset()) -> Iterator[CaptioningSession]:
    """Start the embedded server if configured (stopped on exit, whatever happens) and yield the session.
    A run without an enabled `captioning` section yields an empty session (no stages, finish = identity)."""
    cap = getattr(cfg, "captioning", None)
    if cap is None or not cap.enabled:
        yield CaptioningSession()
        return
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with _maybe_server(cap, run_dir) as base_url:
        yield CaptioningSession(
            stages=caption_stages(cfg, run_dir, base_url, stamp),
            dedup=dataset_dedup(cap, run_dir / "cache" / "dedup.jsonl", set(committed_video_ids)),
            usage_dir=run_dir / USAGE_DIR / stamp)


@contextlib.contextmanager
def _maybe_server(cap: CaptioningConfig, run_dir: Path) -> Iterator[str | None]:
    if not cap.embedded_server.enabled:
        yield None
        return
    from pipeline.llm_server import embedded_server

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with embedded_server(cap.embedded_server, run_dir / "logs" / "llm_server.log") as base_url:
        yield base_url


# --- hicom caption RUN_DIR: a new annotation version over committed shards -------------------------

def read_part(tar_path: Path) -> list[VideoResult]:
    """The clips of one committed tar as VideoResults (frames and pairs; no mp4), grouped by video."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if ext == "mp4":
                continue
            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    results: dict[str, VideoResult] = {}
    for key, files in members.items():
        meta = json.loads(files["json"])
        samples = [AnnotationSample.model_validate(s) for s in meta.pop("samples", [])]
        pairs = [QAPair.model_validate(p) for p in meta.pop("pairs", [])]
        meta.pop("duration_s", None)
        clip = ClipRecord.model_validate(meta)
        frames = [files[ext] for ext in sorted(e for e in files if e.endswith(".jpg"))]
        video = results.setdefault(clip.video_id, VideoResult(video_id=clip.video_id, source=clip.source))
        video.samples.append(ShardSample(clip=clip, frames=frames, samples=samples, pairs=pairs))
    return list(results.values())


def _write_table(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)


class _LocalChain:
    """caption -> instruct -> filter in this process (async requests, one encoder), for `run_caption`."""

    def __init__(self, cap: CaptioningConfig, cache: Path):
        self.cap = cap
        self.runner = SyncRunner()
        store = ResponseCache(cache)
        self.clients = {"instruct": LLMClient(cap.instruct.endpoint, store)}
        if cap.caption.mode != "source":
            self.clients["caption"] = LLMClient(cap.caption.endpoint, store)
        self.encoder = pair_filter.TextEncoder(cap.filter.encoder, cap.filter.encoder_batch_size)

    async def _one(self, result: VideoResult) -> VideoResult:
        result = dedup.dedup_clips(result, self.cap.filter)
        result = await caption.acaption(result, self.cap.caption, self.clients.get("caption"))
        return await instruct.ainstruct(result, self.cap.instruct, self.clients["instruct"],
                                        self.cap.keep_source_caption_pair)

    async def _all(self, results):
        return list(await asyncio.gather(*(self._one(r) for r in results)))

    def run(self, results: list[VideoResult]) -> list[VideoResult]:
        results = self.runner.run(self._all(results))
        return pair_filter.filter_results(results, self.cap.filter, self.encoder)

    def close(self) -> None:
        for client in self.clients.values():
            self.runner.run(client.aclose())
        self.runner.close()


def _load_captioning(run_dir: Path, cfg: RunConfig | CaptioningConfig | None) -> CaptioningConfig:
    if isinstance(cfg, CaptioningConfig):
        return cfg
    if cfg is None:
        from schemas.config import load_run_config

        cfg = load_run_config(run_dir / "config.yaml")
    cap = getattr(cfg, "captioning", None)
    if cap is None:
        raise ValueError("no `captioning:` section: pass a config with one (hicom caption RUN_DIR --config X)")
    return cap


def run_caption(run_dir: str | Path, cfg: RunConfig | CaptioningConfig | None = None, version: str | None = None,
                progress: bool = True) -> dict:
    """Generate pairs for the clips of `run_dir`'s committed shards as annotation version `version`
    (default: the instruct prompt version). Resumable per part; returns counts and LLM usage."""
    from pipeline.resume import committed_stats
    from stages.shard import FAILURE_SCHEMA, PAIR_SCHEMA, SHARDS_DIR, failure_row, pair_rows

    run_dir = Path(run_dir)
    cap = _load_captioning(run_dir, cfg)
    version = version or cap.instruct.prompt_version
    out = run_dir / ANNOTATIONS_DIR / version
    out.mkdir(parents=True, exist_ok=True)
    _check_version_config(out / "captioning.yaml", cap)
    for leftover in out.glob("*.tmp"):
        leftover.unlink()
    parts = [p for p in committed_stats(run_dir) if p["num_samples"] > 0]
    committed = {p["shard"] for p in parts if (out / f"{p['shard']}.stats.json").exists()}
    dedup_ids = set()
    for p in parts:
        if p["shard"] in committed:
            dedup_ids.update(p["video_ids"])
    counts = Counter(parts=len(parts), skipped=len(committed))
    started = time.time()
    with _maybe_server(cap, run_dir) as base_url:
        cap_run = with_server(cap, base_url)
        dedup = dataset_dedup(cap_run, out / "dedup.jsonl", dedup_ids)
        chain = _LocalChain(cap_run, cache_dir(cap_run, run_dir))
        try:
            for part in parts:
                name = part["shard"]
                if name in committed:
                    continue
                results = chain.run(read_part(run_dir / SHARDS_DIR / f"{name}.tar"))
                results = [dedup.apply(r) if not r.failed else r for r in results]
                samples = [s for r in results for s in r.samples]
                failures = [f for r in results for f in r.failures]
                _write_table(out / f"{name}.pairs.parquet", [row for s in samples for row in pair_rows(s, name)],
                             PAIR_SCHEMA)
                _write_table(out / f"{name}.failures.parquet", [failure_row(f, name) for f in failures],
                             FAILURE_SCHEMA)
                stats = {"shard": name, "version": version, "committed_at": time.time(),
                         "num_clips": len(samples), "num_pairs": sum(len(s.pairs) for s in samples),
                         "num_failures": len(failures),
                         "failures_by_reason": dict(Counter(f.reason for f in failures)),
                         "video_ids": [r.video_id for r in results]}
                tmp = out / f"{name}.stats.json.tmp"
                tmp.write_text(json.dumps(stats, indent=1), encoding="utf-8")
                os.replace(tmp, out / f"{name}.stats.json")
                counts.update(done=1, clips=stats["num_clips"], pairs=stats["num_pairs"],
                              failures=stats["num_failures"])
                if progress:
                    log.info("annotations %s: %s committed (%d pairs, %d failures)", version, name,
                             stats["num_pairs"], stats["num_failures"])
        finally:
            chain.close()
            usage = {name: c.usage for name, c in chain.clients.items()}
            write_usage(out / "usage" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json", usage)
    return {"version": version, "out": str(out), "seconds": round(time.time() - started, 2), **counts,
            "usage": {name: u.to_dict() for name, u in usage.items()}}


def _check_version_config(path: Path, cap: CaptioningConfig) -> None:
    """An annotation version is made with one captioning config (execution-only sections may change)."""
    resolved = cap.model_dump(mode="json")
    execution_only = {"actors", "embedded_server", "cache_dir"}
    if path.exists():
        previous = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        changed = sorted(k for k in resolved if k not in execution_only and previous.get(k) != resolved[k])
        if changed:
            raise ValueError(f"{path.parent} was made with a different captioning config ({', '.join(changed)}); "
                             "use another --version")
    path.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")


def add_caption_cli(subparsers) -> None:
    """Register `hicom caption RUN_DIR [--config X] [--version V] [--set k=v]`."""
    p = subparsers.add_parser("caption", help="(re)generate instruction/answer pairs for a run's clips as a new "
                                              "annotation version (no video work)")
    p.add_argument("run_dir")
    p.add_argument("--config", help="YAML with a `captioning:` section (default: the run's config.yaml)")
    p.add_argument("--version", help="annotation version name (default: instruct.prompt_version)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a captioning field, e.g. --set instruct.pairs_per_clip=6 (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_caption)


def _cmd_caption(args) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "shards").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no shards/)")
    data = yaml.safe_load(Path(args.config or run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    section = data.get("captioning") if "captioning" in data or not args.config else data
    if not section:
        raise ValueError("no `captioning:` section in the config")
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = section
        *parents, leaf = key.strip().removeprefix("captioning.").split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    report = run_caption(run_dir, CaptioningConfig.model_validate(section), args.version,
                         progress=not args.no_progress)
    print(json.dumps(report, indent=1))
    return 0


def read_annotation_pairs(run_dir: str | Path, version: str) -> pa.Table:
    """All committed pairs of an annotation version (for stats or export)."""
    folder = Path(run_dir) / ANNOTATIONS_DIR / version
    files = [p.with_name(p.name.replace(".stats.json", ".pairs.parquet")) for p in sorted(folder.glob("*.stats.json"))]
    tables = [pq.read_table(f) for f in files if f.exists()]
    return pa.concat_tables(tables) if tables else pa.table({})
