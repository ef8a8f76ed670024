"""Build: input -> probe -> split -> clip+decode -> pairs [-> dedup -> caption -> instruct -> filter] -> parts.

The driver coordinates; workers write. The driver ingests, reads the committed parts' markers, says what it
will skip and why, and streams the pending videos through the stages on Ray Data. The last stage commits
each batch of finished videos as a part on the run's storage (`stages/ray_adapter.CommitStage`) and
returns a receipt; the driver only counts receipts. When the stream ends, Ray tasks compact the parts
into full-size shards (`pipeline/compact.py`).
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
from pipeline.resume import committed_parts, committed_state, scan_and_clean
from pipeline.run_dir import RunDirectory
from schemas.config import RunConfig
from schemas.index import PartMarker, PartReceipt
from schemas.records import VideoRecord, VideoResult
from stages import clip_decode, pairs, probe, split
from stages.ffmpeg_tools import check_binaries
from stages.ingest import ingest, remote_input, run_local
from stages.ray_adapter import RECEIPT_COLUMN, RayStage, commit_batch, to_row
from stages.ray_runtime import VIDEO_WORKER, init_ray, video_task_resources
from stages.shard import PartWriter, part_name_for
from stages.storage import Storage

log = logging.getLogger(__name__)
_MAX_BLOCKS = 1000
COMMIT_RESOURCES = {"num_cpus": 0.25}  # writing a part is I/O; it must not hold a core FFmpeg could use


@dataclass
class BuildReport:
    run_dir: Path | str
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
    parts: list[str] = field(default_factory=list)  # parts committed by this run's workers
    writer_nodes: set[str] = field(default_factory=set)


class RunStorageError(RuntimeError):
    pass


def _storage_error(run: str, detail: str) -> RunStorageError:
    return RunStorageError(f"cannot write shards under {run}: {detail}. Committed parts are intact; free space "
                           "(or fix the store) and rerun the same command to resume.")


def _commit_failures_only(storage: Storage, name: str, results: list[VideoResult], loose=()) -> None:
    """A part of failure rows only (no sample bytes), small enough for the driver to write itself."""
    try:
        PartWriter(storage).write(name, results, list(loose))
    except OSError as exc:
        raise _storage_error(storage.uri(), str(exc)) from exc


def stage_pipeline(cfg: RunConfig) -> list[tuple[RayStage, dict]]:
    """The stages in order, each with the Ray resources it declares; FFmpeg stages ask for `video_worker`."""
    video = video_task_resources()
    probe_stage = RayStage(probe.STAGE, probe.apply, cfg.probe)
    split_stage = RayStage(split.STAGE, split.apply, cfg.split)
    clip_stage = RayStage(clip_decode.STAGE, clip_decode.apply, cfg.clip)
    pairs_stage = (RayStage(pairs.STAGE, pairs.apply, cfg.input), {})
    if remote_input(cfg.input):  # one local copy per video (fetched, hashed, deleted) serves every FFmpeg step
        fetch = RayStage(probe.STAGE, run_local, cfg.input, cfg.probe.max_file_bytes,
                         [probe_stage.run, split_stage.run, clip_stage.run])
        return [(fetch, {**clip_decode.RESOURCES, **video, "concurrency": cfg.ray.clip_concurrency}), pairs_stage]
    probe_and_hash = RayStage(probe.STAGE, run_local, cfg.input, cfg.probe.max_file_bytes, [probe_stage.run])
    return [
        (probe_and_hash, {**probe.RESOURCES, **video, "concurrency": cfg.ray.probe_concurrency}),  # sha256 here
        (split_stage, {**split.RESOURCES, **video}),
        *[(stage, {**resources, **video}) for stage, resources in recipe_stages(cfg)],  # length -> keyframes
        (clip_stage, {**clip_decode.RESOURCES, **video, "concurrency": cfg.ray.clip_concurrency}),
        pairs_stage,
    ]


def _signature_frames(cfg: RunConfig) -> int:
    cap = cfg.captioning
    return cap.filter.clip_hash_frames if cap is not None and cap.enabled and cap.filter.drop_duplicate_clips else 0


def run_stages_on_ray(cfg: RunConfig, storage: Storage, videos: list[VideoRecord],
                      extra_stages=()) -> Iterator[PartReceipt]:
    """Stream `videos` through the stages and the commit stage; yield one receipt per committed part.
    `extra_stages` (dedup, captioning) are `(callable, map_batches options)` run after `pairs`."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ctx.op_resource_reservation_enabled = cfg.ray.op_resource_reservation
    rows = [to_row(VideoResult(video_id=v.id, source=v.relpath, video=v)) for v in videos]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), _MAX_BLOCKS))
    for stage, resources in stage_pipeline(cfg):
        ds = ds.map(stage, **{k: v for k, v in resources.items() if v is not None})
    for stage, options in extra_stages:
        ds = ds.map_batches(stage, **options)
    ds = ds.map_batches(commit_batch, batch_size=cfg.shard.videos_per_part, batch_format="pyarrow",
                        fn_kwargs={"run_uri": storage.uri(), "signature_frames": _signature_frames(cfg)},
                        **COMMIT_RESOURCES)
    for row in ds.iter_rows():
        yield PartReceipt.model_validate_json(row[RECEIPT_COLUMN])


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


