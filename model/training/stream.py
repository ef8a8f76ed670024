"""Streaming examples from WebDataset shards for conditional pre-training (no conversion back to JSON + mp4).

    shard tars (dealt per rank / loader worker, see `shards`) ──> clips ──> one example per (sample, turn)
        ──seeded shuffle buffer──> skip what a checkpoint says was consumed ──> collate (JPEG -> uint8)

- Exact resume: each loader worker's example stream is a pure function of (seed, epoch, rank, worker,
  the epoch's shard list), so a checkpoint stores how many examples of each stream were consumed (and
  the shard list) and a resumed run skips exactly those (before any JPEG is decoded).
- Frames leave the loader as uint8 (T, 3, S, S), already padded and resized; `normalise_pixels` applies
  the tower's mean/std on the device, which is cheaper than float work in the loader processes.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import tarfile
from dataclasses import replace
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.sampling import release_frame_indices

from ..collate import HicomProcessor, expand_clip_sample
from ..towers import FrameProcessor
from .shards import ShardSource, deal, follow_tars, shard_order

logger = logging.getLogger(__name__)
_FRAME_RE = re.compile(r"f(\d{3})\.jpg$")


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
                 poll_s: float = 2.0, idle_timeout_s: float | None = None, loader_workers: int = 1,
                 log_every_s: float = 60.0):
        self.source, self.num_frames, self.rank, self.world = source, num_frames, rank, world_size
        self.seed, self.shuffle_buffer, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        self.follow, self.poll_s, self.idle_timeout_s, self.log_every_s = follow, poll_s, idle_timeout_s, log_every_s
        self.inline = loader_workers == 0  # decode in the training process (one stream, worker id 0)
        self.loader_workers = max(1, loader_workers)
        self.epoch, self.skip, self.shards = 0, {}, list(source.shards)
        self._frames_warned = False
        if follow and source.run_dir is None:
            raise ValueError("follow mode needs a run directory (RUN_DIR with manifest.json and shards/)")
        if not follow and len(source.shards) < world_size:
            raise ValueError(f"{len(source.shards)} shards for {world_size} trainer workers: every worker needs at "
                             "least one shard of its own; write smaller shards (shard.max_samples) or use fewer "
                             "workers")

    def set_epoch(self, epoch: int, skip: dict[int, int] | None = None, shards: list[str] | None = None) -> None:
        """Plan the next pass: epoch number, examples to skip per loader worker, and the epoch's shard list
        (default: the source's; a resumed epoch passes the list its checkpoint recorded)."""
        self.epoch, self.skip = epoch, {int(k): int(v) for k, v in (skip or {}).items()}
        self.shards = list(shards) if shards is not None else list(self.source.shards)

    def worker_tars(self, worker: int) -> Iterator[str]:
        """The shards one loader worker reads this epoch, in order (waits for them in follow mode)."""
        if self.follow:
            stride = self.world * self.loader_workers
            return follow_tars(self.source, self.rank + worker * self.world, stride, self.poll_s, self.idle_timeout_s,
                               self.log_every_s)
        order = shard_order(self.shards, self.seed, self.epoch, self.shuffle_shards)
        return iter(deal(order, self.rank, self.world, worker, self.loader_workers))

    def worker_stream(self, worker: int) -> Iterator[dict[str, Any]]:
        """The deterministic example stream of one loader worker, before skipping."""
        urls = ({"url": t} for t in self.worker_tars(worker))
        clips = wds.tariterators.tarfile_samples(urls)
        examples = (ex for clip in clips for ex in clip_examples(self._check_frames(clip), self.num_frames))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
            examples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(examples)
        return examples

    def _check_frames(self, clip: dict[str, Any]) -> dict[str, Any]:
        """Warn once per stream when a clip holds fewer frames than the model takes (they get repeated)."""
        if not self._frames_warned and self.num_frames:
            stored = sum(1 for k in clip if _FRAME_RE.fullmatch(k))
            if 0 < stored < self.num_frames:
                self._frames_warned = True
                logger.warning("clip %s holds %d frames but the model takes %d: frames are repeated to fill it "
                               "(release uniform sampling); build shards with clip.frames_per_clip >= %d, or lower "
                               "num_frames", clip.get("__key__"), stored, self.num_frames, self.num_frames)
        return clip

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
