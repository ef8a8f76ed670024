"""Build: input -> probe -> split [-> fan out] -> clip+decode -> pairs [-> dedup -> caption -> instruct -> filter]
-> parts.

The driver coordinates; workers write. The driver reads the committed parts' markers and says what it will
skip and why. The input is listed and grouped by workers on Ray Data (`stages.ingest.input_dataset`), and the
rows already committed are dropped there (`stages/resume_filter.py`). The stages then run as plain Ray tasks
and actors (`pipeline/scheduler.py`): a task per video, a long video fanned out into clip batches that decode
on several workers (`stages/fan_out.py`), and a commit task per group of finished rows that writes a part to the
run's storage (`stages/ray_adapter.CommitStage`) and returns a receipt; the driver only passes ObjectRefs on and
counts receipts. When the stream ends, Ray tasks compact the parts into full-size shards (`pipeline/compact.py`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.captioning import captioning_session, endpoint_stopped
from pipeline.category_select import select_by_category
from pipeline.compact import compact, compact_group
from pipeline.progress import BuildProgress
from pipeline.recipe import recipe_stages
from pipeline.resume import CommittedState, committed_parts, committed_state, scan_and_clean
from pipeline.run_dir import RunDirectory
from pipeline.scheduler import COMMIT_RESOURCES, Scheduler
from schemas.config import RunConfig
from schemas.index import PartMarker, PartReceipt
from schemas.records import VideoResult
from stages import clip_decode, keyframes, pairs, probe, resume_filter, split
from stages.ffmpeg_tools import check_binaries
from stages.ingest import input_dataset, remote_input, run_local
from stages.ray_adapter import RayStage, from_row, to_row
from stages.ray_runtime import VIDEO_WORKER, init_ray, video_task_resources
from stages.ray_tasks import VideoPlan
from stages.storage import Storage

log = logging.getLogger(__name__)
_MAX_BLOCKS = 1000


@dataclass
class BuildReport:
    run_dir: Path | str
    inputs_videos: int = 0  # committed before + processed now (the input is counted as it streams)
    inputs_failed_at_ingest: int = 0
    skipped_committed: int = 0  # videos the markers already commit (skipped by the workers)
    processed_videos: int = 0
    new_clips: int = 0
    new_failures: int = 0
    seconds: float = 0.0
    pending: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    llm_usage: dict = field(default_factory=dict)
    deferred: list[str] = field(default_factory=list)  # videos to retry: an LLM endpoint was unavailable
    parts: list[str] = field(default_factory=list)  # parts committed by this run's workers
    writer_nodes: set[str] = field(default_factory=set)


class RunStorageError(RuntimeError):
    pass


def _storage_error(run: str, detail: str) -> RunStorageError:
    return RunStorageError(f"cannot write shards under {run}: {detail}. Committed parts are intact; free space "
                           "(or fix the store) and rerun the same command to resume.")


def stage_pipeline(cfg: RunConfig) -> tuple[list[RayStage], list[RayStage]]:
    """The record-level stages in order, as (before the fan-out, after it); the second list is empty when
    nothing fans out. One video task runs the first list (and the second for a video that does not fan out)."""
    probe_stage = RayStage(probe.STAGE, probe.apply, cfg.probe)
    split_stage = RayStage(split.STAGE, split.apply, cfg.split)
    clip_stage = RayStage(clip_decode.STAGE, clip_decode.apply, cfg.clip)
    pairs_stage = RayStage(pairs.STAGE, pairs.apply, cfg.input)
    if remote_input(cfg.input):
        # One local copy per video (fetched, hashed, deleted) serves every FFmpeg step, so an object-store
        # source is not fanned out: each clip batch would download the whole file again.
        fetch = RayStage(probe.STAGE, run_local, cfg.input, cfg.probe.max_file_bytes,
                         [probe_stage.run, split_stage.run, clip_stage.run])
        return [fetch, pairs_stage], []
    probe_and_hash = RayStage(probe.STAGE, run_local, cfg.input, cfg.probe.max_file_bytes, [probe_stage.run])
    return [probe_and_hash, split_stage, *recipe_stages(cfg)], [clip_stage, pairs_stage]  # sha256 in the probe


def video_task_options() -> dict:
    """A video task runs probe .. pairs one after another: it asks for the most any of them declares, and for
    `video_worker` (FFmpeg stays on the video nodes)."""
    cpus = max(r["num_cpus"] for r in (probe.RESOURCES, split.RESOURCES, clip_decode.RESOURCES, keyframes.RESOURCES))
    return {"num_cpus": cpus, **video_task_resources()}


def _signature_frames(cfg: RunConfig) -> int:
    cap = cfg.captioning
    return cap.filter.clip_hash_frames if cap is not None and cap.enabled and cap.filter.drop_duplicate_clips else 0


def pending_rows(cfg: RunConfig, state: CommittedState):
    """The input as a Ray Dataset of rows not committed yet: listed, grouped and filtered by workers
    (the driver holds only the committed ids it read from the markers)."""
    return input_dataset(cfg.input).map_batches(
        resume_filter.skip_committed, batch_format="pyarrow", **resume_filter.RESOURCES,
        fn_kwargs={"videos": resume_filter.sorted_ids(state.video_ids),
                   "loose": resume_filter.sorted_ids(state.loose_failure_ids)})


def configure_ray_data(cfg: RunConfig) -> None:
    """The Ray Data options of the input listing (the build's only Ray Data pass). A Dataset copies the current
    DataContext when it is created, so this runs before the listing exists; set later, the options would not
    reach it."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    # Ray Data reserves part of the CPU budget per operator: on a small machine that only strands CPUs
    ctx.op_resource_reservation_enabled = False


def run_stages_on_ray(cfg: RunConfig, storage: Storage, rows, extra_stages=(),
                      partial: dict[str, tuple[int, set[int]]] | None = None) -> Iterator[PartReceipt]:
    """Run `rows` (a Ray Dataset of `{"video_id", "state"}`) through the stages and commit them as parts, on
    plain Ray tasks and actors (`pipeline/scheduler.py`); yield one receipt per committed part. `extra_stages`
    (dedup, captioning) are `(callable, map_batches options)` run after `pairs`; `partial`: clip batches
    already committed (`CommittedState.partial`)."""
    before, after = stage_pipeline(cfg)
    plan = VideoPlan(before, after, cfg.clip.clips_per_task, partial or {})
    scheduler = Scheduler(cfg, storage, plan, video_task_options(), list(extra_stages), _signature_frames(cfg))
    yield from scheduler.receipts(rows)


def _check_placement(cfg: RunConfig) -> None:
    import ray

    if not ray.cluster_resources().get(VIDEO_WORKER):
        raise RuntimeError(f"no node of the Ray cluster at {cfg.ray.address} offers the {VIDEO_WORKER!r} resource "
                           "the video stages need: start video nodes with "
                           f"--resources='{{\"{VIDEO_WORKER}\": <cpus>}}' (ray_cluster.yaml: cpu_video)")


def compact_on_ray(cfg: RunConfig, storage: Storage, groups: list[tuple[str, list[PartMarker]]]
                   ) -> list[PartMarker]:
    """Run compaction groups as Ray tasks: the workers read and write the bytes."""
    import ray

    local = storage.local_path()
    init_ray(cfg.ray.address, cfg.ray.num_cpus, local / "logs" / "hicom.log" if local else None)
    task = ray.remote(num_cpus=COMMIT_RESOURCES["num_cpus"])(compact_group)
    return ray.get([task.remote(storage, name, parts) for name, parts in groups])


def total_counts(run: str | Path | Storage) -> dict:
    parts = committed_parts(run)
    return {"shards": sum(1 for p in parts if p.num_samples), "parts": len(parts),
            "videos": sum(p.num_videos for p in parts), "clips": sum(p.num_samples for p in parts),
            "pairs": sum(p.num_pairs for p in parts), "failures": sum(p.num_failures for p in parts)}


def _announce(state: CommittedState, previously_deferred: set[str]) -> None:
    """What the build will skip and why, before it starts: from the markers and the run manifest only (the
    input is listed by the workers: the number to process is counted next, on them)."""
    log.info("plan: %d videos already committed (skipped), %d ingest failures already committed (skipped); "
             "the inputs to process are counted next, on the workers", len(state.video_ids),
             len(state.loose_failure_ids))
    if state.partial:
        log.info("plan: %d long videos have %d of their clip batches committed: only the missing batches run",
                 len(state.partial), sum(len(done) for _, done in state.partial.values()))
    retried = sorted(previously_deferred - state.video_ids)
    if retried:
        log.info("plan: %d videos were deferred by an unavailable LLM endpoint last run and are retried now: %s",
                 len(retried), ", ".join(retried[:5]) + (" ..." if len(retried) > 5 else ""))


def _listed(row: dict) -> dict:
    result = from_row(row)
    return {"relpath": result.source, "failed": result.video is None}


def _dry_run(cfg: RunConfig, storage: Storage, report: BuildReport) -> BuildReport:
    """List the input on Ray and say what a build would process (the relpaths are collected: they are printed)."""
    init_ray(cfg.ray.address, cfg.ray.num_cpus, None)
    configure_ray_data(cfg)
    state = committed_state(storage)
    for row in pending_rows(cfg, state).map(_listed).iter_rows():
        if row["failed"]:
            report.inputs_failed_at_ingest += 1
        else:
            report.pending.append(row["relpath"])
    report.skipped_committed = len(state.video_ids)
    report.inputs_videos = report.skipped_committed + len(report.pending)
    report.inputs_failed_at_ingest += len(state.loose_failure_ids)
    return report


def _category_rows(cfg: RunConfig, local: Path, state: CommittedState):
    """recipe.categories ranks every input video against all others, so this mode (only) collects the input
    listing in the driver; the rows it returns are the kept videos, the rejected ones (failed, committed by the
    commit stage like any video) and the ingest failures not committed yet."""
    import ray

    results = [from_row(r) for r in input_dataset(cfg.input).iter_rows()]
    videos = [r.video for r in results if r.video is not None]
    pending = [v for v in videos if v.id not in state.video_ids]
    keep, rejected = select_by_category(cfg, local, videos, pending)
    rows = [to_row(VideoResult(video_id=v.id, source=v.relpath, video=v)) for v in keep]
    rows += [to_row(r) for r in rejected]
    rows += [to_row(r) for r in results if r.video is None and r.video_id not in state.loose_failure_ids]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), _MAX_BLOCKS)))


