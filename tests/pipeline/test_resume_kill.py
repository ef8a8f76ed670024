"""SIGKILL a build mid-run, rerun it, and compare with an uninterrupted build: identical clips and contents."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_test_video, shard_contents
from pipeline.build import build
from pipeline.resume import committed_state
from pipeline.stats import connect
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


LONG_CONFIG = """
name: kill-long-test
split: {mode: fixed, window_s: 1.0, stride_s: 1.0}
clip: {frames_per_clip: 4, clips_per_task: 3}
shard: {max_samples: 5, videos_per_part: 1}
ray: {num_cpus: 2}
"""


@pytest.mark.slow
def test_killed_long_video_fan_out_resumes_its_missing_batches(tmp_path, ray_local):
    """A 12 s video fans out into 4 clip batches on 2 workers; a kill after the first batch part leaves the
    video partly committed; the rerun decodes only the missing batches: the same clips, once each."""
    videos = tmp_path / "videos"
    videos.mkdir()
    make_test_video(videos / "long.mp4", seconds=12.0, size="320x240")
    make_test_video(videos / "short.mp4", seconds=2.0, size="256x144")
    (tmp_path / "cfg.yaml").write_text(LONG_CONFIG)

    reference = tmp_path / "reference"
    build(load_run_config(tmp_path / "cfg.yaml", {"input.path": str(videos)}), reference, progress=False)
    expected = shard_contents(reference)
    assert len(expected) == 14
    query = "SELECT source, num_clips, num_batches FROM videos ORDER BY 1"
    videos_view = connect(reference).execute(query).fetchall()
    assert videos_view == [("long.mp4", 12, 4), ("short.mp4", 2, None)]  # one row per video, batches merged

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.cli", "build", str(tmp_path / "cfg.yaml"), "--input", str(videos),
           "--out", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not committed_state(run).partial:  # a batch of the long video committed
        assert proc.poll() is None, "the build finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (count, done), = committed_state(run).partial.values()
    assert count == 4 and 0 < len(done) < 4
    partial = shard_contents(run)
    assert 3 <= len(partial) < len(expected)

    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert shard_contents(run) == expected
    assert not committed_state(run).partial
    assert connect(run).execute(query).fetchall() == videos_view
