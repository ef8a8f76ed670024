"""`hicom build` end to end vs the floor of the same FFmpeg work run bare.

    .venv/bin/python bench/e2e.py [--videos 12] [--seconds 20] [--workers 2] [--clip-s 2] [--rounds 3] [--input DIR]

1. Makes real H.264 videos with FFmpeg (lavfi test sources, 1280x720, hard scene cuts).
2. Recording pass (untimed): probe -> split -> clip+decode in this process, recording every FFmpeg/ffprobe
   command line the stages execute (clip+decode's are recorded, not run).
3. Floor: the recorded commands, each in a fresh folder of the build's scratch root (`stages/scratch.py`: /dev/shm
   when it has room), under `xargs -P WORKERS` (no Python, no Ray).
4. Reference (informative): the same record stages (probe+hash, split, clip+decode, pairs) as one plain Ray task
   per video, WORKERS at a time, nothing listed, committed or compacted: what Ray and the stages' Python cost.
5. `hicom build` on a local Ray with WORKERS CPUs (Ray start-up reported separately, not counted), fixed split.
6. Two dense builds: a quarter of and as many small videos (8 s, 320x180), cut into 0.5 s clips of 2 frames,
   so that clips commit several times faster. Their driver CPU's difference over their clips' difference is the
   driver's marginal cost per committed clip (per-build costs cancel out), which bounds the clips/s one
   driver can feed.
The floor, the reference and the build run in rounds (`--rounds`, default 3), back to back, in alternating
order: a shared machine's speed drifts by tens of percent within minutes, so each round's ratio compares runs
made under the same conditions, and the median of the rounds is the figure.
Prints, per round and as medians: floor seconds, build seconds, the ratio floor/build (goal >= 0.9), clips,
CPU-seconds of the whole machine for each run (from /proc/stat: Linux only); then the driver's CPU seconds per
committed clip (goal <= 1 ms).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.build import BuildReport, build  # noqa: E402
from schemas.config import RunConfig  # noqa: E402
from schemas.records import VideoResult  # noqa: E402
from stages import clip_decode, probe, split  # noqa: E402
from stages.ffmpeg_tools import Completed  # noqa: E402
from stages.ingest import ingest  # noqa: E402
from stages.ray_runtime import init_ray  # noqa: E402
from stages.scratch import scratch_root  # noqa: E402

SCENES = ("testsrc2", "mandelbrot", "smptebars", "rgbtestsrc")
_SCRATCH = re.compile(r"(/[^ ]*?/hicom-clip-[^/]+)")


def make_videos(folder: Path, count: int, seconds: float, size: str = "1280x720") -> None:
    folder.mkdir(parents=True)
    per_scene = seconds / len(SCENES)
    for i in range(count):
        inputs, labels = [], []
        for j, source in enumerate(SCENES[i % len(SCENES):] + SCENES[:i % len(SCENES)]):
            inputs += ["-f", "lavfi", "-t", str(per_scene), "-i", f"{source}=size={size}:rate=30"]
            labels.append(f"[{j}:v]")
        graph = "".join(labels) + f"concat=n={len(SCENES)}:v=1:a=0,format=yuv420p[v]"
        subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, "-filter_complex", graph, "-map", "[v]",
                        "-c:v", "libx264", "-preset", "veryfast", "-g", "60", str(folder / f"v{i:03d}.mp4")],
                       check=True)


def record_commands(cfg: RunConfig) -> list[list[str]]:
    """Every FFmpeg-family command the video stages execute for this input: probe and split run for real
    (clip planning needs their output); clip+decode's commands are recorded without being run."""
    commands: list[list[str]] = []
    real = clip_decode.run_tool

    def run_and_record(args, timeout_s, *rest, **kw):
        commands.append(list(args))
        return real(args, timeout_s, *rest, **kw)

    def record_only(args, timeout_s, *rest, **kw):
        commands.append(list(args))
        return Completed(stdout=b"", stderr="")

    probe.run_tool = split.run_tool = run_and_record
    clip_decode.run_tool = record_only
    try:
        for video in ingest(cfg.input).videos:
            result = VideoResult(video_id=video.id, source=video.relpath, video=video)
            for step, step_cfg in ((probe.apply, cfg.probe), (split.apply, cfg.split), (clip_decode.apply, cfg.clip)):
                if not result.failed:
                    result = step(result, step_cfg)
    finally:
        probe.run_tool = split.run_tool = clip_decode.run_tool = real
    return commands


