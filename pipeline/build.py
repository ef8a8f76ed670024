"""Build: input -> probe -> split -> clip+decode -> pairs -> shards, streamed on Ray Data, resumable.

The driver ingests (cheap listing), skips what the run directory already committed, streams the rest
through the stages on Ray, and commits whole videos into shard parts as results arrive.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.captioning import captioning_session
from pipeline.category_select import select_by_category
from pipeline.recipe import recipe_stages
from pipeline.resume import committed_stats, scan_and_clean
from pipeline.run_dir import RunDirectory
from schemas import caption_reasons
from schemas.config import RunConfig
from schemas.records import VideoRecord, VideoResult
from stages import clip_decode, pairs, probe, split
from stages.ffmpeg_tools import check_binaries
from stages.ingest import ingest
from stages.ray_adapter import RayStage, from_row, to_row
from stages.shard import ShardWriter

log = logging.getLogger(__name__)
_MAX_BLOCKS = 1000


@dataclass
class BuildReport:
    run_dir: Path
    inputs_videos: int = 0
    inputs_failed_at_ingest: int = 0
    skipped_committed: int = 0
    processed_videos: int = 0
    new_clips: int = 0
    new_failures: int = 0
    seconds: float = 0.0
    pending: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    llm_usage: dict = field(default_factory=dict)
    deferred: list[str] = field(default_factory=list)  # videos to retry: an LLM endpoint was unavailable


def init_ray(cfg: RunConfig) -> None:
    """Connect to a cluster when an address is given, else start (or reuse) a local Ray."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, dashboard_host="127.0.0.1", **kwargs)


def stage_pipeline(cfg: RunConfig) -> list[tuple[RayStage, dict]]:
    """The stages in order, each with the Ray resources it declares."""
    return [
        (RayStage(probe.STAGE, probe.apply, cfg.probe), {**probe.RESOURCES, "concurrency": cfg.ray.probe_concurrency}),
        (RayStage(split.STAGE, split.apply, cfg.split), split.RESOURCES),
        *recipe_stages(cfg),  # length -> keyframes (configs/hicom248k.yaml)
        (RayStage(clip_decode.STAGE, clip_decode.apply, cfg.clip),
         {**clip_decode.RESOURCES, "concurrency": cfg.ray.clip_concurrency}),
        (RayStage(pairs.STAGE, pairs.apply, cfg.input), {}),
    ]


def run_stages_on_ray(cfg: RunConfig, videos: list[VideoRecord], extra_stages=()):
    """Yield a finished VideoResult per video, streamed from Ray Data. `extra_stages` (captioning) are
    callable classes run as actor pools over batches of videos."""
    import ray

    init_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ctx.op_resource_reservation_enabled = cfg.ray.op_resource_reservation
    rows = [to_row(VideoResult(video_id=v.id, source=v.relpath, video=v)) for v in videos]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), _MAX_BLOCKS))
    for stage, resources in stage_pipeline(cfg):
        options = {k: v for k, v in resources.items() if v is not None}
        ds = ds.map(stage, **options)
    for stage, options in extra_stages:
        ds = ds.map_batches(stage, **options)
    for row in ds.iter_rows():
        yield from_row(row)


class RunStorageError(RuntimeError):
    pass


def _write_or_stop(run_dir: Path, write, *args) -> None:
    """A shard write that fails (disk full, I/O error) stops the run with a clear message; the writer has
    already discarded the part, so nothing half-written is visible and a rerun resumes."""
    try:
        write(*args)
    except OSError as exc:
        raise RunStorageError(f"cannot write shards under {run_dir}: {exc}. Committed shards are intact; "
                              "free space and rerun the same command to resume.") from exc


def total_counts(run_dir: Path) -> dict:
    parts = committed_stats(run_dir)
    return {
        "shards": sum(1 for p in parts if p["num_samples"]),
        "parts": len(parts),
        "videos": sum(p["num_videos"] for p in parts),
        "clips": sum(p["num_samples"] for p in parts),
        "pairs": sum(p.get("num_pairs", 0) for p in parts),
        "failures": sum(p["num_failures"] for p in parts),
    }


def build(cfg: RunConfig, run_dir: str | Path, dry_run: bool = False, progress: bool = True) -> BuildReport:
    """Run (or resume) a build into `run_dir`. Rerunning the same config skips committed videos."""
    started = time.time()
    check_binaries()
    run_dir = Path(run_dir)
    report = BuildReport(run_dir=run_dir)
    ingested = ingest(cfg.input)
    report.inputs_videos = len(ingested.videos)
    report.inputs_failed_at_ingest = len(ingested.failures)
    run = RunDirectory(run_dir)
    if dry_run:
        state_ids = {v for p in committed_stats(run_dir) for v in p["video_ids"]} if run_dir.exists() else set()
        report.pending = [v.relpath for v in ingested.videos if v.id not in state_ids]
        report.skipped_committed = report.inputs_videos - len(report.pending)
        return report
    run.open(cfg)
    state = scan_and_clean(run_dir)
    pending = [v for v in ingested.videos if v.id not in state.video_ids]
    loose = [f for f in ingested.failures if f.item_id not in state.loose_failure_ids]
    report.skipped_committed = len(ingested.videos) - len(pending)
    log.info("%d videos to process, %d already committed, %d ingest failures",
             len(pending), report.skipped_committed, len(ingested.failures))
    writer = ShardWriter(run_dir, cfg.shard, next_index=state.next_index)
    writer.add_failures(loose)
    report.new_failures += len(loose)
    pending, rejected = select_by_category(cfg, run_dir, ingested.videos, pending)  # recipe.categories
    for result in rejected:
        _write_or_stop(run_dir, writer.add, result)
    report.new_failures += sum(len(r.failures) for r in rejected)
    if pending:
        failed_at: Counter[str] = Counter()
        bar = tqdm(total=len(pending), desc="videos", unit="video", disable=not progress)
        # The session starts the embedded LLM server when configured and always stops it.
        with captioning_session(cfg, run_dir, state.video_ids) as captioning:
            for result in run_stages_on_ray(cfg, pending, captioning.stages):
                if any(f.reason in caption_reasons.RETRY_LATER for f in result.failures):
                    report.deferred.append(result.video_id)  # the endpoint was away: not committed, rerun
                    bar.update(1)
                    continue
                result = captioning.finish(result)  # dataset-wide duplicates, in commit order
                _write_or_stop(run_dir, writer.add, result)
                report.processed_videos += 1
                report.new_clips += len(result.samples)
                report.new_failures += len(result.failures)
                failed_at.update(f.stage for f in result.failures)
                bar.update(1)
                bar.set_postfix(clips=report.new_clips, shards=len(writer.committed),
                                **{f"failed_{stage}": n for stage, n in sorted(failed_at.items())}, refresh=False)
            report.llm_usage = captioning.usage()
        bar.close()
    _write_or_stop(run_dir, writer.flush)
    report.counts = total_counts(run_dir)
    run.finish(report.counts, status="incomplete" if report.deferred else "finished")
    report.seconds = time.time() - started
    return report
