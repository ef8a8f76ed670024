"""`hicom caption RUN_DIR`: (re)generate pairs for the clips of committed shards as a new annotation version,
without touching video, through the same Ray stages as `hicom build` (`pipeline/captioning.py`):
    annotations/<version>/captioning.yaml                the captioning config used
    annotations/<version>/shard-NNNNN.pairs.parquet      all pairs of the part's clips (index schema)
    annotations/<version>/shard-NNNNN.clips.parquet      the clips kept (+ frame_dhash: the dedup index on resume)
    annotations/<version>/shard-NNNNN.failures.parquet   what was lost, with reasons
    annotations/<version>/shard-NNNNN.stats.json         written last: the part is committed
The shards are read with `ray.data.read_webdataset` (frames and metadata, no mp4), grouped back into videos,
and a part is committed as soon as all its videos are back. A rerun skips committed parts; the response
cache makes redone requests free.
"""
from __future__ import annotations

import json
import logging
import pickle
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.captioning import ANNOTATIONS_DIR, apply_stages, captioning_session, check
from pipeline.progress import BuildProgress
from schemas.caption import CaptioningConfig
from schemas.config import RunConfig
from schemas.index import PartReceipt
from schemas.overrides import apply_overrides, parse_set_options
from schemas.records import AnnotationSample, ClipRecord, QAPair, ShardSample, VideoResult
from schemas.saved_config import check_unchanged
from stages.ray_adapter import from_row, to_row
from stages.storage import Storage

log = logging.getLogger(__name__)


def sample_from_members(members: dict) -> dict:
    """A `read_webdataset` decoder: one tar sample -> {part, video_id, clip (a pickled ShardSample)}."""
    meta = json.loads(members["json"])
    samples = [AnnotationSample.model_validate(s) for s in meta.pop("samples", [])]
    pairs = [QAPair.model_validate(p) for p in meta.pop("pairs", [])]
    meta.pop("duration_s", None)
    clip = ClipRecord.model_validate(meta)
    frames = [members[k] for k in sorted(k for k in members if k.endswith(".jpg"))]
    part = Path(members["__url__"]).name.removesuffix(".tar")
    sample = ShardSample(clip=clip, frames=frames, samples=samples, pairs=pairs)
    return {"part": part, "video_id": clip.video_id, "clip": pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL)}


def video_rows(group: pa.Table) -> pa.Table:
    """`map_groups`: the clips of one (part, video) as one video row, in clip order."""
    rows = group.to_pylist()
    samples = sorted((pickle.loads(r["clip"]) for r in rows), key=lambda s: (s.clip.start_s, s.clip.id))
    result = VideoResult(video_id=rows[0]["video_id"], source=samples[0].clip.source, samples=samples)
    return pa.table({"part": [rows[0]["part"]], **{k: [v] for k, v in to_row(result).items()}})


def read_videos(tars: list[Path]):
    """A Ray Dataset of video rows (`part`, `video_id`, `state`) from committed shard tars."""
    import ray

    ds = ray.data.read_webdataset([str(t) for t in tars], decoder=sample_from_members,
                                  suffixes=lambda ext: ext != "mp4")
    return ds.groupby(["part", "video_id"]).map_groups(video_rows, batch_format="pyarrow")


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


def _commit_part(out: Path, name: str, version: str, results: list[VideoResult], signature_frames: int) -> dict:
    from schemas.index import CLIP_SCHEMA, FAILURE_SCHEMA, PAIR_SCHEMA, clip_row, failure_row, pair_rows
    from stages.dedup import clip_signature
    from stages.shard import write_table

    samples = [s for r in results for s in r.samples]
    failures = [f for r in results for f in r.failures]
    folder = Storage.from_uri(out)
    write_table(folder, f"{name}.pairs.parquet", [row for s in samples for row in pair_rows(s, name)], PAIR_SCHEMA)
    write_table(folder, f"{name}.clips.parquet", [
        clip_row(s, name, clip_signature(s.frames, signature_frames) if signature_frames else None) for s in samples],
        CLIP_SCHEMA)
    write_table(folder, f"{name}.failures.parquet", [failure_row(f, name) for f in failures], FAILURE_SCHEMA)
    stats = {"shard": name, "version": version, "committed_at": time.time(), "num_clips": len(samples),
             "num_pairs": sum(len(s.pairs) for s in samples), "num_failures": len(failures),
             "failures_by_reason": dict(Counter(f.reason for f in failures)),
             "video_ids": [r.video_id for r in results]}
    folder.write_text(f"{name}.stats.json", json.dumps(stats, indent=1))
    return stats