def _announce(report: BuildReport, loose: int, previously_deferred: set[str], pending: list[VideoRecord]) -> None:
    """What the build will skip and why, before it starts."""
    log.info("plan: %d inputs: %d videos already committed (skipped), %d to process, %d failed at ingest "
             "(%d new)", report.inputs_videos + report.inputs_failed_at_ingest, report.skipped_committed,
             len(pending), report.inputs_failed_at_ingest, loose)
    retried = sorted(previously_deferred & {v.id for v in pending})
    if retried:
        log.info("plan: %d videos were deferred by an unavailable LLM endpoint last run and are retried now: %s",
                 len(retried), ", ".join(retried[:5]) + (" ..." if len(retried) > 5 else ""))


def build(cfg: RunConfig, run_dir: str | Path, dry_run: bool = False, progress: bool = True) -> BuildReport:
    """Run (or resume) a build into `run_dir` (a path or an object store URI). Rerunning the same config
    skips committed videos; a kill loses only the videos in flight."""
    started = time.time()
    check_binaries()
    storage = Storage.from_uri(run_dir)
    report = BuildReport(run_dir=Path(run_dir) if storage.is_local else storage.uri())
    ingested = ingest(cfg.input.model_copy(update={"hash_files": False}))  # workers hash (run_local)
    report.inputs_videos = len(ingested.videos)
    report.inputs_failed_at_ingest = len(ingested.failures)
    if dry_run:
        committed = committed_state(storage).video_ids
        report.pending = [v.relpath for v in ingested.videos if v.id not in committed]
        report.skipped_committed = report.inputs_videos - len(report.pending)
        return report
    run = RunDirectory(storage)
    previously_deferred = set(run.read_manifest().get("deferred_video_ids", []))
    run.open(cfg)
    state = scan_and_clean(storage)
    pending = [v for v in ingested.videos if v.id not in state.video_ids]
    loose = [f for f in ingested.failures if f.item_id not in state.loose_failure_ids]
    report.skipped_committed = len(ingested.videos) - len(pending)
    _announce(report, len(loose), previously_deferred, pending)
    if loose:  # failures of no video
        _commit_failures_only(storage, part_name_for(f.item_id for f in loose), [], loose)
        report.new_failures += len(loose)
    local = storage.local_path()
    if pending and cfg.recipe is not None and cfg.recipe.categories is not None:
        if local is None:
            raise ValueError("recipe.categories needs a local run directory (its scoring pass writes local parquet)")
        init_ray(cfg.ray.address, cfg.ray.num_cpus, local / "logs" / "hicom.log")
        pending, rejected = select_by_category(cfg, local, ingested.videos, pending)
        if rejected:
            _commit_failures_only(storage, part_name_for(r.video_id for r in rejected), rejected)
            report.new_failures += sum(len(r.failures) for r in rejected)
    if pending:
        init_ray(cfg.ray.address, cfg.ray.num_cpus, local / "logs" / "hicom.log" if local else None)
        if cfg.ray.address:
            _check_placement(cfg)
        display = BuildProgress(len(pending), enabled=progress)
        try:  # the display's periodic line stops with the build, whichever way it ends
            with captioning_session(cfg, report.run_dir, state.parts) as captioning:
                for receipt in run_stages_on_ray(cfg, storage, pending, captioning.stages):
                    if receipt.storage_error:
                        raise _storage_error(storage.uri(), receipt.storage_error)
                    if receipt.stop_reason:  # an endpoint rejected a request: the video was not committed
                        raise endpoint_stopped(receipt.stop_reason)
                    display.update(receipt)
                    report.deferred += receipt.deferred
                    report.processed_videos += receipt.num_videos
                    report.new_clips += receipt.num_clips
                    report.new_failures += receipt.num_failures
                    if receipt.part:
                        report.parts.append(receipt.part)
                        report.writer_nodes.add(receipt.writer_node_id or "")
                report.llm_usage = captioning.usage()
        finally:
            display.close()
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
