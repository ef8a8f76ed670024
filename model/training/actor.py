"""Run conditional pre-training on Ray: one GPU trainer actor, or Ray Train DDP workers; same loop.

    run_training(cfg)          # the driver: picks the path, shows progress, returns rank 0's summary
      num_workers == 1  ->  TrainerActor (num_gpus=1 when the cluster has a GPU, else CPU)  -> Trainer.fit
      num_workers  > 1  ->  ray.train.torch.TorchTrainer (DDP; nccl on GPU, gloo on CPU)   -> Trainer.fit

Both paths run `model.training.loop.Trainer`; checkpoints, metrics and the final `mm_projector.bin` are
written under the config's output/checkpoint dirs, which must be shared storage for multi-node runs.
A crash is recovered by running again (or by Ray Train's `max_failures`): the loop resumes from the
latest complete checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray

from schemas.train import TrainConfig
from stages.ray_runtime import init_ray

logger = logging.getLogger(__name__)


class TrainerDied(RuntimeError):
    """A trainer worker process ended without an answer (killed, out of memory, node lost)."""


def plain_error(exc: BaseException) -> BaseException:
    """The error to show for a failed Ray training call: a worker's own exception (ValueError, ...) without Ray's
    wrapping and remote traceback, or TrainerDied with one line saying what to do."""
    from ray.exceptions import RayActorError, RayTaskError

    seen = exc
    for _ in range(8):  # Ray Train wraps: TrainingFailedError -> RayTaskError -> the worker's exception
        if isinstance(seen, RayActorError):
            return TrainerDied(f"the training worker died ({type(seen).__name__}: killed, out of memory or its node "
                               "was lost); run the same command again to resume from the latest checkpoint")
        if isinstance(seen, RayTaskError):
            seen = seen.cause
            continue
        if not type(seen).__module__.startswith("ray") and seen is not exc:
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return seen


@ray.remote
class TrainerActor:
    """One trainer worker as a Ray actor; owns a GPU when created with num_gpus=1."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = TrainConfig.model_validate(config)

    def fit(self) -> dict[str, Any]:
        import torch

        from .loop import Trainer

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        use_gpu = self.cfg.use_gpu is not False and torch.cuda.is_available()
        return Trainer(self.cfg, 0, 1, "cuda" if use_gpu else "cpu").fit()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: the same Trainer, with rank and device from the train context."""
    import ray.train
    import ray.train.torch

    from .loop import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = ray.train.get_context()
    cfg = TrainConfig.model_validate(config)
    summary = Trainer(cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()).fit()
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Relative paths resolved against the driver's cwd (workers may start elsewhere)."""
    update = {k: str(Path(v).resolve()) for k in ("output_dir", "checkpoint_dir", "metrics_jsonl", "metrics_csv",
                                                  "init_mm_projector", "vision_tower_path", "llm_path")
              if (v := getattr(cfg, k)) and "://" not in v}
    if cfg.shards and "://" not in cfg.shards and not cfg.shards.startswith("pipe:"):
        update["shards"] = str(Path(cfg.shards).resolve()) if not any(c in cfg.shards for c in "{*?[") \
            else os.path.abspath(cfg.shards)
    return cfg.model_copy(update=update)


def start(cfg: TrainConfig):
    """Start training on Ray without waiting; returns (a callable that blocks for the summary, a ready check)."""
    init_ray(cfg.address, cfg.num_cpus, cfg.log_path, video_worker=False)  # the project's one Ray start
    cfg = _absolute(cfg)
    gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_has_gpu()
    config = cfg.model_dump(mode="json")
    if cfg.num_workers == 1:
        actor = TrainerActor.options(num_gpus=1 if gpu else 0, num_cpus=cfg.cpus_per_worker).remote(config)
        ref = actor.fit.remote()

        def get() -> dict[str, Any]:
            try:
                return ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - re-raised as the worker's own error, without Ray's wrapping
                raise plain_error(exc) from None

        return get, (lambda: bool(ray.wait([ref], timeout=0)[0]))
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=str(Path(cfg.output_dir) / "ray_train"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)))
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()  # result.metrics may be None: the summary is read from what rank 0 wrote
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()

    def wait() -> dict[str, Any]:
        thread.join()
        if "error" in outcome:
            raise plain_error(outcome["error"]) from None
        return json.loads((Path(cfg.output_dir) / "ranks" / "rank-0.json").read_text())

    return wait, (lambda: not thread.is_alive())


def run_training(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train and return rank 0's summary; a tqdm bar (loss, samples/s, ETA) follows the metrics log."""
    wait, done = start(cfg)
    bar = _MetricsBar(_absolute(cfg).metrics_jsonl_path, enabled=progress)
    while not done():
        bar.poll()
        time.sleep(0.5)
    summary = wait()
    bar.poll()
    bar.close()
    return summary


class _MetricsBar:
    """A progress bar fed by tailing the metrics JSONL that rank 0 writes."""

    def __init__(self, path: Path, enabled: bool = True):
        from tqdm import tqdm

        self.path, self.offset, self.enabled = path, 0, enabled
        self.bar = tqdm(total=None, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)

    def poll(self) -> None:
        if not self.enabled or not self.path.exists():
            return
        size = self.path.stat().st_size
        if size < self.offset:  # truncated on resume
            self.offset = 0
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            rec = json.loads(line)
            if self.bar.total != rec["total_steps"] or rec["step"] <= self.bar.n:
                self.bar.reset(total=rec["total_steps"])
                self.bar.n = self.bar.last_print_n = rec["step"] - 1  # a resumed run starts mid-way
            self.bar.update(rec["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", samples_s=f"{rec['samples_per_s']:.1f}",
                                 lr=f"{rec['lr']:.2e}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
