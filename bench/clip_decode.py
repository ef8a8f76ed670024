"""Benchmark (not a test): our clip+decode stage vs bare FFmpeg vs video2dataset, on the same clips.

Every method gets the same 2 s windows, planned once from our probe, and the same number of workers:
  ours     `clip_and_decode` per video in a process pool (mp4 at max side 384 + 32 frames 384x384 JPEG)
  bare     one plain ffmpeg per clip (`-ss -t -i`), two outputs: the same mp4 and the same sampled frames
  segment  (informative) one ffmpeg per video, segment muxer, mp4s only
  v2d      video2dataset 1.3.0 ClippingSubsampler + ResolutionSubsampler, in its own venv (.cache/v2d-venv)
Wall time is the figure; CPU seconds (children's user+sys) are shown too, since they are less sensitive to
other load on the machine. Run: .venv/bin/python bench/clip_decode.py [--videos DIR] [--repeat N] [--workers 2]
[--v2d reference|width|both|none]. See bench/README.md for the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.sample_videos import ensure_sample_videos  # noqa: E402
from schemas.config import ClipConfig, InputConfig, ProbeConfig, SplitConfig  # noqa: E402
from schemas.records import VideoRecord  # noqa: E402
from stages.clip_decode import clip_and_decode  # noqa: E402
from stages.ingest import ingest_directory  # noqa: E402
from stages.probe import probe_video  # noqa: E402
from stages.sampling import frames_in_span, release_frame_indices  # noqa: E402
from stages.split import split_video  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
V2D_VENV = ROOT / ".cache" / "v2d-venv"
CLIP = ClipConfig()  # the stage's defaults: 32 frames, 384 px, x264 veryfast crf 23, JPEG q 3
WINDOWS = SplitConfig(mode="fixed", window_s=2.0, stride_s=2.0, min_clip_s=1.0)
# Longer synthetic 720p sources (real work, scene changes between parts); 4 s GOP like typical web video.
GENERATED = {
    "gen_a.mp4": ["testsrc2=s=1280x720:r=30:d=10", "mandelbrot=s=640x360:r=30,trim=duration=10,scale=1280:720",
                  "testsrc2=s=1280x720:r=30:d=10,hue=h=60*t"],
    "gen_b.mp4": ["mandelbrot=s=640x360:r=30:start_scale=1,trim=duration=10,scale=1280:720",
                  "testsrc2=s=1280x720:r=30:d=10,negate", "testsrc2=s=1280x720:r=30:d=10,hue=s=0"],
}
V2D_DEPS = ["numpy<2", "fire<0.6", "requests", "ffmpeg-python", "yt-dlp", "pyarrow<18", "pandas<2.3", "fsspec",
            "webdataset", "webvtt-py", "wandb", "tqdm", "timeout-decorator", "scenedetect[opencv]==0.6.2", "decord",
            "langdetect", "soundfile", "omegaconf", "einops", "transformers==4.37.1", "Pillow", "accelerate", "scipy"]
# Runs inside the v2d venv. Spawned pool workers re-import this file, so the class patch reaches them.
V2D_RUNNER = '''
import json, sys, time
t0 = time.time()
from omegaconf import OmegaConf
from video2dataset import video2dataset
from video2dataset.configs import CONFIGS
from video2dataset.subsamplers import ResolutionSubsampler
# 1.3.0's ResolutionSubsampler takes no encode_formats, but its download worker reads that attribute.
ResolutionSubsampler.encode_formats = {"video": "mp4"}
if __name__ == "__main__":
    url_list, out, per_shard, resolution = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    print(json.dumps({"import_s": time.time() - t0}), flush=True)
    config = OmegaConf.to_container(CONFIGS["default"])
    config["subsampling"] = {
        "ClippingSubsampler": {"args": {"min_length": 1, "max_length": 2, "precision": "exact"}},
        "ResolutionSubsampler": {"args": resolution}}
    config["storage"]["number_sample_per_shard"] = per_shard
    config["distribution"].update(processes_count=2, thread_count=2)
    video2dataset(url_list=url_list, input_format="parquet", url_col="url", clip_col="clips", output_folder=out,
                  output_format="webdataset", incremental_mode="incremental", encode_formats={"video": "mp4"},
                  config=config)
'''


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", *args], check=True)


def geometry(path: Path) -> str:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height",
                          "-of", "csv=p=0:s=x", str(path)], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def first_clip_shape(out: Path, stem: str) -> str:
    """Geometry of a video's first clip as a method left it: `<stem>.mp4` or `<stem>_000.mp4`."""
    found = [p for p in (out / f"{stem}.mp4", out / f"{stem}_000.mp4") if p.exists()]
    return geometry(found[0]) if found else "-"


