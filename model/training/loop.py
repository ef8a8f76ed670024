"""The training loop shared by the single Ray actor and every Ray Train (DDP) worker.

`Trainer(cfg, rank, world_size, device).fit()` builds the model (from stage-1 weights when given), trains only
the compressor with AdamW (two LR groups: compressor, condition injector) + cosine warmup, accumulates
micro-batches to the global batch, checkpoints (see `state`) and resumes from the latest checkpoint: step, LR
schedule and each loader stream's position continue where they stopped, on the epoch's recorded shard list.
With world_size > 1 it expects `torch.distributed` to be initialised (Ray Train does it).

Uneven data across ranks: before every micro-batch the ranks agree (all-reduce MIN) that each still has
one, so all ranks stop together; a last partial accumulation group is averaged and stepped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from schemas.saved_config import check_unchanged
from schemas.train import TrainConfig

from ..config import CompressorConfig
from ..presets import build_model, get_config
from .shards import check_record, deal, resolve_source, shard_order, shard_record
from .state import StepLog, group_lrs, latest_checkpoint, load_checkpoint, make_scheduler, param_groups, save_checkpoint
from .stream import ShardStream, count_examples, make_loader, normalise_pixels

logger = logging.getLogger(__name__)


def model_config(cfg: TrainConfig):
    """HicomConfig for a TrainConfig (preset + overrides)."""
    overrides = {k: getattr(cfg, k) for k in ("num_frames", "max_length") if getattr(cfg, k) is not None}
    paths = {"vision_tower_path": cfg.vision_tower_path, "llm_path": cfg.llm_path} if cfg.preset != "tiny" else {}
    hc = get_config(cfg.preset, **paths, **overrides)
    if cfg.compressor_spec or cfg.compressor_behaviour:
        fields = dataclasses.asdict(hc.compressor)
        derived = ("temporal_kernel", "spatial_kernel", "num_queries", "use_local", "use_global")
        fields.update({k: None for k in derived})  # re-derived from the new spec
        fields["spec"] = cfg.compressor_spec or fields["spec"]
        fields["behaviour"] = cfg.compressor_behaviour or fields["behaviour"]
        hc.compressor = CompressorConfig(**fields)
    return hc


def epoch_steps(cfg: TrainConfig, shards: list[str], world: int, epoch: int, counts: dict[str, int]) -> int:
    """Optimizer steps of one epoch over `shards` (the rank with the fewest micro-batches bounds it)."""
    workers = max(1, cfg.loader_workers)
    order = shard_order(shards, cfg.seed, epoch, cfg.shuffle_shards)
    micro = [sum(math.ceil(sum(counts[t] for t in deal(order, r, world, w, workers)) / cfg.micro_batch_size)
                 for w in range(workers)) for r in range(world)]
    if min(micro) == 0:
        raise ValueError(f"trainer worker {micro.index(0)} of {world} gets no examples in epoch {epoch}: "
                         f"{sum(1 for t in shards if counts[t])} of {len(shards)} shards hold examples; use fewer "
                         "workers or smaller shards (shard.max_samples)")
    return math.ceil(min(micro) / cfg.accumulation_steps)


def example_counts(cfg: TrainConfig, shards: list[str]) -> dict[str, int]:
    """Examples per shard; ValueError when the whole set has none (a run built without captions)."""
    counts = {t: _examples_in(t, cfg.num_frames) for t in shards}
    if shards and not sum(counts.values()):
        raise ValueError("the run has no instruction/answer pairs: build with captioning or a manifest with captions")
    return counts


def plan_steps(cfg: TrainConfig, shards: list[str], world: int) -> int:
    """Optimizer steps of the whole run: max_steps, or what the shards give over all epochs."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    counts = example_counts(cfg, shards)
    return sum(epoch_steps(cfg, shards, world, epoch, counts) for epoch in range(cfg.epochs))


