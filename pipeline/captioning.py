"""Captioning on Ray: caption -> instruct -> filter as actor pools, for `hicom build` and `hicom caption`.

`caption_stages(cfg, run_dir)` gives the stages to append to any Ray Dataset of video rows
(`apply_stages(ds, stages)`). `captioning_session` starts the embedded server when configured and gives the
stages, the same for `hicom build` and `hicom caption`: the dataset-wide clip dedup first (no LLM request for a
duplicate), then caption, instruct, filter, and the dataset-wide instruction cap (`stages/dedup_ray.py`,
partitioned actors: nothing in the driver). Before committing, each command calls `check`, which stops the
run at the first rejected request. The LLM stages are async actors with a bounded queue of videos each
(`queue_videos`): a finished video's slot takes the next one at once, so there is no batch barrier. Actor CPU reservations are sized from the cluster so the video stages
always keep a CPU.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from schemas import reasons as video_reasons
from schemas.caption import CaptionActorsConfig, CaptioningConfig
from schemas.config import RunConfig
from schemas.records import VideoResult
from stages import caption, dedup, filter as pair_filter, instruct
from stages.dedup_ray import dedup_stages
from stages.llm import LLMClient, ResponseCache, read_usage, summary_line, write_usage
from stages.ray_adapter import from_row, replace_state, stop_reason
from stages.ray_runtime import init_ray
from stages.shard import SHARDS_DIR

log = logging.getLogger(__name__)
ANNOTATIONS_DIR = "annotations"
USAGE_DIR = "logs/llm_usage"
USAGE_WRITE_S = 5.0  # how often an LLM actor rewrites its usage file while a batch runs
VIDEO_PATH_CPUS = 1.0  # probe/split/clip_decode tasks each declare 1 CPU: always left free for them


class CaptioningStopped(RuntimeError):
    """An endpoint rejected a request (401/403/404): the run stops, nothing of the batch is committed."""


def endpoint_stopped(detail: str) -> CaptioningStopped:
    """The error every command raises when an endpoint rejected a request (`detail`: which and how)."""
    return CaptioningStopped(f"stopped: {detail}. Videos with rejected requests were not committed; fix the "
                             "endpoint settings and rerun the same command")


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


class _LLMStage:
    """An async `map_batches` callable: one client per stage and actor, every video of a call concurrently,
    each guarded (an exception fails that video with internal_error, never the run)."""

    name = "stage"

    def __init__(self, captioning: dict, cache: str, usage_dir: str):
        self.cfg = CaptioningConfig.model_validate(captioning)
        self.cache = ResponseCache(cache) if self.cfg.cache_responses else None
        self.usage_path = Path(usage_dir) / f"{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.clients: dict[str, LLMClient] = {}
        self._calls_running = 0
        self._usage_writer: asyncio.Future | None = None

    async def process(self, result: VideoResult) -> VideoResult:
        raise NotImplementedError

    async def guarded(self, result: VideoResult) -> VideoResult:
        if result.failed:
            return result
        try:
            return await self.process(result)
        except Exception as exc:  # the record boundary
            log.exception("%s failed on %s", self.name, result.video_id)
            return result.fail_video(self.name, video_reasons.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    async def __call__(self, batch: pa.Table) -> pa.Table:
        # one usage writer per actor while any of its (up to max_tasks_in_flight_per_actor) calls runs
        self._calls_running += 1
        if self._usage_writer is None:
            self._usage_writer = asyncio.ensure_future(self._write_usage_every(USAGE_WRITE_S))
        try:
            results = await asyncio.gather(*(self.guarded(from_row(row)) for row in batch.to_pylist()))
        finally:
            self._calls_running -= 1
            if not self._calls_running:
                self._usage_writer.cancel()
                self._usage_writer = None
        self._write_usage()
        return replace_state(batch, list(results))

    def _write_usage(self) -> None:
        if self.clients:
            write_usage(self.usage_path, {name: c.usage for name, c in self.clients.items()})

    async def _write_usage_every(self, seconds: float) -> None:
        """While a batch runs (a video's requests can take minutes on a slow endpoint): the build's display
        reads these files, so its LLM counts move before the batch ends."""
        while True:
            await asyncio.sleep(seconds)
            self._write_usage()


class CaptionStage(_LLMStage):
    """Drop near-duplicate clips of a video (before any LLM is paid), then dense captions."""

    name = caption.STAGE

    def __init__(self, captioning: dict, cache: str, usage_dir: str):
        super().__init__(captioning, cache, usage_dir)
        if self.cfg.caption.mode != "source":
            self.clients["caption"] = LLMClient(self.cfg.caption.endpoint, self.cache)

    async def process(self, result: VideoResult) -> VideoResult:
        result = dedup.dedup_clips(result, self.cfg.filter)
        return await caption.acaption(result, self.cfg.caption, self.clients.get("caption"))


class InstructStage(_LLMStage):
    name = instruct.STAGE

    def __init__(self, captioning: dict, cache: str, usage_dir: str):
        super().__init__(captioning, cache, usage_dir)
        self.clients["instruct"] = LLMClient(self.cfg.instruct.endpoint, self.cache)

    async def process(self, result: VideoResult) -> VideoResult:
        return await instruct.ainstruct(result, self.cfg.instruct, self.clients["instruct"],
                                        self.cfg.keep_source_caption_pair)


class FilterStage:
    """Rules, duplicates and encoder scores over a batch of videos (one encoder pass); the encoder is
    loaded on the actor's first batch."""

    name = pair_filter.STAGE

    def __init__(self, captioning: dict, cache: str, usage_dir: str):
        self.cfg = CaptioningConfig.model_validate(captioning)
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        return replace_state(batch, self.run([from_row(row) for row in batch.to_pylist()]))


def actor_cpus(actors: CaptionActorsConfig, cluster_cpus: float) -> tuple[float, float]:
    """CPU reservations (per LLM actor, per filter actor) that leave `VIDEO_PATH_CPUS` to the video stages.
    Unset values are sized to fit; explicit ones that do not fit are refused with the settings to change."""
    budget = cluster_cpus - VIDEO_PATH_CPUS
    n_llm = 2 * actors.llm_actors  # caption and instruct pools
    llm = actors.llm_actor_cpus or min(0.25, max(budget, 0.0) * 0.2 / n_llm)
    left = budget - n_llm * llm
    filter_cpus = actors.filter_actor_cpus or min(1.0, left / actors.filter_actors)
    needed = VIDEO_PATH_CPUS + n_llm * llm + actors.filter_actors * filter_cpus
    if budget <= 0 or llm <= 0 or filter_cpus <= 0 or needed > cluster_cpus + 1e-9:
        raise ValueError(
            f"captioning actors need {needed:.2f} CPUs beside {VIDEO_PATH_CPUS:g} for the video stages, the "
            f"cluster has {cluster_cpus:g}: the run would hang. Lower captioning.actors.llm_actors / "
            "llm_actor_cpus / filter_actors / filter_actor_cpus (unset CPU values are sized automatically), "
            "or give Ray more CPUs (ray.num_cpus or a bigger cluster)")
    return llm, filter_cpus


def _cluster_cpus(cfg: RunConfig) -> float:
    import ray

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    return float(ray.cluster_resources().get("CPU", 0.0))


def caption_stages(cfg: RunConfig, run_dir: str | Path, base_url: str | None = None,
                   run_stamp: str | None = None, cluster_cpus: float | None = None) -> list[tuple[type, dict]]:
    """The captioning stages to append after `pairs`: `ds = ds.map_batches(stage, **options)` for each.
    `base_url`: the embedded server's URL when one runs (see `captioning_session`). Empty when the run has
    no enabled `captioning` section. Actor CPUs are sized from `ray.cluster_resources()`."""
    import ray

    cap = getattr(cfg, "captioning", None)
    if cap is None or not cap.enabled:
        return []
    cap = with_server(cap, base_url)
    a = cap.actors
    llm_cpus, filter_cpus = actor_cpus(a, _cluster_cpus(cfg) if cluster_cpus is None else cluster_cpus)
    usage_dir = Path(run_dir) / USAGE_DIR / (run_stamp or time.strftime("%Y%m%d-%H%M%S"))
    kwargs = {"captioning": cap.model_dump(mode="json"), "cache": str(cache_dir(cap, run_dir)),
              "usage_dir": str(usage_dir)}
    common = {"fn_constructor_kwargs": kwargs, "batch_format": "pyarrow"}
    llm = {**common, "batch_size": 1, "num_cpus": llm_cpus,
           "compute": ray.data.ActorPoolStrategy(size=a.llm_actors, max_tasks_in_flight_per_actor=a.queue_videos,
                                                 max_concurrent_calls_per_actor=a.queue_videos)}
    return [(CaptionStage, llm), (InstructStage, llm),
            (FilterStage, {**common, "batch_size": a.batch_videos, "num_cpus": filter_cpus,
                           "compute": ray.data.ActorPoolStrategy(size=a.filter_actors)})]


def apply_stages(ds, stages: list[tuple[type, dict]]):
    """`ds` (rows with `video_id` and `state`) through the captioning stages: one adapter for every command."""
    for stage, options in stages:
        ds = ds.map_batches(stage, **options)
    return ds


def check(result: VideoResult) -> None:
    """Raise CaptioningStopped before `result` (or anything after it) is committed, if an endpoint rejected
    one of its requests."""
    detail = stop_reason(result)  # stages/ray_adapter: the build's commit stage asks the same
    if detail is not None:
        raise endpoint_stopped(detail)


def deferred_message(n_videos: int, usage: dict) -> str:
    """Exit-3 message: how many videos wait for a rerun, and each endpoint's last error."""
    errors = "; ".join(f"{stage}: {u['last_error']}" for stage, u in sorted(usage.items()) if u.get("last_error"))
    return (f"{n_videos} videos were not committed because an LLM endpoint was unavailable "
            f"(last error: {errors or 'unknown'}); rerun the same command to finish them (answers already "
            "received are cached)")


def log_usage(usage: dict) -> None:
    """The usage summary, one line per stage, into the run's log (hicom.log)."""
    for stage, u in sorted(usage.items()):
        log.info("%s", summary_line(stage, u))
    if any(u.get("failed") for u in usage.values()):
        log.info("clips whose requests failed for good were committed without those pairs (failures say why); "
                 "`hicom caption RUN_DIR` generates them as a new annotation version")


@dataclass
class CaptioningSession:
    """What a command needs for captioning: the Ray stages (dataset dedup included) and usage totals."""

    stages: list[tuple[type, dict]] = field(default_factory=list)
    usage_dir: Path | None = None

    def _totals(self) -> dict:
        return read_usage(self.usage_dir) if self.usage_dir and self.usage_dir.exists() else {}

    def usage(self) -> dict:
        """Usage totals per stage (also logged)."""
        usage = self._totals()
        log_usage(usage)
        return usage

    def live_counts(self) -> str:
        """The requests so far, for the progress display: `llm instruct 7 sent, 5 ok, 1 failed` (sent: HTTP
        requests, retries included, so a slow first answer still shows work); empty without captioning."""
        parts = []
        for stage, u in sorted(self._totals().items()):
            extra = "".join(f", {u[key]} {word}" for key, word in (("cache_hits", "cached"), ("failed", "failed"))
                            if u.get(key))
            parts.append(f"llm {stage} {u.get('requests', 0)} sent, {u.get('succeeded', 0)} ok{extra}")
        return "; ".join(parts)


@contextlib.contextmanager
def captioning_session(cfg: RunConfig, run_dir: str | Path, committed_parts: list[str] = (),
                       index_dir: str = SHARDS_DIR) -> Iterator[CaptioningSession]:
    """Start the embedded server if configured (stopped on exit, whatever happens) and yield the session.
    `committed_parts` (their clip and pair indexes in `index_dir`, relative to `run_dir`) are what the
    dataset-wide dedup counts as already in the dataset. A run without an enabled `captioning` section yields an empty session."""
    cap = getattr(cfg, "captioning", None)
    if cap is None or not cap.enabled:
        yield CaptioningSession()
        return
    run_dir = Path(run_dir)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    # Dataset-wide dedup on partitioned Ray actors: clips before any LLM call, instructions after the filter.
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    before, after = dedup_stages(cap.filter, str(run_dir), list(committed_parts), index_dir=index_dir)
    with maybe_server(cap, run_dir) as base_url:
        yield CaptioningSession(stages=before + caption_stages(cfg, run_dir, base_url, stamp) + after,
                                usage_dir=run_dir / USAGE_DIR / stamp)


@contextlib.contextmanager
def maybe_server(cap: CaptioningConfig, run_dir: Path) -> Iterator[str | None]:
    if not cap.embedded_server.enabled:
        yield None
        return
    from pipeline.llm_server import embedded_server

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with embedded_server(cap.embedded_server, run_dir / "logs" / "llm_server.log") as base_url:
        yield base_url
