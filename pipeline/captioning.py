"""Captioning in a build: caption -> instruct -> filter on Ray actor pools.

`captioning_session(cfg, run_dir, committed_ids, committed_parts)` starts the embedded server when configured
and gives the Ray stages to append after the pairs stage (`ds.map_batches(stage, **options)`): the dataset-wide
clip dedup first (no LLM request for a duplicate), then caption, instruct, filter, and the dataset-wide
instruction cap (`stages/dedup_ray.py`, partitioned actors: nothing in the driver). `hicom caption RUN_DIR` (a new
annotation version over existing shards) lives in `pipeline/caption_command.py`.
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
from schemas.caption import CaptioningConfig
from schemas.config import RunConfig
from schemas.records import VideoResult
from stages import caption, dedup, filter as pair_filter, instruct
from stages.dedup_ray import dedup_stages
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
    """What `hicom build` needs for captioning: Ray stages and usage totals (`dedup`: an in-process
    `DatasetDedup` for callers that apply it themselves; the build's dedup runs in its Ray stages)."""

    stages: list[tuple[type, dict]] = field(default_factory=list)
    dedup: dedup.DatasetDedup | None = None
    usage_dir: Path | None = None

    def finish(self, result: VideoResult) -> VideoResult:
        """Dataset-wide duplicates (driver side, commit order); call on each result before committing it."""
        return self.dedup.apply(result) if self.dedup is not None and not result.failed else result

    def usage(self) -> dict:
        return read_usage(self.usage_dir) if self.usage_dir and self.usage_dir.exists() else {}


@contextlib.contextmanager
def captioning_session(cfg: RunConfig, run_dir: str | Path, committed_video_ids: set[str] = frozenset(),
                       committed_parts: list[str] = ()) -> Iterator[CaptioningSession]:
    """Start the embedded server if configured (stopped on exit, whatever happens) and yield the session.
    A run without an enabled `captioning` section yields an empty session (no stages, finish = identity)."""
    cap = getattr(cfg, "captioning", None)
    if cap is None or not cap.enabled:
        yield CaptioningSession()
        return
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Dataset-wide dedup on partitioned Ray actors: clips before any LLM call, instructions after the filter.
    before, after = dedup_stages(cap.filter, str(run_dir), list(committed_parts))
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
