"""Training state that survives a crash: LR schedule, checkpoints, and step-keyed logs.

A checkpoint is a directory `step-00000500/` holding
    compressor.safetensors   trainable compressor weights, release key names (no prefix)
    mm_projector.bin         the same weights as the release writes them (`model.mm_projector.` keys)
    config.json              the HicomConfig, so the model can be rebuilt exactly
    optimizer.pt             AdamW (named parameter groups, each with its LR) + LR scheduler state dicts
    trainer_state.json       step, epoch, per-rank data position, schedule length, base LR per group, the shards
                             of the current epoch (names + sizes), data-affecting config
It is written as `step-00000500.tmp/` and renamed when complete, so a directory named `step-*` is whole;
`latest_checkpoint` returns the highest one. Logs (metrics, sample keys) are JSON lines carrying the step;
on resume, lines after the checkpoint's step are dropped so the logs match the state.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from stages.storage import commit_dir, write_atomic

from ..checkpoint import save_compressor_checkpoint

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_RE = re.compile(r"step-(\d+)$")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as the HF Trainer computes it from a ratio."""
    return math.ceil(total_steps * warmup_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup then cosine to 0 over `total_steps`, for every parameter group (the HF Trainer's schedule)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup_steps(total_steps, warmup_ratio), total_steps)


def param_groups(named_params, lr: float, guide_injector_lr: float | None) -> list[dict[str, Any]]:
    """AdamW groups: `compressor` at `lr`, and the condition-injection sub-module (`*.guide_injector.*`) at
    `guide_injector_lr` (the paper's 1e-3 vs 1e-4; the release's `--guide_injector_lr`). An empty group is
    left out (the release's `direct` wiring has no injector parameters)."""
    injector, rest = [], []
    for name, param in named_params:
        (injector if ".guide_injector." in f".{name}" else rest).append(param)
    groups = [{"name": "compressor", "params": rest, "lr": lr}]
    if injector:
        groups.append({"name": "guide_injector", "params": injector, "lr": guide_injector_lr or lr})
    return groups


def group_lrs(optimizer: torch.optim.Optimizer, key: str = "lr") -> dict[str, float]:
    """{group name: its `lr` (current) or `initial_lr` (base)}."""
    return {g.get("name", str(i)): g[key] for i, g in enumerate(optimizer.param_groups)}


# --- checkpoints ----------------------------------------------------------------------------------------
def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: str | Path, model, optimizer, scheduler, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step-<state["step"]>` atomically and prune all but the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:08d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_compressor_checkpoint(model, str(tmp), extra={"step": state["step"], "epoch": state["epoch"]})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    commit_dir(tmp, final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore compressor weights, optimizer and scheduler from a checkpoint dir; returns its trainer state."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "compressor.safetensors"))
    model.load_mm_projector(weights, strict=True)
    opt = torch.load(path / OPTIMIZER_FILE, map_location=model.device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


# --- step-keyed logs --------------------------------------------------------------------------------------
class StepLog:
    """Append-only JSON lines with a `step` field (+ an optional CSV mirror), truncatable on resume."""

    def __init__(self, path: str | Path, csv_path: str | Path | None = None):
        self.path = Path(path)
        self.csv_path = Path(csv_path) if csv_path else None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
        return out

    def truncate(self, step: int) -> None:
        """Keep only records with step <= `step` (what the resumed checkpoint covers); rewrite the CSV."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.csv_path is not None:
            self._write_csv(kept)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.csv_path is not None:
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(record), extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(record)

    def _write_csv(self, records: list[dict[str, Any]]) -> None:
        text = io.StringIO(newline="")
        if records:
            writer = csv.DictWriter(text, fieldnames=list(records[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
        write_atomic(self.csv_path, text.getvalue())
