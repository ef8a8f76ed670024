"""The build's scheduler: the stages as plain Ray tasks and actors, driven by a loop that holds ObjectRefs.

Each input video is one task (`stages/ray_tasks.run_video`: probe .. clip+decode .. pairs); a video whose plan
fans out comes back as clip batches, each its own task on any worker. Finished rows go through the extra stages
(dataset dedup, captioning: actor pools and tasks, batched as their options say) and are committed
`videos_per_part` at a time by a commit task that gets their ObjectRefs: sample bytes go from worker to worker
through the object store, and the driver receives only small plans and receipts.

Why not Ray Data's executor for this part: its scheduling loop runs in the driver and two helper actors poll
with it (measured: 49-108 ms of driver CPU per wall second plus 0.46-3.02 ms per committed clip), which bounded the
clips/s one driver could coordinate. Here the driver's work is a task submission per video or batch, a
`ray.wait` over what is in flight, and a receipt per part. The input listing still runs on Ray Data
(`pipeline.build.pending_rows`), whose blocks the video tasks read in place.

Order: with `ray.preserve_order` (the default) parts are cut from consecutive rows in input order (a long video's
batches in batch order), so the same input gives the same parts; otherwise rows commit as they finish.
Backpressure: at most `max_running` video/batch tasks are submitted at once, and no new video is admitted while
`window` rows are uncommitted.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from schemas.config import RunConfig
from schemas.index import PartReceipt
from stages.ray_runtime import VIDEO_WORKER
from stages.ray_tasks import StageActor, VideoPlan, call_stage, commit_rows, run_batch, run_video
from stages.storage import Storage

log = logging.getLogger(__name__)
COMMIT_RESOURCES = {"num_cpus": 0.25}  # writing a part is I/O; it must not hold a core FFmpeg could use


@dataclass
class _Row:
    """A video, or one clip batch of a fanned-out video, on its way to a part."""

    ref: object = None  # ObjectRef of its row, once a task produced it
    stage: int = 0  # extra stages done


@dataclass
class _Video:
    rows: list[_Row] | None = None  # None while its video task runs


@dataclass
class _Call:
    """One submitted stage call: the pool slot (actor) it holds until all of its `left` returns are back."""

    slot: int
    left: int


class StagePool:
    """One extra stage, from its `map_batches` options: an actor pool (`compute=ActorPoolStrategy`) of
    `StageActor`s, or a task per call. `batch_size` rows per call."""

    def __init__(self, fn, options: dict, task_limit: int):
        import ray

        self.batch_size = options.get("batch_size") or 1
        num_cpus = options.get("num_cpus", 1)
        compute = options.get("compute")
        self.queue: collections.deque[_Row] = collections.deque()
        self.in_flight = 0  # rows
        if compute is None:
            self.actors, self.per_actor = [], task_limit
            self.task, self.num_cpus = ray.remote(call_stage), num_cpus
            self.fn, self.fn_kwargs = fn, options.get("fn_kwargs") or {}
            self.load = [0]
            return
        self.per_actor = compute.max_tasks_in_flight_per_actor or 1
        actor = ray.remote(StageActor).options(num_cpus=num_cpus, max_concurrency=max(self.per_actor, 1),
                                               max_restarts=3, max_task_retries=3)
        kwargs = options.get("fn_constructor_kwargs") or {}
        self.actors = [actor.remote(fn, kwargs) for _ in range(compute.max_size or compute.min_size or 1)]
        self.load = [0] * len(self.actors)

    def free_slot(self) -> int | None:
        i = min(range(len(self.load)), key=self.load.__getitem__)
        return i if self.load[i] < self.per_actor else None

    def submit(self, rows: list[_Row], slot: int) -> list:
        refs = [r.ref for r in rows]
        if self.actors:
            out = self.actors[slot].run.options(num_returns=len(rows)).remote(*refs)
        else:
            out = self.task.options(num_cpus=self.num_cpus, num_returns=len(rows)).remote(self.fn, self.fn_kwargs,
                                                                                          *refs)
        self.load[slot] += 1
        self.in_flight += len(rows)
        return out if len(rows) > 1 else [out]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


@dataclass
class Scheduler:
    """The driver loop of one build (see the module docstring); iterate `receipts()`."""

    cfg: RunConfig
    storage: Storage
    plan: VideoPlan
    video_options: dict  # Ray options of the video and clip batch tasks
    extra_stages: list = field(default_factory=list)
    signature_frames: int = 0

    def receipts(self, rows) -> Iterator[PartReceipt]:
        """`rows`: a Ray Dataset of input rows (`{"video_id", "state"}`); one receipt per committed part."""
        import ray

        self._ray = ray
        video_cpus = ray.cluster_resources().get(VIDEO_WORKER) or ray.cluster_resources().get("CPU", 1)
        self.max_running = self.cfg.ray.max_video_tasks or max(2, int(2 * video_cpus))
        self.pools = [StagePool(fn, options, self.max_running) for fn, options in self.extra_stages]
        per_part = self.cfg.shard.videos_per_part
        self.window = self.max_running + sum(len(p.load) * p.per_actor * p.batch_size for p in self.pools) \
            + 2 * per_part
        self.video_task = ray.remote(run_video).options(num_returns=2, **self.video_options)
        self.batch_task = ray.remote(run_batch).options(**self.video_options)
        self.commit_task = ray.remote(commit_rows).options(**COMMIT_RESOURCES)
        self.plan_ref = ray.put(self.plan)
        self.inputs = ((entry.ref, i) for bundle in rows.iter_internal_ref_bundles()
                       for entry in bundle.blocks for i in range(entry.metadata.num_rows))
        self.inputs_left = True
        self.videos: collections.deque[_Video] = collections.deque()
        self.batches_to_run: collections.deque[tuple[_Row, object, int]] = collections.deque()
        self.waiting: dict[object, Callable[[object], None]] = {}
        self.running = 0
        self.open_rows = 0
        self.done: list[PartReceipt] = []
        try:
            while True:
                self._admit()
                self._dispatch()
                self._commit()
                yield from self.done
                self.done.clear()
                if not self.waiting:
                    break
                for ref in self._wait():
                    self.waiting.pop(ref)(ref)
        finally:  # the consumer stopped early (an error, a rejected endpoint): stop what is still running
            for ref in self.waiting:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            for pool in self.pools:
                pool.close()

    # --- admission: video tasks, then the clip batches they fan out into

    def _admit(self) -> None:
        while self.running < self.max_running and self.batches_to_run:
            row, batches_ref, index = self.batches_to_run.popleft()
            self._run(row, self.batch_task.remote(self.plan_ref, batches_ref, index))
        while self.running < self.max_running and self.open_rows < self.window and self.inputs_left:
            item = next(self.inputs, None)
            if item is None:
                self.inputs_left = False
                break
            video = _Video()
            self.videos.append(video)
            self.running += 1
            self.open_rows += 1
            meta, payload = self.video_task.remote(self.plan_ref, *item)
            self.waiting[meta] = lambda ref, video=video, payload=payload: self._planned(video, ref, payload)

    def _planned(self, video: _Video, meta_ref, payload) -> None:
        finished, count = self._ray.get(meta_ref)
        self.running -= 1
        self.open_rows += count - 1
        video.rows = [_Row() for _ in range(count)]
        if finished:
            video.rows[0].ref = payload
            self._advance(video.rows[0])
            return
        for index, row in enumerate(video.rows):
            self.batches_to_run.append((row, payload, index))

    def _run(self, row: _Row, ref) -> None:
        self.running += 1

        def finished(ref, row=row):
            self.running -= 1
            row.ref = ref
            self._advance(row)
        self.waiting[ref] = finished

    # --- extra stages

    def _advance(self, row: _Row) -> None:
        if row.stage < len(self.pools):
            self.pools[row.stage].queue.append(row)

    def _final(self, row: _Row) -> bool:
        return row.ref is not None and row.stage == len(self.pools)

    def _upstream_idle(self, stage: int) -> bool:
        """Whether no row can reach stage `stage` any more without its queue being sent (so a short batch goes)."""
        if self.running or self.batches_to_run or (self.inputs_left and self.open_rows < self.window):
            return False
        return not any(p.queue or p.in_flight for p in self.pools[:stage])

    def _dispatch(self) -> None:
        for stage, pool in enumerate(self.pools):
            while pool.queue and (len(pool.queue) >= pool.batch_size or self._upstream_idle(stage)):
                slot = pool.free_slot()
                if slot is None:
                    break
                rows = [pool.queue.popleft() for _ in range(min(pool.batch_size, len(pool.queue)))]
                call = _Call(slot, left=len(rows))
                for row, ref in zip(rows, pool.submit(rows, slot)):
                    self.waiting[ref] = lambda ref, row=row, call=call, pool=pool: self._stage_done(pool, call,
                                                                                                    row, ref)

    def _stage_done(self, pool: StagePool, call: _Call, row: _Row, ref) -> None:
        row.ref, row.stage = ref, row.stage + 1
        pool.in_flight -= 1
        call.left -= 1
        if not call.left:
            pool.load[call.slot] -= 1
        self._advance(row)

    # --- commit

    def _ready_rows(self) -> list[_Row]:
        """Finished rows that may be committed now: with preserve_order, the run of them at the head of the
        input order; otherwise all."""
        rows = []
        for video in self.videos:
            if video.rows is None:
                if self.cfg.ray.preserve_order:
                    break
                continue
            for row in video.rows:
                if not self._final(row):
                    if self.cfg.ray.preserve_order:
                        return rows
                    continue
                rows.append(row)
        return rows

    def _commit(self) -> None:
        per_part = self.cfg.shard.videos_per_part
        ready = self._ready_rows()
        everything_else_idle = self._upstream_idle(len(self.pools))
        while len(ready) >= per_part or (ready and everything_else_idle):
            group, ready = ready[:per_part], ready[per_part:]
            self._forget(group)
            ref = self.commit_task.remote(self.storage.uri(), self.signature_frames, *[r.ref for r in group])
            self.waiting[ref] = self._receipt

    def _forget(self, group: list[_Row]) -> None:
        committed = {id(r) for r in group}
        self.open_rows -= len(group)
        for video in self.videos:
            if video.rows is not None:
                video.rows = [r for r in video.rows if id(r) not in committed]
        while self.videos and self.videos[0].rows == []:
            self.videos.popleft()
        if not self.cfg.ray.preserve_order:
            self.videos = collections.deque(v for v in self.videos if v.rows != [])

    def _receipt(self, ref) -> None:
        self.done.append(self._ray.get(ref))

    def _wait(self) -> list:
        refs = list(self.waiting)
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=1.0, fetch_local=False)  # (Ctrl-C stays live)
        more, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return list(dict.fromkeys(ready + more))
