"""Shards for the loader and trainer tests, built by the real pipeline (small videos, 4 frames of 112 px).

Not a conftest (tests/conftest.py owns that module name): test modules import `train_run`; the build is
cached under pytest's base temp dir, so both modules share one build per session.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from conftest import make_test_video

NUM_VIDEOS = 4  # x 3 one-second clips = 12 clips, one caption pair each -> 12 examples
CAPTIONS = ["A red ball rolls across a wooden floor.", "Two birds sit on a wire and fly away.",
            "A man slices bread in a small kitchen.", "Waves break on a sandy beach at sunset."]


def shard_config(manifest: Path, max_samples: int = 3):
    from schemas.config import RunConfig

    return RunConfig.model_validate({
        "name": "train-test", "input": {"kind": "manifest", "path": str(manifest)},
        "split": {"mode": "fixed", "window_s": 1.0, "stride_s": 1.0, "min_clip_s": 0.5},
        "clip": {"frames_per_clip": 4, "frame_size_px": 112, "write_mp4": False},
        "shard": {"max_samples": max_samples, "videos_per_part": 1}, "ray": {"num_cpus": 2}})


@pytest.fixture(scope="session")
def train_run(tmp_path_factory, ray_local) -> Path:
    """A finished run dir: 12 clips in 4 shards of 3 (every shard holds one video's clips)."""
    import json

    from pipeline.build import build

    root = tmp_path_factory.getbasetemp() / "train-shards"
    run = root / "run"
    if (run / "manifest.json").exists() and json.loads((run / "manifest.json").read_text())["status"] == "finished":
        return run
    shutil.rmtree(root, ignore_errors=True)
    videos = root / "videos"
    videos.mkdir(parents=True)
    with open(videos / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        for i in range(NUM_VIDEOS):
            make_test_video(videos / f"v{i}.mp4", seconds=3.0, size=f"{160 + 16 * i}x120", fps=10)
            writer.writerow([f"v{i}.mp4", CAPTIONS[i]])
    report = build(shard_config(videos / "manifest.csv"), run, progress=False)
    assert report.counts["clips"] == 3 * NUM_VIDEOS and report.counts["shards"] == NUM_VIDEOS, report.counts
    return run


def copy_run(run: Path, dest: Path, parts: int | None = None, status: str | None = None) -> Path:
    """Copy a run dir (optionally only its first `parts` parts) and optionally rewrite the manifest status."""
    import json

    (dest / "shards").mkdir(parents=True)
    for f in sorted((run / "shards").iterdir()):
        index = int(f.name.split("-")[1].split(".")[0])
        if parts is None or index < parts:
            shutil.copy(f, dest / "shards" / f.name)
    manifest = json.loads((run / "manifest.json").read_text())
    if status:
        manifest["status"] = status
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest
