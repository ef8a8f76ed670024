"""Faults: a killed driver (during probe, mid-shard write), a killed Ray worker, a full disk.
Each time the rerun ends with exactly the clips and contents of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import make_test_video, shard_contents
from pipeline.build import RunStorageError, build
from schemas.config import RunConfig

CFG = {"split": {"mode": "fixed", "window_s": 1.0, "stride_s": 1.0}, "clip": {"num_frames": 4},
       "shard": {"max_samples": 3}, "ray": {"num_cpus": 2}}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-videos")
    for i in range(8):
        make_test_video(folder / f"v{i}.mp4", seconds=3.0, size=f"{256 + 16 * i}x144")
    return folder


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory, ray_local):
    run = tmp_path_factory.mktemp("fault-ref") / "run"
    build(RunConfig.model_validate({**CFG, "input": {"path": str(videos)}}), run, progress=False)
    contents = shard_contents(run)
    assert len(contents) == 24
    return contents


def _driver_script(videos, run, kill_on: str | None) -> str:
    """A build in a subprocess that SIGKILLs itself the moment it is about to publish `kill_on`."""
    return textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import stages.shard as shard
        from pipeline.build import build
        from schemas.config import RunConfig
        kill_on = {kill_on!r}
        real_replace = os.replace
        def replace(src, dst):
            if kill_on and Path(dst).name == kill_on:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        shard.os.replace = replace
        build(RunConfig.model_validate({{**{CFG!r}, "input": {{"path": {str(videos)!r}}}}}), {str(run)!r},
              progress=False)
    """)


def _run_driver(script: str, timeout_s: float = 300) -> int:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s,
                          start_new_session=True)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("kill_on", ["shard-00001.tar", "shard-00002.stats.json", "shard-00001.pairs.parquet"])
def test_driver_killed_mid_shard_write(videos, reference, tmp_path, kill_on):
    run = tmp_path / "run"
    assert _run_driver(_driver_script(videos, run, kill_on)) == -signal.SIGKILL
    visible = {p.name for p in (run / "shards").glob("shard-*.tar")}
    assert f"{kill_on.split('.')[0]}.tar" not in visible  # the part being written never became visible
    assert _run_driver(_driver_script(videos, run, None)) == 0
    assert shard_contents(run) == reference


@pytest.mark.slow
def test_driver_killed_during_probe(videos, reference, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", _driver_script(videos, run, None)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _ffmpeg_processes_on(videos, "ffprobe"):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((run / "shards").glob("shard-*.tar")) if (run / "shards").exists() else True
    assert _run_driver(_driver_script(videos, run, None)) == 0
    assert shard_contents(run) == reference


def _ffmpeg_processes_on(folder, tool: str = "ffmpeg") -> list[psutil.Process]:
    """FFmpeg-family processes reading from `folder` (Ray may reparent its workers, so search them all)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == tool and any(str(folder) in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.slow
def test_ray_worker_killed_mid_run(videos, reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _driver_script(videos, run, None)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = 0
    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        for ffmpeg in _ffmpeg_processes_on(videos):
            try:
                ffmpeg.parent().kill()  # the Ray worker in the middle of this FFmpeg job
                killed += 1
                break
            except (psutil.NoSuchProcess, AttributeError):
                continue
        time.sleep(0.02)
    assert proc.wait(timeout=300) == 0
    assert killed == 1
    assert shard_contents(run) == reference


@pytest.mark.slow
def test_disk_full_stops_cleanly_and_resumes(videos, reference, tmp_path, ray_local):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        cfg = RunConfig.model_validate({**CFG, "input": {"path": str(videos)}})
        with pytest.raises(RunStorageError, match="resume"):
            build(cfg, mount / "run", progress=False)
        partial = shard_contents(mount / "run")
        assert len(partial) < len(reference)
        assert not list((mount / "run" / "shards").glob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        build(cfg, mount / "run", progress=False)
        assert shard_contents(mount / "run") == reference
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
