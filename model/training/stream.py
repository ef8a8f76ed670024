"""Streaming loader over WebDataset shards for conditional pre-training (no conversion back to JSON + mp4).

    shard tars ──(per rank / per loader worker split)──> clips ──> one example per (sample, turn)
        ──seeded shuffle buffer──> skip what a checkpoint says was consumed ──> collate (JPEG -> uint8)

- Shards come from a run directory (`RUN_DIR` or `RUN_DIR/shards`), a directory of `shard-*.tar`, a glob
  or a brace-expanded URL list (`s3://b/shard-{00000..00099}.tar`, read through webdataset's gopen).
- Split: the epoch's shard list (seeded permutation, or commit order when following) is dealt round
  robin: shard j goes to rank j % world, then to loader worker (j // world) % loader_workers. Workers of
  different ranks therefore never read the same shard.
- Follow mode reads a run that is still being built: a worker waits for each of its parts in commit
  order (a tar exists only once complete; a part with no samples has a stats file and no tar) and stops
  when the run's manifest says `finished` and its next part does not exist.
- Exact resume: each loader worker's example stream is a pure function of (seed, epoch, rank, worker,
  shard list), so a checkpoint stores how many examples of each stream were consumed and a resumed
  run skips exactly those (before any JPEG is decoded).
- Frames leave the loader as uint8 (T, 3, S, S), already padded and resized; `normalise_pixels` applies
  the tower's mean/std on the device, which is cheaper than float work in the loader processes.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.sampling import release_frame_indices

from ..collate import HicomProcessor, expand_clip_sample
from ..towers import FrameProcessor

logger = logging.getLogger(__name__)
_PART_RE = re.compile(r"shard-(\d+)\.tar$")
_FRAME_RE = re.compile(r"f(\d{3})\.jpg$")


# --- where shards are ---------------------------------------------------------------------------------
@dataclass
class ShardSource:
    """A fixed list of shard paths/URLs, or a run directory that can be followed while it is built."""

    shards: list[str]
    run_dir: Path | None = None  # set when the shards live in RUN_DIR/shards next to a manifest.json

    @property
    def shards_dir(self) -> Path | None:
        return self.run_dir / "shards" if self.run_dir else None

    def finished(self) -> bool:
        """True when the run's manifest says the build finished (always True without a run dir)."""
        if self.run_dir is None:
            return True
        try:
            return json.loads((self.run_dir / "manifest.json").read_text())["status"] == "finished"
        except (OSError, ValueError, KeyError):
            return False

    def refresh(self) -> "ShardSource":
        """Same source with the committed tars listed again."""
        return ShardSource(committed_tars(self.shards_dir), self.run_dir) if self.run_dir else self


def part_index(path: str) -> int:
    match = _PART_RE.search(str(path))
    if not match:
        raise ValueError(f"not a shard name (shard-NNNNN.tar): {path}")
    return int(match.group(1))


def committed_tars(shards_dir: Path) -> list[str]:
    """Complete shards in commit order (a tar exists only once it is complete)."""
    return sorted((str(p) for p in Path(shards_dir).glob("shard-*.tar")), key=part_index)


def resolve_source(spec: str | Path | list[str]) -> ShardSource:
    """A run dir, a shards dir, one tar, a glob, or a brace-expanded list of paths/URLs."""
    if isinstance(spec, (list, tuple)):
        return ShardSource([str(s) for s in spec])
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if (path / "shards").is_dir():
            return ShardSource(committed_tars(path / "shards"), path)
        if (path.parent / "manifest.json").exists():
            return ShardSource(committed_tars(path), path.parent)
        return ShardSource(committed_tars(path))
    if any(c in text for c in "*?["):
        return ShardSource(sorted(glob.glob(text)))
    shards = wds.shardlists.expand_urls(text)
    if len(shards) == 1 and "://" not in text and not path.is_file():
        raise FileNotFoundError(f"no shards at {text}")
    return ShardSource(shards)


