"""The clip stage with its scratch folder in memory (/dev/shm) vs on the disk of the system temp folder.

    .venv/bin/python bench/scratch.py [--input DIR | --videos 12] [--rounds 4]

Probes and splits DIR's videos (or `--videos` generated ones: 16 s, 1280x720, as `bench/e2e.py` makes them) once,
in 2 s windows as `bench/e2e.py` does, then runs `clip_and_decode` over all of them in this process, in rounds
that alternate the two folders. Prints per run: wall seconds, FFmpeg's user and kernel CPU-seconds (its
children's, from getrusage) and this process's; then the medians and their ratios.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import build_config, make_videos  # noqa: E402
from schemas.records import VideoResult  # noqa: E402
from stages import clip_decode, probe, split  # noqa: E402
from stages.ingest import ingest  # noqa: E402
from stages.scratch import MEMORY_DIR  # noqa: E402

FIELDS = ("wall s", "FFmpeg user s", "FFmpeg kernel s", "Python s")


def cpu() -> tuple[float, float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime, children.ru_stime, own.ru_utime + own.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a folder of videos (default: generate --videos of them)")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hicom-scratch-bench-") as work:
        videos = Path(args.input or Path(work) / "videos")
        if not args.input:
            make_videos(videos, args.videos, 16.0)
        compare(videos, args.rounds)


def compare(videos: Path, rounds: int) -> None:
    cfg = build_config(videos, 1, 2.0)
    planned = []
    for video in ingest(cfg.input).videos:
        result = split.apply(probe.apply(VideoResult(video_id=video.id, source=video.relpath, video=video),
                                         cfg.probe), cfg.split)
        planned.append(result)
    folders = {"memory": str(MEMORY_DIR), "disk": tempfile.gettempdir()}
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in folders}
    for i in range(rounds):
        for name in (("memory", "disk") if i % 2 == 0 else ("disk", "memory")):
            before, start = cpu(), time.perf_counter()
            clips = sum(len(clip_decode.clip_and_decode(r.video, r.planned, cfg.clip, folders[name])[0])
                        for r in planned)
            after = cpu()
            runs[name].append((time.perf_counter() - start, *(b - a for a, b in zip(before, after))))
            shown = ", ".join(f"{f} {v:.2f}" for f, v in zip(FIELDS, runs[name][-1]))
            print(f"round {i + 1} {name} ({folders[name]}): {shown}; {clips} clips", flush=True)
    medians = {name: [statistics.median(r[k] for r in rs) for k in range(len(FIELDS))] for name, rs in runs.items()}
    for name, values in medians.items():
        print(f"median of {rounds} {name}: " + ", ".join(f"{f} {v:.2f}" for f, v in zip(FIELDS, values)))
    print("disk / memory: " + ", ".join(f"{f} {d / m:.2f}" for f, d, m in
                                        zip(FIELDS, medians["disk"], medians["memory"]) if m))


if __name__ == "__main__":
    main()
