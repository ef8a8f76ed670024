"""`hicom train CONFIG.yaml [--shards RUN_DIR] [--address ...]`: conditional pre-training on shards.

Options live in the YAML (`configs/train-*.yaml`, validated into `schemas.train.TrainConfig`); a few
flags override it.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


log = logging.getLogger("hicom.train")


def plot_loss(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Loss (and LR) per step from the metrics log, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text(encoding="utf-8").splitlines() if line]
    if not records:
        raise ValueError(f"{metrics_jsonl} has no metrics to plot")
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LM loss (last answer)")
    twin = ax.twinx()
    twin.plot(steps, [r["lr"] for r in records], label="lr", color="tab:orange", alpha=0.6)
    twin.set_ylabel("learning rate")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title("HICom conditional pre-training")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def cmd_train(args) -> int:
    """Exit codes: 0 trained, 2 bad config or data (one-line error), 3 a trainer worker died (rerun resumes)."""
    from pydantic import ValidationError

    from model.training.actor import TrainerDied, run_training
    from schemas.overrides import parse_set_options
    from schemas.train import load_train_config

    overrides = parse_set_options(args.set)
    for flag in ("shards", "address", "output_dir", "num_workers", "max_steps"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    if args.follow:
        overrides["follow"] = True
    try:
        cfg = load_train_config(args.config, overrides)
    except ValidationError as exc:
        raise ValueError(f"{args.config}: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())) from None
    from stages.ray_runtime import ray_output_to

    try:
        with ray_output_to(cfg.log_path):
            summary = run_training(cfg, progress=not args.no_progress)
    except TrainerDied as exc:
        log.error("%s", exc)
        return 3
    print(f"trained {summary['step']}/{summary['total_steps']} steps ({summary['examples']} examples, resumed from "
          f"step {summary['resumed_from']}) in {summary['seconds']:.1f}s")
    print(f"mm_projector: {Path(summary['output_dir']) / 'mm_projector.bin'}")
    print(f"checkpoints: {cfg.checkpoint_path.resolve()}")
    print(f"metrics: {cfg.metrics_jsonl_path.resolve()}")
    if args.plot is not None:
        target = args.plot or str(Path(cfg.output_dir) / "loss.png")
        print(f"loss curve: {plot_loss(cfg.metrics_jsonl_path, target).resolve()}")
    return 0


def add_train_cli(subparsers) -> argparse.ArgumentParser:
    """Register `train` on the main CLI's subparsers."""
    p = subparsers.add_parser("train", help="conditional pre-training of the compressor on shards (Ray)")
    p.add_argument("config", help="train config YAML (configs/train-tiny.yaml, configs/train-7b.yaml)")
    p.add_argument("--shards", help="run dir, shards dir or glob (overrides `shards`)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--out", dest="output_dir", help="output dir (overrides `output_dir`)")
    p.add_argument("--num-workers", type=int, help="trainer workers / GPUs (overrides `num_workers`)")
    p.add_argument("--max-steps", type=int, help="cap on optimizer steps (overrides `max_steps`)")
    p.add_argument("--follow", action="store_true",
                   help="train on a run while it is being built (needs --max-steps; same as --set follow=true)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--plot", nargs="?", const="", metavar="PNG",
                   help="write a loss curve PNG (default <output_dir>/loss.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p

