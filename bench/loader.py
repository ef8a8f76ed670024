"""Benchmark (not a test): our shard loader vs the release's load-time video decoding, on the same clips.

Every approach turns each clip into 32 frames of 384 x 384, padded to square with the mean colour, with the
same number of DataLoader worker processes (one clip per item, torch and decoders single-threaded):
  ours           `model.training.stream.ShardStream`: read the WebDataset tar, decode the 32 stored JPEGs
                 (already padded and resized by the pipeline), uint8 out (the trainer normalises on the device)
  ours+norm      the same, normalised to float32 in the worker
  release/<dec>  the release's approach (VideoLLaMA2 `process_video`): open the clip's mp4, decode 32 uniformly
                 sampled frames (decord 0.6.0, as the release, or PyAV), pad to square, resize to 384 (bicubic),
                 normalised with the same code as ours+norm. Two sets of mp4s:
                   src    the clip cut from its source at source resolution (what HICom-248K's `split_videos/`
                          holds: Panda-70M clips, typically 720p)
                   shard  the small mp4 our shards carry (max side 384): a lower bound for any mp4 decoding
Clip sets (each clip loaded `--repeats` times on both sides):
  demo  the demo's shards: real sample videos cut at scene changes (1-4 s; 1280x720, 640x272, 176x144)
  hd    HICom-248K-like clips: 8.5 s (Panda-70M's average clip length) at 1280 px wide, from the real samples
        (bigbuckbunny looped, bikes looped and upscaled; windows every 3 s), sharded by our pipeline here
Wall seconds are the figure; CPU seconds (workers + main process) are shown too, being less sensitive to
other load on the machine. Run: .venv/bin/python bench/loader.py [--sets demo,hd] [--workers 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader, Dataset, IterableDataset  # noqa: E402

from model.training.shards import ShardSource  # noqa: E402
from model.training.stream import ShardStream, Uint8Frames, normalise_pixels  # noqa: E402
from model.towers import FrameProcessor  # noqa: E402
from stages.sampling import release_frame_indices  # noqa: E402

FRAMES, SIZE = 32, 384
FP = FrameProcessor(image_size=SIZE)  # SigLIP: mean 0.5 -> pad colour 127, resize 384 bicubic


def _single_thread(_worker_id: int = 0) -> None:
    torch.set_num_threads(1)


class OursDataset(IterableDataset):
    """Our loader's stream, each example turned into frame pixels (uint8, or normalised float)."""

    def __init__(self, shards: list[str], workers: int, normalise: bool):
        self.stream = ShardStream(ShardSource(shards), FRAMES, shuffle_buffer=0, shuffle_shards=False,
                                  loader_workers=workers)
        self.frames = Uint8Frames(SIZE)
        self.normalise = normalise

    def __iter__(self):
        for ex in self.stream:
            pixels = self.frames(ex["frames"])
            yield normalise_pixels(pixels, FP) if self.normalise else pixels


class ReleaseDataset(Dataset):
    """The release's approach on mp4 files: decode 32 uniform frames, expand2square, resize, normalise."""

    def __init__(self, paths: list[str], decoder: str):
        self.paths, self.decoder = paths, decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        frames = decode_decord(self.paths[i]) if self.decoder == "decord" else decode_pyav(self.paths[i])
        return normalise_pixels(Uint8Frames(SIZE)(list(frames)), FP)  # expand2square + resize 384 + normalise


def decode_decord(path: str) -> np.ndarray:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    return vr.get_batch(release_frame_indices(len(vr), FRAMES)).asnumpy()


def decode_pyav(path: str) -> list[np.ndarray]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        total = stream.frames
        if total <= 0:
            total = sum(1 for _ in container.decode(stream))
            container.seek(0)
        wanted = release_frame_indices(total, FRAMES)
        keep = set(wanted)
        got = {i: f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream)) if i in keep}
    last = max(got)
    return [got.get(i, got[last]) for i in wanted]


def _cpu_s() -> float:
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed(dataset, workers: int) -> tuple[float, float, int]:
    """(wall s, CPU s of the main process and the finished workers, clips) for one pass."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_single_thread,
                        prefetch_factor=4 if workers else None)
    start, cpu, n = time.perf_counter(), _cpu_s(), 0
    for pixels in loader:
        assert pixels.shape == (FRAMES, 3, SIZE, SIZE)
        n += 1
    wall = time.perf_counter() - start
    del loader
    return wall, _cpu_s() - cpu, n


def prepare(run_dir: Path, videos: Path, repeats: int, tmp: Path) -> dict[str, list[str]]:
    """Bench shards (the run's clips repeated, 2 clips per shard), and the same clips as mp4 files."""
    tars = sorted(str(p) for p in (run_dir / "shards").glob("shard-*.tar"))
    clips = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    if not clips or "mp4" not in clips[0]:
        raise SystemExit(f"{run_dir}: need shards with mp4 members (the demo config writes them)")
    shard_mp4s, src_mp4s = [], []
    for clip in clips:
        meta = json.loads(clip["json"])
        shard_mp4 = tmp / f"{clip['__key__']}.shard.mp4"
        shard_mp4.write_bytes(clip["mp4"])
        src_mp4 = tmp / f"{clip['__key__']}.src.mp4"  # a split clip at source resolution, like Panda-70M's
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-ss", str(meta["start_s"]), "-i",
                        str(videos / meta["source"]), "-t", str(meta["end_s"] - meta["start_s"]), "-an", "-c:v",
                        "libx264", "-preset", "veryfast", "-crf", "23", str(src_mp4)], check=True)
        shard_mp4s.append(str(shard_mp4))
        src_mp4s.append(str(src_mp4))
    copies = [(r, c) for r in range(repeats) for c in clips]
    bench_tars = []
    for i in range(0, len(copies), 2):
        path = tmp / f"shard-{i // 2:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for r, clip in copies[i:i + 2]:
                meta = json.loads(clip["json"])
                meta["samples"] = meta["samples"][:1]  # one training example per clip load on both sides
                writer.write({k: v for k, v in clip.items() if k not in ("__url__", "__local_path__", "mp4")}
                             | {"__key__": f"{clip['__key__']}-r{r}", "json": json.dumps(meta).encode()})
        bench_tars.append(str(path))
    return {"tars": bench_tars, "shard": shard_mp4s * repeats, "src": src_mp4s * repeats}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True)