def build(cfg: RunConfig, run_dir: str | Path, dry_run: bool = False, progress: bool = True) -> BuildReport:
    """Run (or resume) a build into `run_dir` (a path or an object store URI). Rerunning the same config
    skips committed videos; a kill loses only the videos (or clip batches) in flight."""
    started = time.time()
    check_binaries()
    storage = Storage.from_uri(run_dir)
    report = BuildReport(run_dir=Path(run_dir) if storage.is_local else storage.uri())
    if dry_run:
        return _dry_run(cfg, storage, report)
    run = RunDirectory(storage)
    previously_deferred = set(run.read_manifest().get("deferred_video_ids", []))
    run.open(cfg)
    state = scan_and_clean(storage)
    report.skipped_committed = len(state.video_ids)
    _announce(state, previously_deferred)
    local = storage.local_path()
    init_ray(cfg.ray.address, cfg.ray.num_cpus, local / "logs" / "hicom.log" if local else None)
    if cfg.ray.address:
        _check_placement(cfg)
    configure_ray_data(cfg)
    if cfg.recipe is not None and cfg.recipe.categories is not None:
        if local is None:
            raise ValueError("recipe.categories needs a local run directory (its scoring pass writes local parquet)")
        rows = _category_rows(cfg, local, state)
    else:
        # Listed once, by the workers, into the object store (grouping by source is a barrier anyway): the
        # driver gets only the row count, for the plan and the ETA, and the stages stream from these blocks.
        rows = pending_rows(cfg, state).materialize()
    total = rows.count()
    log.info("plan: %d inputs to process (videos not committed yet, and ingest failures not recorded yet)", total)
    with captioning_session(cfg, report.run_dir, state.parts) as captioning:
        display = BuildProgress(total, enabled=progress, live=captioning.live_counts)
        try:  # the display's periodic line stops with the build, whichever way it ends
            for receipt in run_stages_on_ray(cfg, storage, rows, captioning.stages, state.partial):
                if receipt.storage_error:
                    raise _storage_error(storage.uri(), receipt.storage_error)
                if receipt.stop_reason:  # an endpoint rejected a request: the video was not committed
                    raise endpoint_stopped(receipt.stop_reason)
                display.update(receipt)
                report.deferred += receipt.deferred
                report.processed_videos += receipt.num_videos
                report.inputs_failed_at_ingest += receipt.num_loose_failures
                report.new_clips += receipt.num_clips
                report.new_failures += receipt.num_failures
                if receipt.part:
                    report.parts.append(receipt.part)
                    report.writer_nodes.add(receipt.writer_node_id or "")
        finally:
            display.close()
        report.llm_usage = captioning.usage()
    report.deferred = sorted(set(report.deferred))  # a fanned-out video may be deferred by several batches
    report.inputs_videos = report.skipped_committed + report.processed_videos + len(report.deferred)
    report.inputs_failed_at_ingest += len(state.loose_failure_ids)
    if cfg.shard.compact:  # also compacts parts a killed run committed
        try:
            compact(storage, cfg.shard, lambda st, groups: compact_on_ray(cfg, st, groups))
        except Exception as exc:  # a task's OSError arrives wrapped in Ray's task error
            if isinstance(exc, OSError) or isinstance(getattr(exc, "cause", None), OSError):
                raise _storage_error(storage.uri(), str(getattr(exc, "cause", exc))) from exc
            raise
    report.counts = total_counts(storage)
    run.finish(report.counts, status="incomplete" if report.deferred else "finished", deferred=report.deferred)
    report.seconds = time.time() - started
    return report
