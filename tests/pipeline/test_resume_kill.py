"""SIGKILL a build mid-run, rerun it, and compare with an uninterrupted build: identical clips and contents."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_test_video, shard_contents
from pipeline.build import build
from schemas.config import load_run_config

CONFIG = """
name: kill-test
split: {mode: fixed, window_s: 1.0, stride_s: 1.0}
clip: {frames_per_clip: 4}
shard: {max_samples: 3, videos_per_part: 2}
ray: {num_cpus: 2}
"""


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_result(tmp_path, ray_local):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(10):
        make_test_video(videos / f"v{i:02d}.mp4", seconds=3.0, size=f"{320 + 16 * i}x240")
    (tmp_path / "cfg.yaml").write_text(CONFIG)

    reference = tmp_path / "reference"
    build(load_run_config(tmp_path / "cfg.yaml", {"input.path": str(videos)}), reference, progress=False)
    expected = shard_contents(reference)
    assert len(expected) == 30

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.cli", "build", str(tmp_path / "cfg.yaml"), "--input", str(videos),
           "--out", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    # kill once workers have committed some parts: a kill loses only the videos in flight
    while time.time() < deadline and len(list((run / "shards").glob("part-*.stats.json"))) < 2:
        assert proc.poll() is None, "the build finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = shard_contents(run)
    assert 6 <= len(partial) < len(expected)  # at least the two committed parts (2 videos x 3 clips each)

    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    resumed = shard_contents(run)
    assert resumed == expected
    assert not list((run / "shards").glob("*.tmp"))
