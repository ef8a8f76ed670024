"""`hicom caption RUN_DIR`: (re)generate pairs for the clips of committed shards as a new annotation version,
without touching video:
    annotations/<version>/captioning.yaml                the captioning config used
    annotations/<version>/shard-NNNNN.pairs.parquet      all pairs of the part's clips (index schema)
    annotations/<version>/shard-NNNNN.failures.parquet   what was lost, with reasons
    annotations/<version>/shard-NNNNN.stats.json         written last: the part is committed
A rerun skips committed parts; the response cache makes redone requests free.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tarfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.captioning import ANNOTATIONS_DIR, cache_dir, dataset_dedup, maybe_server, with_server
from schemas.caption import CaptioningConfig
from schemas.config import RunConfig
from schemas.records import AnnotationSample, ClipRecord, QAPair, ShardSample, VideoResult
from stages import caption, dedup, filter as pair_filter, instruct
from stages.llm_client import LLMClient, ResponseCache, SyncRunner, write_usage

log = logging.getLogger(__name__)


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
    with maybe_server(cap, run_dir) as base_url:
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