def build_run(videos: Path, run_dir: Path, config: str, manifest: Path | None = None) -> None:
    manifest = manifest or videos / "manifest.csv"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "build", config, "--input", str(manifest), "--out",
                    str(run_dir), "--no-progress"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


HD_CONFIG = """name: bench-loader-hd
input: {kind: manifest}
split: {mode: fixed, window_s: 8.5, stride_s: 3.0, min_clip_s: 8.0, max_clip_s: 10.0}
clip: {frames_per_clip: 32, frame_size_px: 384}
shard: {max_samples: 4}
ray: {num_cpus: 2}
"""


def build_hd(videos: Path, tmp: Path) -> Path:
    """8.5 s clips at 1280 px wide from the real samples, sharded by our pipeline."""
    src = tmp / "hd-src"
    src.mkdir()
    ffmpeg("-stream_loop", "2", "-i", str(videos / "bigbuckbunny.mp4"), "-an", "-c:v", "libx264", "-preset",
           "veryfast", "-crf", "23", str(src / "bbb_loop.mp4"))
    ffmpeg("-stream_loop", "1", "-i", str(videos / "bikes.mp4"), "-an", "-vf", "scale=1280:-2", "-c:v", "libx264",
           "-preset", "veryfast", "-crf", "23", str(src / "bikes_hd.mp4"))
    (src / "manifest.csv").write_text("path,caption\nbbb_loop.mp4,A rabbit.\nbikes_hd.mp4,A street.\n")
    (tmp / "hd.yaml").write_text(HD_CONFIG)
    build_run(src, tmp / "hd-run", str(tmp / "hd.yaml"))
    return tmp / "hd-run"


def run_set(name: str, run_dir: Path, videos: Path, args, tmp: Path) -> None:
    work = tmp / name
    work.mkdir()
    data = prepare(run_dir, videos, args.repeats, work)
    n = len(data["src"])
    print(f"\n[{name}] {n} clip loads ({n // args.repeats} clips x {args.repeats}), {FRAMES} frames of {SIZE}px, "
          f"{args.workers} workers")
    timed(OursDataset(data["tars"][:2], 1, False), 0)  # warm the page cache and imports
    results = {"ours": timed(OursDataset(data["tars"], args.workers, False), args.workers),
               "ours+norm": timed(OursDataset(data["tars"], args.workers, True), args.workers)}
    for decoder in args.decoders.split(","):
        for kind in ("src", "shard"):
            results[f"release/{decoder}/{kind}"] = timed(ReleaseDataset(data[kind], decoder), args.workers)
    print(f"{'approach':<24}{'wall s':>8}{'clips/s':>9}{'cpu s':>8}{'ours x':>8}{'ours+norm x':>12}{'cpu x':>7}")
    ours, ours_norm = (n / results[k][0] for k in ("ours", "ours+norm"))
    for label, (wall, cpu, count) in results.items():
        assert count == n, (label, count, n)
        rate = count / wall
        print(f"{label:<24}{wall:>8.2f}{rate:>9.2f}{cpu:>8.1f}{ours / rate:>8.2f}{ours_norm / rate:>12.2f}"
              f"{cpu / results['ours'][1]:>7.2f}")
    best = min((results[k] for k in results if k.endswith("/src")), key=lambda r: r[0])
    print(f"[{name}] ratio ours / release (source-resolution clips, faster decoder): "
          f"{best[0] / results['ours'][0]:.1f}x wall, {best[1] / results['ours'][1]:.1f}x CPU (normalised on CPU too: "
          f"{best[0] / results['ours+norm'][0]:.1f}x wall)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="demo,hd", help="clip sets: demo, hd")
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"), help="the demo run (built if missing)")
    parser.add_argument("--videos", default=str(ROOT / ".cache" / "samples"), help="the sample videos")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes, both sides")
    parser.add_argument("--repeats", type=int, default=2, help="times each clip is loaded")
    parser.add_argument("--decoders", default="decord,pyav")
    args = parser.parse_args()
    run_dir, videos = Path(args.run_dir), Path(args.videos)
    from pipeline.sample_videos import ensure_sample_videos

    ensure_sample_videos(videos)
    _single_thread()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            if name == "demo":
                if not (run_dir / "shards").is_dir():
                    build_run(videos, run_dir, str(ROOT / "configs" / "demo.yaml"))
                run_set("demo", run_dir, videos, args, Path(tmp))
            elif name == "hd":
                hd = build_hd(videos, Path(tmp))
                run_set("hd", hd, hd.parent / "hd-src", args, Path(tmp))
            else:
                raise SystemExit(f"unknown set {name!r}")


if __name__ == "__main__":
    main()
