"""Per-stage throughput on this machine, and a plan for Panda-70M scale (70M clips) on a Ray cluster.

    .venv/bin/python bench/scale.py [--clips 70e6] [--clip-s 8.5] [--video-nodes 16] [--cores-per-node 32]

Each stage runs alone in this process on generated 1280x720 H.264 videos (one core, like one Ray task), so the
rates are per core; the end-to-end build then runs on Ray with every core here, as a check of the sum.
The plan multiplies the measured per-core rates out; caption throughput and price are inputs (an endpoint's
speed is not something this machine can measure), stated as such in the output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.build import build  # noqa: E402
from schemas.config import ClipConfig, InputConfig, ProbeConfig, RunConfig, SplitConfig  # noqa: E402
from schemas.records import Span, VideoResult  # noqa: E402
from stages.clip_decode import clip_and_decode  # noqa: E402
from stages.ingest import ingest_directory  # noqa: E402
from stages.probe import probe_video  # noqa: E402
from stages.ray_runtime import init_ray  # noqa: E402
from stages.shard import PartWriter  # noqa: E402
from stages.split import scene_cut_times  # noqa: E402
from stages.storage import Storage  # noqa: E402

SCENES = ("testsrc2", "mandelbrot", "smptebars", "rgbtestsrc", "testsrc")


def make_video(path: Path, seconds_per_scene: float = 6.0) -> Path:
    inputs, labels = [], []
    for i, source in enumerate(SCENES):
        inputs += ["-f", "lavfi", "-t", str(seconds_per_scene), "-i", f"{source}=size=1280x720:rate=30"]
        labels.append(f"[{i}:v]")
    graph = "".join(labels) + f"concat=n={len(SCENES)}:v=1:a=0,format=yuv420p[v]"
    subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, "-filter_complex", graph, "-map", "[v]", "-c:v",
                    "libx264", "-preset", "veryfast", "-g", "60", str(path)], check=True)
    return path


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(workdir: Path, videos: int, clip_s: float) -> dict:
    folder = workdir / "videos"
    folder.mkdir()
    paths = [make_video(folder / f"v{i}.mp4") for i in range(videos)]
    source_s = 6.0 * len(SCENES)
    total_mb = sum(p.stat().st_size for p in paths) / 1e6
    rates = {}
    ingested, secs = timed(lambda: ingest_directory(InputConfig(), folder))
    rates["ingest+sha256 (MB/s)"] = total_mb / secs
    probed, secs = timed(lambda: [probe_video(v, ProbeConfig()) for v in ingested.videos])
    rates["probe (videos/s)"] = len(probed) / secs
    _, secs = timed(lambda: [scene_cut_times(v.source, SplitConfig()) for v in probed])
    rates["scene split (video s/s)"] = len(probed) * source_s / secs
    spans = [Span(start_s=t, end_s=min(t + clip_s, source_s)) for t in [i * clip_s for i in range(int(source_s // clip_s))]]
    results, secs = timed(lambda: [clip_and_decode(v, spans, ClipConfig()) for v in probed])
    clips = sum(len(samples) for samples, _ in results)
    rates["clip+decode (clips/s)"] = clips / secs
    writer = PartWriter(Storage.from_uri(workdir / "parts"))
    flat = [VideoResult(video_id=v.id, video=v, samples=samples) for v, (samples, _) in zip(probed, results)]
    _, secs = timed(lambda: [writer.write(f"part-{i:04x}", [r]) for i, r in enumerate(flat)])
    rates["shard write (clips/s)"] = clips / secs
    rates["shard size (MB per clip)"] = sum(p.stat().st_size for p in (workdir / "parts").rglob("*.tar")) / clips / 1e6
    cfg = RunConfig.model_validate({"input": {"path": str(folder)}, "split": {"mode": "fixed", "window_s": clip_s,
                                                                             "stride_s": clip_s}})
    init_ray(num_cpus=os.cpu_count())  # cluster start-up is not throughput
    cpu_before = time.process_time()
    report, secs = timed(lambda: build(cfg, workdir / "run", progress=False))
    driver_cpu = time.process_time() - cpu_before
    rates["driver CPU per clip (ms)"] = driver_cpu / report.counts["clips"] * 1e3
    rates["driver CPU per wall second (ms)"] = driver_cpu / secs * 1e3
    rates[f"end-to-end Ray build, {os.cpu_count()} cores (clips/s)"] = report.counts["clips"] / secs
    # what the per-core stage costs predict for these cores, and how much of it the real build reaches; the build
    # cuts fixed windows, so the scene split's cost is not in its sum (the plan adds it for a real run)
    core_s_per_clip = (len(probed) / clips / rates["probe (videos/s)"] + 1 / rates["clip+decode (clips/s)"]
                       + 1 / rates["shard write (clips/s)"] + total_mb / clips / rates["ingest+sha256 (MB/s)"])
    rates["efficiency (end-to-end / sum of stage costs)"] = (
        report.counts["clips"] / secs) / (os.cpu_count() / core_s_per_clip)
    return rates


def plan(rates: dict, args) -> list[str]:
    clips = args.clips
    source_hours = clips * args.clip_s / 3600
    decode_core_h = clips / rates["clip+decode (clips/s)"] / 3600
    scene_core_h = source_hours * 3600 / rates["scene split (video s/s)"] / 3600
    probe_core_h = args.source_videos / rates["probe (videos/s)"] / 3600
    write_core_h = clips / rates["shard write (clips/s)"] / 3600
    ingest_core_h = clips * rates["shard size (MB per clip)"] * args.source_mb_per_clip_mb / rates[
        "ingest+sha256 (MB/s)"] / 3600
    efficiency = min(rates["efficiency (end-to-end / sum of stage costs)"], 1.0)
    video_cores = args.video_nodes * args.cores_per_node
    video_wall_h = (decode_core_h + scene_core_h + probe_core_h + write_core_h + ingest_core_h) / video_cores / efficiency
    tokens_in = clips * args.prompt_tokens
    tokens_out = clips * args.output_tokens
    caption_gpu_h = tokens_out / args.gpu_output_tokens_s / 3600
    caption_wall_h = caption_gpu_h / max(args.gpu_nodes, 1)
    cost = tokens_in / 1e6 * args.price_in_per_m + tokens_out / 1e6 * args.price_out_per_m
    shard_tb = clips * rates["shard size (MB per clip)"] / 1e6
    bound = "video decode (CPU)" if video_wall_h >= caption_wall_h else "captioning (GPU/endpoint)"
    return [
        f"target: {clips:,.0f} clips x {args.clip_s} s = {source_hours:,.0f} h of video from "
        f"{args.source_videos:,.0f} source videos",
        f"CPU core-hours: ingest+sha256 {ingest_core_h:,.0f}, probe {probe_core_h:,.0f}, scene split "
        f"{scene_core_h:,.0f}, clip+decode {decode_core_h:,.0f}, part write {write_core_h:,.0f}",
        f"video stages on {args.video_nodes} x {args.cores_per_node}-core nodes ({video_cores} cores) at the measured "
        f"efficiency {efficiency:.2f}: {video_wall_h:,.1f} h wall",
        f"driver: {rates['driver CPU per clip (ms)']:.2f} ms CPU per clip on this run, "
        f"{rates['driver CPU per wall second (ms)']:.0f} ms per wall second (listing and compaction included; per "
        f"clip it falls as clips/s rise: bench/e2e.py has the split); the plan needs "
        f"{clips / max(video_wall_h * 3600, 1):,.0f} clips/s",
        f"captioning (input): {args.prompt_tokens} prompt + {args.output_tokens} output tokens per clip -> "
        f"{tokens_in / 1e9:,.1f}B in, {tokens_out / 1e9:,.1f}B out; at {args.gpu_output_tokens_s:,.0f} output tok/s "
        f"per GPU: {caption_gpu_h:,.0f} GPU-h = {caption_wall_h:,.1f} h on {args.gpu_nodes} GPUs",
        f"captioning through a paid endpoint at ${args.price_in_per_m}/M in, ${args.price_out_per_m}/M out: "
        f"${cost:,.0f}",
        f"shards: ~{shard_tb:,.1f} TB at the measured {rates['shard size (MB per clip)']:.2f} MB per clip",
        f"bounded by: {bound}",
        "ray_cluster.yaml: node type cpu_video (max_workers = video nodes) runs probe/split/clip with num_cpus=1 "
        "per task; node type gpu hosts the vLLM/SGLang endpoints (caption.endpoint.base_url) and the trainer.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4, help="30 s 720p videos to measure on")
    parser.add_argument("--clips", type=float, default=70e6)
    parser.add_argument("--clip-s", type=float, default=8.5, help="mean clip length (Panda-70M: ~8.5 s)")
    parser.add_argument("--source-videos", type=float, default=3.8e6, help="Panda-70M: ~3.8M long videos")
    parser.add_argument("--source-mb-per-clip-mb", type=float, default=10.0,
                        help="source bytes read (ingest hash) per output byte; Panda-70M sources are ~10x the clips")
    parser.add_argument("--video-nodes", type=int, default=16)
    parser.add_argument("--cores-per-node", type=int, default=32)
    parser.add_argument("--gpu-nodes", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=700, help="few-shot prompt + caption, per clip")
    parser.add_argument("--output-tokens", type=int, default=350, help="~5 pairs of JSON per clip")
    parser.add_argument("--gpu-output-tokens-s", type=float, default=2500.0,
                        help="ASSUMED batched decode rate of an 8B model on one GPU with vLLM (not measured here)")
    parser.add_argument("--price-in-per-m", type=float, default=0.15)
    parser.add_argument("--price-out-per-m", type=float, default=0.60)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hicom-scale-"))
    try:
        rates = measure(workdir, args.videos, args.clip_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"measured on this machine ({os.cpu_count()} cores), per core unless stated:")
    for name, value in rates.items():
        print(f"  {name:<48} {value:10.2f}")
    print("\nplan:")
    for line in plan(rates, args):
        print(f"  {line}")


if __name__ == "__main__":
    main()
