"""Training configuration: conditional pre-training of the HICom compressor on our shards.

Typed, defaulted and explained; YAML files (`configs/train-*.yaml`) validate into `TrainConfig`. Defaults
follow the release's conditional pre-training (lr 1e-4, cosine, warmup 3 %, weight decay 0, no gradient
clipping, global batch 512, 1 epoch, bf16, save every 500 steps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.overrides import apply_overrides


class TrainConfig(BaseModel):
    """One training run. Paths may be local or on shared storage (multi-node needs shared storage)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "hicom-train"
    # --- model ---
    preset: Literal["tiny", "release-7b"] = "tiny"  # tiny: random towers, CPU tests/demo; release-7b: local ckpts
    vision_tower_path: str | None = None  # local SigLIP so400m dir (release-7b); nothing is downloaded
    llm_path: str | None = None  # local Qwen2.5-7B-Instruct dir (release-7b)
    compressor_spec: str | None = None  # e.g. local43_global32; None keeps the preset's
    compressor_behaviour: Literal["release", "paper"] | None = None  # guide wiring; None keeps the preset's
    init_mm_projector: str | None = None  # stage-1 (alignment) mm_projector.bin to start from, as the release does
    from_scratch: bool = False  # release-7b only: train from random compressor weights (no stage 1) on purpose
    num_frames: int | None = Field(None, ge=1)  # frames per clip fed to the model; None: preset (tiny 8, 7B 32)
    max_length: int | None = Field(None, ge=16)  # LLM tokens after splicing; None: preset (7B 4096)
    # --- data ---
    shards: str | None = None  # run dir, shards dir, glob or brace URL list; `--shards` overrides
    follow: bool = False  # keep picking up new shards until the run's manifest says "finished"
    follow_poll_s: float = Field(2.0, gt=0)  # how often a following reader looks for the next shard
    follow_idle_timeout_s: float | None = Field(1800.0, gt=0)  # stop waiting for a part after this long (None: never)
    follow_log_every_s: float = Field(60.0, gt=0)  # a waiting reader says what it waits for this often
    shuffle_shards: bool = True  # seeded per-epoch shard order (follow mode reads in commit order)
    shuffle_buffer: int = Field(256, ge=0)  # examples held for shuffling per loader worker (raw JPEG bytes)
    loader_workers: int = Field(2, ge=0)  # DataLoader processes per trainer worker decoding JPEGs (0: inline)
    # --- optimisation ---
    micro_batch_size: int = Field(1, ge=1)  # examples per forward pass on one device
    global_batch_size: int = Field(512, ge=1)  # examples per optimizer step over all workers (release 512)
    lr: float = Field(1e-4, gt=0)  # release conditional pre-training (the compressor minus the injector)
    guide_injector_lr: float | None = Field(None, gt=0)  # `guide_injector.*` (paper: 1e-3); None: `lr`
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # release: 3 % linear warmup, then cosine to 0
    weight_decay: float = Field(0.0, ge=0)  # release: 0
    adam_betas: tuple[float, float] = (0.9, 0.999)  # HF Trainer defaults, which the release used
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None  # release: no clipping (no gradient_clipping in its DeepSpeed config)
    epochs: int = Field(1, ge=1)  # release: 1 epoch
    max_steps: int | None = Field(None, ge=1)  # caps optimizer steps; required in follow mode (size unknown)
    bf16: bool | None = None  # autocast bf16; None: on when training on a GPU (release trained bf16)
    seed: int = 42  # shard order, shuffle buffers and compressor init
    # --- scale ---
    num_workers: int = Field(1, ge=1)  # trainer workers (GPUs); 1: one Ray actor, >1: Ray Train DDP
    use_gpu: bool | None = None  # None: a GPU per worker when the cluster has GPUs
    cpus_per_worker: int = Field(1, ge=1)  # Ray CPUs reserved per trainer worker (loader workers run inside)
    max_failures: int = Field(0, ge=0)  # Ray Train restarts after a worker crash (each resumes the last ckpt)
    address: str | None = None  # Ray cluster address; None starts a local Ray (`--address` overrides)
    num_cpus: int | None = None  # local Ray only
    # --- outputs ---
    output_dir: str = "runs/train"  # metrics, resolved config, final mm_projector.bin
    checkpoint_dir: str | None = None  # None: <output_dir>/checkpoints
    save_every_steps: int = Field(500, ge=1)  # release: 500
    keep_checkpoints: int = Field(2, ge=1)  # older step-* dirs are deleted after a new one is complete
    resume: bool = True  # continue from the latest complete checkpoint when one exists
    log_every_steps: int = Field(1, ge=1)
    metrics_jsonl: str | None = None  # None: <output_dir>/metrics.jsonl
    metrics_csv: str | None = None  # None: <output_dir>/metrics.csv
    log_sample_keys: bool = False  # per-rank log of every example key trained on (audits, resume tests)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.preset == "release-7b" and not (self.vision_tower_path and self.llm_path):
            raise ValueError("preset release-7b needs vision_tower_path and llm_path (local directories)")
        if self.preset == "release-7b" and not self.init_mm_projector and not self.from_scratch:
            raise ValueError("preset release-7b starts from the stage-1 projector: set init_mm_projector to its "
                             "mm_projector.bin, or from_scratch: true to train from random weights")
        if self.init_mm_projector and self.from_scratch:
            raise ValueError("init_mm_projector and from_scratch: true contradict each other; keep one")
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size x "
                             f"num_workers = {per_step}")
        if self.follow and self.max_steps is None:
            raise ValueError("follow mode needs max_steps: the schedule length must be known before the data is")
        return self

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.output_dir) / "checkpoints"

    @property
    def metrics_jsonl_path(self) -> Path:
        return Path(self.metrics_jsonl) if self.metrics_jsonl else Path(self.output_dir) / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        """Ray's own log lines (Python loggers and the driver's native stderr) go here, not to the terminal."""
        return Path(self.output_dir) / "logs" / "hicom.log"

    @property
    def metrics_csv_path(self) -> Path:
        return Path(self.metrics_csv) if self.metrics_csv else Path(self.output_dir) / "metrics.csv"


def load_train_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML train config (defaults when `path` is None) and apply `--set` overrides (dotted keys)."""
    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return TrainConfig.model_validate(apply_overrides(data, overrides))