def floor_seconds(commands: list[list[str]], workers: int, scratch: Path) -> float:
    """Wall time of the recorded commands under `xargs -P workers`, each with its own scratch folder."""
    lines = []
    for i, args in enumerate(commands):
        line = shlex.join(args)
        match = _SCRATCH.search(line)
        if match:
            fresh = scratch / f"c{i}"
            line = f"mkdir -p {shlex.quote(str(fresh))} && " + line.replace(match.group(1), str(fresh))
        lines.append(line + " >/dev/null 2>&1")
    scratch.mkdir(parents=True, exist_ok=True)
    script = scratch / "commands.txt"
    script.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    subprocess.run(["xargs", "-P", str(workers), "-d", "\n", "-n", "1", "sh", "-c"], stdin=script.open(), check=True)
    return time.perf_counter() - start


def machine_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (every process: FFmpeg, Ray's daemons, us)."""
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")  # steal (the host's) not counted


def plain_tasks(cfg: RunConfig, workers: int):
    """The build's record stages as one plain Ray task per video (no listing, no commit): a function that runs
    them over the input, `workers` at a time, and returns (wall s, driver CPU s, clips). `workers` tasks run
    first, untimed, so that each worker process has imported the stages."""
    import ray

    from pipeline.build import stage_pipeline
    from stages.ray_adapter import from_row, to_row

    before, after = stage_pipeline(cfg)

    def run_stages(row: dict) -> int:
        for stage in before + after:
            row = stage(row)
        return len(from_row(row).samples)

    task = ray.remote(num_cpus=1)(run_stages)
    rows = [to_row(VideoResult(video_id=v.id, source=v.relpath, video=v)) for v in ingest(cfg.input).videos]
    ray.get([task.remote(row) for row in rows[:workers]])

    def run() -> tuple[float, float, int]:
        start, cpu = time.perf_counter(), time.process_time()
        clips = sum(ray.get([task.remote(row) for row in rows]))
        return time.perf_counter() - start, time.process_time() - cpu, clips
    return run


@dataclass
class Run:
    seconds: float
    machine_cpu_s: float  # the whole machine's, meanwhile
    driver_cpu_s: float = 0.0
    clips: int = 0


def measured(run: Callable[[], tuple[float, float, int]]) -> Run:
    """`run` returns (its wall seconds, driver CPU seconds, clips); add the machine's CPU-seconds meanwhile."""
    before = machine_cpu_s()
    seconds, driver, clips = run()
    return Run(seconds, machine_cpu_s() - before, driver, clips)


def rounds(cfg: RunConfig, commands: list[list[str]], workers: int, count: int, work: Path
           ) -> list[dict[str, Run]]:
    """`count` rounds of the floor, the plain tasks and the build, in alternating order; prints each round.
    A run's machine CPU-seconds include deleting what it wrote (the floor's scratch, the build's run)."""
    plain = plain_tasks(cfg, workers)

    def floor() -> tuple[float, float, int]:
        folder = Path(tempfile.mkdtemp(prefix="hicom-e2e-floor-", dir=scratch_root(cfg.clip.scratch_dir)))
        seconds = floor_seconds(commands, workers, folder)
        shutil.rmtree(folder)
        return seconds, 0.0, 0

    def hicom_build() -> tuple[float, float, int]:
        report, driver = driver_cpu_of_build(cfg, work / "run")
        shutil.rmtree(work / "run")
        return report.seconds, driver, report.counts["clips"]

    out = []
    for i in range(count):
        order = ("floor", "plain", "build") if i % 2 == 0 else ("build", "plain", "floor")
        runs = {what: measured({"floor": floor, "plain": plain, "build": hicom_build}[what]) for what in order}
        f, p, b = runs["floor"], runs["plain"], runs["build"]
        print(f"round {i + 1} ({', '.join(order)}): floor {f.seconds:.1f} s (machine CPU {f.machine_cpu_s:.1f} s), "
              f"plain tasks {p.seconds:.1f} s ({p.machine_cpu_s:.1f} s), build {b.seconds:.1f} s "
              f"({b.machine_cpu_s:.1f} s, {b.clips} clips); floor/build {f.seconds / b.seconds:.2f}, "
              f"floor/plain {f.seconds / p.seconds:.2f}, plain/build {p.seconds / b.seconds:.2f}", flush=True)
        out.append(runs)
    return out


def median_ratio(runs: list[dict[str, Run]], num: str, den: str) -> str:
    ratios = [r[num].seconds / r[den].seconds for r in runs]
    return f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"


def build_config(videos: Path, workers: int, clip_s: float, frames_per_clip: int | None = None) -> RunConfig:
    clip = {"frames_per_clip": frames_per_clip} if frames_per_clip else {}
    return RunConfig.model_validate({"input": {"path": str(videos)}, "clip": clip, "ray": {"num_cpus": workers},
                                     "split": {"mode": "fixed", "window_s": clip_s, "stride_s": clip_s}})


def driver_cpu_of_build(cfg: RunConfig, run: Path) -> tuple[BuildReport, float]:
    """The report and the driver's CPU seconds of one `hicom build` on the Ray already started."""
    cpu_before = time.process_time()
    report = build(cfg, run, progress=False)
    return report, time.process_time() - cpu_before


def dense_builds(work: Path, count: int, workers: int) -> list[tuple[BuildReport, float]]:
    """Two builds of small dense videos (8 s, 320x180, 0.5 s clips of 2 frames), of count // 4 and of count
    videos, with their driver CPU: the same clip rate, so per-build costs (the listing, compaction, the run's
    markers) cancel out of their difference."""
    make_videos(work / "dense", count, 8.0, size="320x180")
    small = work / "dense-small"
    small.mkdir()
    for video in sorted((work / "dense").iterdir())[:max(1, count // 4)]:
        shutil.copy(video, small / video.name)
    return [driver_cpu_of_build(build_config(folder, workers, 0.5, frames_per_clip=2), work / f"{folder.name}-run")
            for folder in (small, work / "dense")]


def marginal_driver_cpu(small: tuple[BuildReport, float], large: tuple[BuildReport, float]) -> str:
    """The driver's CPU per additional committed clip, from two builds at the same clip rate. It includes the
    driver's per-wall-second cost at that rate, so it is an upper bound for faster clusters."""
    (r1, d1), (r2, d2) = small, large
    c1, c2 = r1.counts["clips"], r2.counts["clips"]
    per_clip = (d2 - d1) / max(c2 - c1, 1)
    if per_clip <= 0:
        return f"marginal driver CPU not measurable from these builds ({d1:.2f} s for {c1} clips, {d2:.2f} s for {c2})"
    return (f"marginal driver CPU: {per_clip * 1e3:.2f} ms per committed clip at {c2 / r2.seconds:.1f} clips/s "
            f"({c1} and {c2} clips: {d1:.2f} s and {d2:.2f} s) (goal <= 1 ms); one driver saturates at about "
            f"{1 / per_clip:,.0f} clips/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each generated video")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--clip-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of floor, plain tasks and build")
    parser.add_argument("--input", help="a folder of real videos to use instead of generated ones")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="hicom-e2e-"))
    try:
        videos = Path(args.input) if args.input else work / "videos"
        if not args.input:
            make_videos(videos, args.videos, args.seconds)
        cfg = build_config(videos, args.workers, args.clip_s)
        commands = record_commands(cfg)
        start = time.perf_counter()
        init_ray(num_cpus=args.workers)
        ray_start = time.perf_counter() - start
        print(f"videos {len(ingest(cfg.input).videos)}, FFmpeg commands {len(commands)}, workers {args.workers}; "
              f"Ray start-up {ray_start:.1f} s (not counted); floor: the commands under xargs -P {args.workers}; "
              "plain tasks: the same stages as Ray tasks, nothing listed, committed or compacted", flush=True)
        runs = rounds(cfg, commands, args.workers, args.rounds, work)
        builds = [r["build"] for r in runs]
        print(f"ratio floor / build, median of {len(runs)} rounds: {median_ratio(runs, 'floor', 'build')} "
              f"(goal >= 0.9); floor / plain tasks {median_ratio(runs, 'floor', 'plain')}; plain tasks / build "
              f"{median_ratio(runs, 'plain', 'build')}")
        driver = statistics.median(b.driver_cpu_s / max(b.clips, 1) for b in builds)
        print(f"driver CPU of the builds: median {driver * 1e3:.2f} ms per committed clip at "
              f"{statistics.median(b.clips / b.seconds for b in builds):.1f} clips/s (goal <= 1 ms)")
        small, large = dense_builds(work, args.videos, args.workers)
        for dense, dense_driver in (small, large):
            clips_d = dense.counts["clips"]
            print(f"dense build ({dense.inputs_videos} videos of 8 s, 320x180, 0.5 s clips of 2 frames): "
                  f"{dense.seconds:.1f} s, {clips_d} clips at {clips_d / dense.seconds:.1f} clips/s, driver CPU "
                  f"{dense_driver:.2f} s = {dense_driver / max(clips_d, 1) * 1e3:.2f} ms per clip")
        print(marginal_driver_cpu(small, large))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