def _examples_in(tar: str, num_frames: int | None) -> int:
    """Pairs recorded in the shard's stats file (one example each), else counted from the tar's json."""
    stats = Path(tar[: -len(".tar")] + ".stats.json")
    if stats.exists():
        return int(json.loads(stats.read_text()).get("num_pairs", 0))
    if not Path(tar).is_file():
        raise ValueError(f"cannot count examples of {tar}: set max_steps")
    return count_examples(tar, num_frames)


def param_digest(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.mm_projector_state_dict().items()):
        h.update(name.encode() + value.float().numpy().tobytes())
    return h.hexdigest()


class Trainer:
    """Owns the model, optimizer, scheduler and data position of one worker (rank)."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.device = torch.device(device)
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)
        self.model = build_model(model_config(cfg), self.device)
        if cfg.init_mm_projector:
            self.model.load_stage1(cfg.init_mm_projector)
        self.initial_digest = param_digest(self.model)
        self.ddp = self.model
        if world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.params = self.model.trainable_parameters()
        groups = param_groups(self.model.named_trainable_parameters(), cfg.lr, cfg.guide_injector_lr)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        if not cfg.shards:
            raise ValueError("no shards given (config `shards` or --shards)")
        self.source = resolve_source(cfg.shards)
        if not cfg.follow and not self.source.shards:
            raise ValueError(f"no committed shards in {cfg.shards}")
        if not cfg.follow and not self.source.finished():
            logger.warning("%s is still being built: reading the %d shards committed now (set follow: true to "
                           "train on shards as they appear)", self.source.run_dir, len(self.source.shards))
        self.stream = ShardStream(self.source, self.model.config.num_frames, rank, world_size, cfg.seed,
                                  cfg.shuffle_buffer, cfg.shuffle_shards, cfg.follow, cfg.follow_poll_s,
                                  cfg.follow_idle_timeout_s, cfg.loader_workers, cfg.follow_log_every_s)
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else self.device.type == "cuda"
        self.state = {"step": 0, "epoch": 0, "examples": 0, "positions": {}, "epoch_start_step": 0,
                      "lr_groups": {g["name"]: g["lr"] for g in groups}, **self._data_settings()}
        self.epoch_shards = list(self.source.shards)  # the list the current epoch is planned on
        ckpt = latest_checkpoint(cfg.checkpoint_path) if cfg.resume else None
        self.state["total_steps"] = plan_steps(cfg, self.source.shards, world_size) if ckpt is None else None
        self.scheduler = make_scheduler(self.optimizer, self.state["total_steps"] or 1, cfg.warmup_ratio)
        self.resumed_from = 0
        if ckpt is not None:
            self._resume(ckpt)
        if not cfg.follow:
            self.state["epoch_shards"] = shard_record(self.epoch_shards)
        self._saved_step = self.resumed_from
        self.consumed = {int(k): v for k, v in self.state["positions"].get(str(rank), {}).items()}
        self.metrics = StepLog(cfg.metrics_jsonl_path, cfg.metrics_csv_path) if rank == 0 else None
        self.keys = StepLog(self.out / "keys" / f"rank-{rank}.jsonl") if cfg.log_sample_keys else None
        for log in (self.metrics, self.keys):
            if log is not None:
                log.truncate(self.state["step"])
        self.shards_seen: set[str] = set()

    def _data_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"world_size": self.world, "loader_workers": max(1, c.loader_workers), "micro_batch_size":
                c.micro_batch_size, "global_batch_size": c.global_batch_size, "seed": c.seed, "follow": c.follow,
                "shuffle_shards": c.shuffle_shards, "shuffle_buffer": c.shuffle_buffer,
                "num_frames": self.model.config.num_frames}

    def _resume(self, ckpt: Path) -> None:
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        rates = {"lr_groups": self.state["lr_groups"]} if "lr_groups" in saved else {}  # older checkpoints: none
        check_unchanged(saved, {**self._data_settings(), **rates}, f"{ckpt} was written with other data settings "
                        "or learning rates", "the data position or schedule would not match; use the same "
                        "settings or a new checkpoint_dir")
        total = saved["total_steps"]
        if not self.cfg.follow and "epoch_shards" in saved:
            self.epoch_shards = check_record(saved["epoch_shards"])
            total = self._replan(saved, total)
        elif not self.cfg.follow:
            logger.warning("%s records no shard list (an older checkpoint): resuming on the shards listed now", ckpt)
        self.scheduler = make_scheduler(self.optimizer, total, self.cfg.warmup_ratio)
        self.state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        self.state["total_steps"] = total
        self.resumed_from = self.state["step"]
        logger.info("rank %d resumed from %s: step %d/%d, epoch %d", self.rank, ckpt, self.state["step"],
                    self.state["total_steps"], self.state["epoch"])

    def _replan(self, saved: dict[str, Any], total: int) -> int:
        """Schedule length after a resume: the recorded epoch is replayed on its own shard list; shards added
        since join the epochs after it, which lengthens the schedule (the cosine is re-fitted to it)."""
        now = list(self.source.shards)
        if set(now) == set(self.epoch_shards) or self.cfg.max_steps is not None:
            if set(now) != set(self.epoch_shards):
                logger.warning("the run has %d shards, the checkpoint's epoch was planned on %d: this epoch replays "
                               "the recorded ones, later epochs read all %d", len(now), len(self.epoch_shards),
                               len(now))
            return total
        counts = example_counts(self.cfg, sorted(set(now) | set(self.epoch_shards)))
        epoch, step = saved["epoch"], saved["step"]
        done = step - saved["epoch_start_step"]
        left = epoch_steps(self.cfg, self.epoch_shards, self.world, epoch, counts) - done
        later = sum(epoch_steps(self.cfg, now, self.world, e, counts) for e in range(epoch + 1, self.cfg.epochs))
        new_total = step + left + later
        logger.warning("the run grew from %d to %d shards since the checkpoint: epoch %d replays its %d recorded "
                       "shards, later epochs read all %d; the schedule grows from %d to %d steps",
                       len(self.epoch_shards), len(now), epoch, len(self.epoch_shards), len(now), total, new_total)
        return new_total

    # --- distributed helpers ------------------------------------------------------------------------
    def _all_reduce(self, values: list[float], op=None) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def _positions(self) -> dict[str, dict[str, int]]:
        mine = {str(k): v for k, v in self.consumed.items()}
        if self.world == 1:
            return {"0": mine}
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return {str(r): p for r, p in enumerate(gathered)}

    # --- the loop -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until the planned steps or the data run out; returns a summary of this rank."""
        cfg, total, accum = self.cfg, self.state["total_steps"], self.cfg.accumulation_steps
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        (self.out / "ranks").mkdir(parents=True, exist_ok=True)
        (self.out / "ranks" / f"rank-{self.rank}.pid").write_text(str(os.getpid()))
        self.model.train()
        self._tick, self._tick_examples = time.time(), self.state["examples"]
        started = time.time()
        while self.state["step"] < total and self.state["epoch"] < cfg.epochs:
            self.stream.set_epoch(self.state["epoch"], self.consumed, None if cfg.follow else self.epoch_shards)
            batches = iter(make_loader(self.stream, self.model.processor, cfg.micro_batch_size,
                                       pin_memory=self.device.type == "cuda"))
            group: list[dict[str, Any]] = []
            exhausted = False
            while self.state["step"] < total:
                batch = next(batches, None)
                if self._all_reduce([batch is not None], dist.ReduceOp.MIN)[0] == 0:
                    exhausted = True
                    break
                last = len(group) + 1 == accum
                with (self.ddp.no_sync() if self.world > 1 and not last else contextlib.nullcontext()):
                    loss = self._forward(batch) / accum
                    loss.backward()
                self.consumed[batch["worker"]] = batch["position"]
                self.shards_seen.update(batch["shards"])
                group.append({"loss": float(loss.detach()) * accum, "keys": batch["keys"], "shards": batch["shards"]})
                if last:
                    self._step(group, accum)
                    group = []
            if exhausted:
                if group:  # a partial last group: average what was accumulated over ranks and micro-batches
                    for p in self.params:
                        if self.world > 1:
                            dist.all_reduce(p.grad)
                        p.grad.mul_(accum / (len(group) * self.world))
                    self._step(group, accum, end_of_epoch=True)
                else:
                    self._end_epoch()
            del batches
        if self.state["step"] < total:
            logger.warning("rank %d: the data ran out at step %d of %d planned%s", self.rank, self.state["step"], total,
                           " (follow mode stopped waiting, see above)" if cfg.follow else "")
        return self._finish(time.time() - started)

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        batch = dict(batch)
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        batch["pixel_values"] = normalise_pixels(pixels, self.model.processor.frames)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.ddp(batch)

    def _end_epoch(self) -> None:
        """Next epoch: plan it on the shards listed now (a resumed epoch kept its recorded list)."""
        self.state["epoch"] += 1
        self.state["epoch_start_step"] = self.state["step"]
        self.consumed = {}
        if not self.cfg.follow:
            self.epoch_shards = list(self.source.shards)
            self.state["epoch_shards"] = shard_record(self.epoch_shards)

    def _step(self, group: list[dict[str, Any]], accum: int, end_of_epoch: bool = False) -> None:
        cfg = self.cfg
        norm = None
        if cfg.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        lrs = group_lrs(self.optimizer)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n_local = sum(len(g["keys"]) for g in group)
        loss_sum, micro, examples = self._all_reduce([sum(g["loss"] for g in group), len(group), n_local])
        self.state["step"] += 1
        self.state["examples"] += int(examples)
        step = self.state["step"]
        if self.keys is not None:
            self.keys.append({"step": step, "epoch": self.state["epoch"], "keys": [k for g in group for k in g["keys"]],
                              "shards": sorted({s for g in group for s in g["shards"]})})
        if end_of_epoch:
            self._end_epoch()
        if self.metrics is not None and (step % cfg.log_every_steps == 0 or step == self.state["total_steps"]):
            now = time.time()
            rate = (self.state["examples"] - self._tick_examples) / max(now - self._tick, 1e-9)
            self._tick, self._tick_examples = now, self.state["examples"]
            self.metrics.append({"step": step, "total_steps": self.state["total_steps"], "epoch": self.state["epoch"],
                                 "loss": loss_sum / micro, "lr": lrs["compressor"],
                                 **{f"lr_{k}": v for k, v in lrs.items() if k != "compressor"}, "grad_norm": norm,
                                 "examples": self.state["examples"], "samples_per_s": rate,
                                 "resumed_from": self.resumed_from, "time": now})
        if step % cfg.save_every_steps == 0 or step == self.state["total_steps"]:
            self._save()

    def _save(self) -> Path | None:
        self.state["positions"] = self._positions()
        self._saved_step = self.state["step"]
        if self.rank != 0:
            return None
        path = save_checkpoint(self.cfg.checkpoint_path, self.model, self.optimizer, self.scheduler, self.state,
                               self.cfg.keep_checkpoints)
        logger.info("saved %s", path)
        return path

    def _finish(self, seconds: float) -> dict[str, Any]:
        if self.state["step"] != self._saved_step:
            self._save()
        if self.rank == 0:
            self.model.save_mm_projector(str(self.out / "mm_projector.bin"))
        summary = {"rank": self.rank, "world_size": self.world, "step": self.state["step"],
                   "total_steps": self.state["total_steps"], "epoch": self.state["epoch"],
                   "examples": self.state["examples"], "resumed_from": self.resumed_from, "seconds": seconds,
                   "shards": sorted(self.shards_seen), "param_sha256": param_digest(self.model),
                   "initial_param_sha256": self.initial_digest, "output_dir": str(self.out.resolve()),
                   "pid": os.getpid()}
        (self.out / "ranks" / f"rank-{self.rank}.json").write_text(json.dumps(summary, indent=1))
        if self.world > 1:
            dist.barrier()
        return summary