def shard_order(shards: list[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """The epoch's shard order: a seeded permutation, or commit order."""
    if not shuffle:
        return list(shards)
    perm = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in perm]


def deal(items: list, rank: int, world: int, worker: int = 0, workers: int = 1) -> list:
    """Round-robin share of one loader worker of one rank: item j -> rank j % world, worker (j//world) % workers."""
    return [x for j, x in enumerate(items) if j % world == rank and (j // world) % workers == worker]


def follow_tars(source: ShardSource, slot: int, stride: int, poll_s: float = 2.0,
                idle_timeout_s: float | None = None) -> Iterator[str]:
    """Tars of parts slot, slot + stride, ... in commit order, waiting for each while the build runs."""
    shards, part, waited = source.shards_dir, slot, 0.0
    while True:
        tar, stats = shards / f"shard-{part:05d}.tar", shards / f"shard-{part:05d}.stats.json"
        if tar.exists():
            yield str(tar)
        elif stats.exists() and _no_samples(stats):
            pass  # a part that holds only failures has no tar
        elif source.finished():
            if tar.exists():
                continue
            later = [p for p in committed_tars(shards) if part_index(p) > part]
            if not later:
                return
            logger.warning("part %d is missing in a finished run; skipping it", part)
        else:
            if idle_timeout_s is not None and waited >= idle_timeout_s:
                logger.warning("no part %d after %.0fs of waiting; stopping", part, waited)
                return
            time.sleep(poll_s)
            waited += poll_s
            continue
        part, waited = part + stride, 0.0


def _no_samples(stats: Path) -> bool:
    try:
        return json.loads(stats.read_text()).get("num_samples", 1) == 0
    except (OSError, ValueError):
        return False


# --- from clips to examples ---------------------------------------------------------------------------
def clip_examples(sample: dict[str, Any], num_frames: int | None) -> list[dict[str, Any]]:
    """One example per (sample, turn) of a shard clip, keyed `<clip_id>/<sample_id>/<turn>`.

    Frames stay JPEG bytes (decoded after the shuffle); with `num_frames` different from the clip's,
    frames are re-sampled with the release's uniform rule. A malformed sample is logged and skipped.
    """
    meta = json.loads(sample["json"]) if isinstance(sample["json"], (bytes, str)) else sample["json"]
    names = sorted((k for k in sample if _FRAME_RE.fullmatch(k)), key=lambda k: int(k[1:4]))
    frames = [sample[k] for k in names]
    if num_frames and frames and num_frames != len(frames):
        frames = [frames[i] for i in release_frame_indices(len(frames), num_frames)]
    clip_id = sample.get("__key__") or meta.get("id")
    out = []
    for annotation in meta.get("samples") or []:
        view = {"__key__": f"{clip_id}/{annotation['id']}", "frames": frames,
                "json": {"id": annotation["id"], "clip_id": clip_id, "conversations": annotation["conversations"]}}
        try:
            examples = expand_clip_sample(view)
        except ValueError as exc:
            logger.warning("skipping %s: %s", view["__key__"], exc)
            continue
        for ex in examples:
            ex["__url__"] = sample.get("__url__", "")
        out.extend(examples)
    return out


def count_examples(tar_path: str, num_frames: int | None = None) -> int:
    """Examples a shard yields, from its json members only (tar headers are read, frames are skipped)."""
    total = 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                meta = tar.extractfile(member).read()
                total += len(clip_examples({"json": meta, "__key__": member.name[:-5]}, num_frames))
    return total


# --- the stream ---------------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Examples of one rank's shards; each DataLoader worker reads its own share (see module docstring).

    Call `set_epoch(epoch, skip)` before creating a DataLoader iterator; `skip` maps loader worker id ->
    examples of that worker's stream to drop (what a checkpoint recorded as consumed).
    """

    def __init__(self, source: ShardSource, num_frames: int | None, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 256, shuffle_shards: bool = True, follow: bool = False,
                 poll_s: float = 2.0, idle_timeout_s: float | None = None, loader_workers: int = 1):
        self.source, self.num_frames, self.rank, self.world = source, num_frames, rank, world_size
        self.seed, self.shuffle_buffer, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        self.follow, self.poll_s, self.idle_timeout_s = follow, poll_s, idle_timeout_s
        self.inline = loader_workers == 0  # decode in the training process (one stream, worker id 0)
        self.loader_workers = max(1, loader_workers)
        self.epoch, self.skip = 0, {}
        if follow and source.run_dir is None:
            raise ValueError("follow mode needs a run directory (RUN_DIR with manifest.json and shards/)")
        if not follow and len(source.shards) < world_size:
            raise ValueError(f"{len(source.shards)} shard(s) for {world_size} workers: every worker needs at least "
                             "one shard of its own; write smaller shards (shard.max_samples) or use fewer workers")

    def set_epoch(self, epoch: int, skip: dict[int, int] | None = None) -> None:
        self.epoch, self.skip = epoch, {int(k): int(v) for k, v in (skip or {}).items()}

    def worker_tars(self, worker: int) -> Iterator[str]:
        """The shards one loader worker reads this epoch, in order (waits for them in follow mode)."""
        if self.follow:
            stride = self.world * self.loader_workers
            return follow_tars(self.source, self.rank + worker * self.world, stride, self.poll_s, self.idle_timeout_s)
        order = shard_order(self.source.shards, self.seed, self.epoch, self.shuffle_shards)
        return iter(deal(order, self.rank, self.world, worker, self.loader_workers))

    def worker_stream(self, worker: int) -> Iterator[dict[str, Any]]:
        """The deterministic example stream of one loader worker, before skipping."""
        urls = ({"url": t} for t in self.worker_tars(worker))
        clips = wds.tariterators.tarfile_samples(urls)
        examples = (ex for clip in clips for ex in clip_examples(clip, self.num_frames))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
            examples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(examples)
        return examples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.loader_workers:
            raise ValueError(f"DataLoader has {info.num_workers} workers, the stream was planned for "
                             f"{self.loader_workers}")
        skip = self.skip.get(worker, 0)
        for ordinal, ex in enumerate(self.worker_stream(worker)):
            if ordinal < skip:
                continue
            ex["__worker__"], ex["__ordinal__"] = worker, ordinal
            yield ex


# --- collate --------------------------------------------------------------------------------------------
class Uint8Frames(FrameProcessor):
    """FrameProcessor that stops before normalising: (T, 3, S, S) uint8, padded and resized the same way."""

    def __call__(self, frames) -> torch.Tensor:
        return torch.from_numpy(self.square_uint8(frames)).permute(0, 3, 1, 2).contiguous()


def normalise_pixels(pixels: torch.Tensor, frames: FrameProcessor) -> torch.Tensor:
    """uint8 pixels -> float32 normalised like `FrameProcessor` ((x / 255 - mean) / std, to ~1e-7); float
    input passes through. One allocation, two in-place passes."""
    if pixels.dtype != torch.uint8:
        return pixels
    std = torch.tensor(frames.image_std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).float().view(1, 3, 1, 1).to(pixels.device)
    shift = (-torch.tensor(frames.image_mean, dtype=torch.float64) / std).float().view(1, 3, 1, 1).to(pixels.device)
    return pixels.to(torch.float32).mul_(scale).add_(shift)


class Collator:
    """Batches examples of one loader worker; adds the stream position the batch ends at."""

    def __init__(self, processor: HicomProcessor):
        fp = processor.frames
        self.processor = replace(processor, frames=Uint8Frames(fp.image_size, fp.image_mean, fp.image_std))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate(examples)
        batch["worker"] = examples[-1]["__worker__"]
        batch["position"] = examples[-1]["__ordinal__"] + 1
        batch["shards"] = sorted({os.path.basename(ex.get("__url__", "")) for ex in examples})
        return batch


def make_loader(stream: ShardStream, processor: HicomProcessor, micro_batch_size: int,
                pin_memory: bool = False) -> DataLoader:
    """DataLoader over `stream` (one per epoch: call `stream.set_epoch` first); batches of one worker each."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = 0 if stream.inline else stream.loader_workers
    return DataLoader(stream, batch_size=micro_batch_size, collate_fn=Collator(processor), num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None)