def prepare_videos(dest: Path) -> None:
    """The four sample videos plus the generated 30 s 720p ones, made once under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in ensure_sample_videos(ROOT / ".cache" / "samples"):
        if not (dest / src.name).exists():
            shutil.copy(src, dest / src.name)
    for name, parts in GENERATED.items():
        if not (dest / name).exists():
            inputs = [a for p in parts for a in ("-f", "lavfi", "-i", p)]
            graph = "".join(f"[{i}]" for i in range(len(parts))) + f"concat=n={len(parts)}:v=1:a=0,format=yuv420p"
            ffmpeg(*inputs, "-filter_complex", graph, "-c:v", "libx264", "-preset", "fast", "-g", "120",
                   str(dest / f"{name}.part.mp4"))
            (dest / f"{name}.part.mp4").rename(dest / name)


def plan(videos_dir: Path) -> list:
    """[(probed video, its 2 s spans)], longest first, so every method schedules the same way."""
    ingested = ingest_directory(InputConfig(hash_files=False), videos_dir)
    planned = []
    for video in ingested.videos:
        video = probe_video(video, ProbeConfig())
        spans = split_video(video, WINDOWS)[0] if isinstance(video, VideoRecord) else []
        if spans:
            planned.append((video, spans))
    return sorted(planned, key=lambda vs: -vs[0].probe.duration_s)


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of waited-for children) of fn(); pools are joined inside fn so their CPU counts."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _ours_one(video, spans, out: str) -> tuple[int, int, int]:
    samples, failures = clip_and_decode(video, spans, CLIP, scratch_dir=out)
    if samples and samples[0].mp4:
        Path(out, f"{Path(video.source).stem}.mp4").write_bytes(samples[0].mp4)
    return len(samples), len(failures), sum(len(set(s.clip.frame_indices)) for s in samples)


def run_ours(planned, workers: int, out: Path) -> dict:
    with ProcessPoolExecutor(workers) as pool:
        counts = list(pool.map(_ours_one, *zip(*[(v, s, str(out)) for v, s in planned])))
    return {"clips": sum(c[0] for c in counts), "failed": sum(c[1] for c in counts),
            "jpegs": sum(c[2] for c in counts)}


def bare_command(video, span, out: Path) -> list[str]:
    """What a person would write for one clip: seek, cut, two outputs (scaled mp4 + the sampled frames)."""
    times = frames_in_span(video.probe.frame_times_s, span.start_s, span.end_s)
    picks = sorted(set(release_frame_indices(len(times), CLIP.frames_per_clip)))
    side, size = CLIP.mp4_max_side_px, CLIP.frame_size_px
    graph = (f"[0:v:0]split=2[a][b];[a]scale='if(gte(iw,ih),min({side},iw),-2)':'if(gte(iw,ih),-2,min({side},ih))'[m];"
             f"[b]select='{'+'.join(f'eq(n,{i})' for i in picks)}',"
             f"pad='max(iw,ih)':'max(iw,ih)':'(ow-iw)/2':'(oh-ih)/2':color=0x7F7F7F,scale={size}:{size}[f]")
    return ["-ss", f"{span.start_s:.6f}", "-t", f"{span.end_s - span.start_s:.6f}", "-i", video.source,
            "-filter_complex", graph, "-map", "[m]", "-c:v", "libx264", "-preset", CLIP.mp4_preset,
            "-crf", str(CLIP.mp4_crf), "-pix_fmt", "yuv420p", "-an", "-movflags", "+faststart", str(out) + ".mp4",
            "-map", "[f]", "-fps_mode", "passthrough", "-q:v", str(CLIP.jpeg_qscale), str(out) + "_%03d.jpg"]


def run_bare(planned, workers: int, out: Path) -> dict:
    jobs = [(v, s, out / f"{Path(v.source).stem}_{i:03d}") for v, spans in planned for i, s in enumerate(spans)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: ffmpeg(*bare_command(*job)), jobs))
    return {"clips": len(list(out.glob("*.mp4"))), "jpegs": len(list(out.glob("*.jpg")))}


def run_segment(planned, workers: int, out: Path) -> dict:
    """One ffmpeg per video: scale, force keyframes at the cuts, segment muxer. mp4s only."""
    def one(video, spans):
        cuts = ",".join(f"{s.end_s:.6f}" for s in spans[:-1])
        side = CLIP.mp4_max_side_px
        ffmpeg("-i", video.source, "-map", "0:v:0", "-vf",
               f"scale='if(gte(iw,ih),min({side},iw),-2)':'if(gte(iw,ih),-2,min({side},ih))'", "-c:v", "libx264",
               "-preset", CLIP.mp4_preset, "-crf", str(CLIP.mp4_crf), "-pix_fmt", "yuv420p", "-an",
               "-force_key_frames", cuts, "-f", "segment", "-segment_times", cuts, "-reset_timestamps", "1",
               str(out / f"{Path(video.source).stem}_%03d.mp4"))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda vs: one(*vs), planned))
    return {"clips": len(list(out.glob("*.mp4")))}


def ensure_v2d() -> str | None:
    """Build the separate video2dataset venv once (see README); None when ready, else why not."""
    py = V2D_VENV / "bin" / "python"
    probe = [str(py), "-c", "import video2dataset.subsamplers"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    pip = [str(V2D_VENV / "bin" / "pip"), "install", "-q"]
    try:
        subprocess.run([sys.executable, "-m", "venv", str(V2D_VENV)], check=True)
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "--no-deps", "video2dataset==1.3.0", "torchdata==0.7.1"], check=True)
        subprocess.run([*pip, *V2D_DEPS], check=True)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        stub = Path(site, "torchaudio")  # the real torchaudio does not load beside torch 2.13; clipping needs none
        stub.mkdir(exist_ok=True)
        for name in ("__init__.py", "functional.py"):
            (stub / name).touch()
        subprocess.run(probe, check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot build {V2D_VENV}: {exc}"
    return None


def run_v2d(planned, out: Path, resolution: dict) -> dict:
    """video2dataset as a subprocess; shards hold half the videos each (longest dealt alternately) so both of
    its processes get work."""
    rows = planned[0::2] + planned[1::2]
    table = pa.table({"url": [str(Path(v.source)) for v, _ in rows],
                      "clips": [[[s.start_s, s.end_s] for s in spans] for _, spans in rows]})
    pq.write_table(table, out.parent / f"{out.name}.parquet")
    runner = CACHE / "v2d_run.py"
    runner.write_text(V2D_RUNNER)
    proc = subprocess.run([str(V2D_VENV / "bin" / "python"), str(runner), str(out.parent / f"{out.name}.parquet"),
                           str(out), str((len(rows) + 1) // 2), json.dumps(resolution)],
                          capture_output=True, text=True)
    first = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), "{}")
    clips = 0
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".mp4"):
                    clips += 1
                    if name.endswith("_00000.mp4"):
                        meta = json.load(tar.extractfile(members[name[:-4] + ".json"]))
                        target = out / f"{Path(meta['url']).stem}.mp4"
                        target.write_bytes(tar.extractfile(member).read())
    if proc.returncode != 0 or not clips:
        return {"clips": clips, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or "no clips"}
    return {"clips": clips, "import_s": json.loads(first).get("import_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=Path, help="a directory of videos (default: samples + generated)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the best wall time counts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--v2d", choices=["reference", "width", "both", "none"], default="reference",
                        help="video2dataset resolution: the reference video_size=384 (short side 384, upscales), "
                             "width=384 (our geometry on landscape sources), both, or none")
    args = parser.parse_args()
    videos_dir = args.videos or CACHE / "videos"
    if args.videos is None:
        prepare_videos(videos_dir)
    planned = plan(videos_dir.resolve())
    total = sum(len(s) for _, s in planned)
    print(f"{len(planned)} videos, {total} clips of <= 2 s, {args.workers} workers, best of {args.repeat}")
    methods = {
        "ours": lambda out: run_ours(planned, args.workers, out),
        "bare ffmpeg/clip": lambda out: run_bare(planned, args.workers, out),
        "bare segment (mp4 only)": lambda out: run_segment(planned, args.workers, out),
    }
    v2d_problem = "skipped (--v2d none)" if args.v2d == "none" else ensure_v2d()
    if v2d_problem is None and args.v2d in ("reference", "both"):
        methods["v2d video_size=384"] = lambda out: run_v2d(planned, out, {"video_size": 384, "resize_mode": "scale"})
    if v2d_problem is None and args.v2d in ("width", "both"):
        methods["v2d width=384"] = lambda out: run_v2d(planned, out, {"width": 384, "resize_mode": "scale"})
    best: dict[str, tuple[float, float, dict]] = {}
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    for rep in range(args.repeat):  # methods interleaved, so drifting machine load hits all of them alike
        for name, fn in methods.items():
            if name.startswith("v2d") and rep:  # minutes per run, and far from the others: once is enough
                continue
            out = CACHE / "out" / "".join(c if c.isalnum() else "_" for c in name)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            result = {}
            wall, cpu = timed(lambda: result.update(fn(out)))
            result["shapes"] = {Path(v.source).stem: first_clip_shape(out, Path(v.source).stem) for v, _ in planned}
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu, result)
    print(f"load average after: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
    ours_wall, ours_cpu, ours = best["ours"]
    print(f"\n{'method':26} {'clips':>5} {'wall s':>7} {'cpu s':>7} {'clips/s':>8} {'ours/this':>9} {'(by cpu)':>8}")
    for name, (wall, cpu, result) in best.items():
        rate, ratio = result["clips"] / wall, ours["clips"] / ours_wall * wall / max(result["clips"], 1)
        cpu_ratio = ours["clips"] / ours_cpu * cpu / max(result["clips"], 1)
        print(f"{name:26} {result['clips']:>5} {wall:7.1f} {cpu:7.1f} {rate:8.2f} {ratio:9.2f} {cpu_ratio:8.2f}"
              + (f"  (startup {result['import_s']:.1f} s)" if result.get("import_s") else "")
              + (f"  FAILED: {result['error']}" if result.get("error") else ""))
    if v2d_problem:
        print(f"v2d: not run: {v2d_problem}")
    print("\nchecks: jpegs ours", best["ours"][2].get("jpegs"), "bare", best["bare ffmpeg/clip"][2].get("jpegs"),
          "| ours failed", best["ours"][2].get("failed"))
    print("first-clip mp4 geometry per video (" + ", ".join(best) + "):")
    for video, _ in planned:
        stem = Path(video.source).stem
        print(f"  {stem:22} src {video.probe.width}x{video.probe.height}: "
              + ", ".join(best[n][2]["shapes"][stem] for n in best))


if __name__ == "__main__":
    main()