def run_caption(run_dir: str | Path, cfg: RunConfig | CaptioningConfig | None = None, version: str | None = None,
                progress: bool = True, log_file: Path | None = None) -> dict:
    """Generate pairs for the clips of `run_dir`'s committed shards as annotation version `version`
    (default: the instruct prompt version). Resumable per part; returns counts and LLM usage. Ray starts (its
    lines to `log_file`) only when a part is left to do."""
    from pipeline.resume import committed_stats
    from stages.ray_runtime import init_ray
    from stages.shard import SHARDS_DIR

    run_dir = Path(run_dir)
    cap = _load_captioning(run_dir, cfg)
    run_cfg = cfg if isinstance(cfg, RunConfig) else RunConfig(captioning=cap)
    version = version or cap.instruct.prompt_version
    out = run_dir / ANNOTATIONS_DIR / version
    out.mkdir(parents=True, exist_ok=True)
    _check_version_config(out / "captioning.yaml", cap)
    for leftover in out.glob("*.tmp"):
        leftover.unlink()
    parts = [p for p in committed_stats(run_dir) if p["num_samples"] > 0]
    committed = {p["shard"] for p in parts if (out / f"{p['shard']}.stats.json").exists()}
    todo = [p["shard"] for p in parts if p["shard"] not in committed]
    expected = {name: set(pq.read_table(run_dir / SHARDS_DIR / f"{name}.clips.parquet",
                                        columns=["video_id"]).column("video_id").to_pylist()) for name in todo}
    counts = Counter(parts=len(parts), skipped=len(committed))
    started = time.time()
    if not todo:  # no Ray, no LLM server, no dedup actors to start for nothing
        log.info("caption %s: all %d parts of %s already have this version; nothing to do", version, len(parts),
                 run_dir)
        return {"version": version, "out": str(out), "seconds": 0.0, **counts, "usage": {}}
    init_ray(run_cfg.ray.address, run_cfg.ray.num_cpus, log_file)
    usage: dict = {}
    with captioning_session(run_cfg, run_dir, sorted(committed), out.relative_to(run_dir).as_posix()) as session:
        display = BuildProgress(sum(len(ids) for ids in expected.values()), enabled=progress,
                                live=session.live_counts, label=f"caption {version}")
        try:
            ds = apply_stages(read_videos([run_dir / SHARDS_DIR / f"{n}.tar" for n in todo]), session.stages)
            arrived: dict[str, list[VideoResult]] = defaultdict(list)
            for row in ds.iter_rows():
                result = from_row(row)
                check(result)  # stops at a rejected endpoint, before any commit
                name = row["part"]
                arrived[name].append(result)
                if {r.video_id for r in arrived[name]} >= expected[name]:
                    results = sorted(arrived.pop(name), key=lambda r: r.video_id)
                    stats = _commit_part(out, name, version, results,
                                         cap.filter.clip_hash_frames if cap.filter.drop_duplicate_clips else 0)
                    counts.update(done=1, clips=stats["num_clips"], pairs=stats["num_pairs"],
                                  failures=stats["num_failures"])
                    display.update(PartReceipt(
                        part=name, num_videos=len(results), num_clips=stats["num_clips"],
                        num_pairs=stats["num_pairs"], num_failures=stats["num_failures"],
                        failed_by_stage=dict(Counter(f.stage for r in results for f in r.failures))))
        finally:
            display.close()
        usage = session.usage()
    return {"version": version, "out": str(out), "seconds": round(time.time() - started, 2), **counts,
            "usage": usage}


def _check_version_config(path: Path, cap: CaptioningConfig) -> None:
    """An annotation version is made with one captioning config (execution-only sections may change)."""
    resolved = cap.model_dump(mode="json")
    if path.exists():
        check_unchanged(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, resolved,
                        f"{path.parent} was made with a different captioning config", "use another --version",
                        ignore=frozenset({"actors", "embedded_server", "cache_dir"}))
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
    overrides = {key.removeprefix("captioning."): value for key, value in parse_set_options(args.set).items()}
    section = apply_overrides(section, overrides)
    from stages.ray_runtime import ray_output_to

    cap = CaptioningConfig.model_validate(section)
    log_file = run_dir / "logs" / "hicom.log"
    with ray_output_to(log_file):  # Ray's own lines to the run's log, as in a build
        report = run_caption(run_dir, cap, args.version, progress=not args.no_progress, log_file=log_file)
    print(json.dumps(report, indent=1))
    return 0


def read_annotation_pairs(run_dir: str | Path, version: str) -> pa.Table:
    """All committed pairs of an annotation version (for stats or export)."""
    folder = Path(run_dir) / ANNOTATIONS_DIR / version
    files = [p.with_name(p.name.replace(".stats.json", ".pairs.parquet")) for p in sorted(folder.glob("*.stats.json"))]
    tables = [pq.read_table(f) for f in files if f.exists()]
    return pa.concat_tables(tables) if tables else pa.table({})
