"""Duplicates of clips and instructions: near-duplicate clips by frame hashes within a video and across the
dataset, and instructions repeated too often across the dataset.

A clip's signature is the 64-bit dHash of `k` frames picked evenly. Two clips are near-duplicates when the
mean Hamming distance of their aligned hashes is <= T bits (`clip_hash_max_distance`). The index finds every
such pair: if the mean over k frames is <= T, some frame differs by <= T bits, and a hash cut into T+1 bands
keeps at least one band intact, so banding every frame into T+1 bands (`band_keys`) never misses a pair the
threshold accepts (banding one frame into 4 bands missed re-encodes whose few changed bits hit every band).

`SignatureIndex` is that index in memory; `stages/dedup_ray.py` partitions it over Ray actors for the dataset-wide
dedup of every command (`hicom build`, `hicom caption`).
"""
from __future__ import annotations

import io

import numpy as np

from schemas import caption_reasons as reasons
from schemas.caption import FilterConfig
from schemas.records import Failure, ShardSample, VideoResult

STAGE = "dedup"


def dhash(jpeg: bytes) -> int:
    """64-bit difference hash of an image (9x8 grey, horizontal gradients)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        img.draft("L", (64, 64))  # JPEG DCT scaling: decode small, fast
        pixels = np.asarray(img.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def clip_signature(frames: list[bytes], k: int) -> list[int]:
    if not frames:
        return []
    picks = [round(i * (len(frames) - 1) / (k - 1)) for i in range(k)] if k > 1 else [len(frames) // 2]
    return [dhash(frames[i]) for i in picks]


def signature_distance(a: list[int], b: list[int]) -> float:
    """Mean Hamming distance (bits) of aligned frame hashes."""
    n = min(len(a), len(b))
    return sum(bin(x ^ y).count("1") for x, y in zip(a[:n], b[:n])) / n if n else 64.0


def band_keys(sig: list[int], max_distance: float) -> list[int]:
    """Index keys of a signature: each frame hash cut into floor(T)+1 bands, key = (frame, band, bits)."""
    bands = int(max_distance) + 1
    edges = [round(64 * i / bands) for i in range(bands + 1)]
    keys = []
    for pos, h in enumerate(sig):
        for band, (lo, hi) in enumerate(zip(edges, edges[1:])):
            keys.append((((pos << 8) | band) << 32) | ((h >> lo) & ((1 << (hi - lo)) - 1)))
    return keys


def drop_clip(result: VideoResult, sample: ShardSample, detail: str) -> None:
    """Remove a clip; a Failure for the clip and one for each pair sample it carried."""
    result.samples = [s for s in result.samples if s is not sample]
    for item in [sample.clip.id, *(p.sample_id for p in sample.pairs)]:
        result.failures.append(Failure(item_id=item, video_id=result.video_id, stage=STAGE,
                                       reason=reasons.DUPLICATE_CLIP, detail=detail, source=sample.clip.source))


def annotated(sample: ShardSample) -> bool:
    return any(p.source == "annotation" for p in sample.pairs)


def dedup_clips(result: VideoResult, cfg: FilterConfig) -> VideoResult:
    """Drop clips of a video whose frames nearly repeat an earlier clip's (before any LLM is paid).
    Clips with released annotations are never dropped."""
    if result.failed or not cfg.drop_duplicate_clips or len(result.samples) < 2:
        return result
    kept: list[tuple[str, list[int]]] = []
    for sample in list(result.samples):
        sig = clip_signature(sample.frames, cfg.clip_hash_frames)
        match = next(((cid, d) for cid, other in kept
                      if (d := signature_distance(sig, other)) <= cfg.clip_hash_max_distance), None)
        if match and not annotated(sample):
            drop_clip(result, sample, f"near-duplicate of {match[0]} (mean Hamming {match[1]:.1f} bits)")
        else:
            kept.append((sample.clip.id, sig))
    return result


class SignatureIndex:
    """Clip signatures by band key; `match` returns the closest indexed clip within the threshold."""

    def __init__(self, max_distance: float):
        self.max_distance = max_distance
        self.bands: dict[int, list[int]] = {}
        self.entries: list[tuple[str, list[int]]] = []  # (clip id, signature); bands hold positions here

    def add(self, clip_id: str, sig: list[int], keys: list[int] | None = None) -> None:
        if not sig:
            return
        self.entries.append((clip_id, sig))
        for key in band_keys(sig, self.max_distance) if keys is None else keys:
            self.bands.setdefault(key, []).append(len(self.entries) - 1)

    def candidates(self, sig: list[int], keys: list[int] | None = None) -> list[tuple[str, float]]:
        """Indexed clips within the threshold, closest first."""
        seen: dict[int, float] = {}
        for key in band_keys(sig, self.max_distance) if keys is None else keys:
            for pos in self.bands.get(key, []):
                if pos not in seen:
                    seen[pos] = signature_distance(sig, self.entries[pos][1])
        found = [(self.entries[pos][0], d) for pos, d in seen.items() if d <= self.max_distance]
        return sorted(found, key=lambda x: (x[1], x[0]))

    def match(self, sig: list[int]) -> tuple[str, float] | None:
        found = self.candidates(sig) if sig else []
        return found[0] if found else None
