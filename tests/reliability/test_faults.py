"""Faults: a killed driver (during probe, mid-compaction), a Ray worker killed mid-FFmpeg and mid-commit, a
full disk. Each time the rerun ends with exactly the clips and contents of an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import REPO, make_test_video, shard_contents
from pipeline.build import RunStorageError, build
from pipeline.resume import committed_parts
from schemas.config import RunConfig

# clips_per_task 3: the 9 s video fans out into 3 clip batches, so every fault also hits a fanned-out video
CFG = {"split": {"mode": "fixed", "window_s": 1.0, "stride_s": 1.0}, "clip": {"frames_per_clip": 4, "clips_per_task": 3},
       "shard": {"max_samples": 3, "videos_per_part": 2}, "ray": {"num_cpus": 2}}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-videos")
    for i in range(8):
        make_test_video(folder / f"v{i}.mp4", seconds=3.0, size=f"{256 + 16 * i}x144")
    make_test_video(folder / "long.mp4", seconds=9.0, size="320x176")
    return folder


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory, ray_local):
    run = tmp_path_factory.mktemp("fault-ref") / "run"
    build(RunConfig.model_validate({**CFG, "input": {"path": str(videos)}}), run, progress=False)
    contents = shard_contents(run)
    assert len(contents) == 24 + 9
    return contents


@pytest.fixture(scope="module")
def uncompacted(videos, tmp_path_factory, ray_local):
    """A run whose workers committed their parts and that was not compacted yet."""
    run = tmp_path_factory.mktemp("fault-parts") / "run"
    cfg = {**CFG, "shard": {**CFG["shard"], "compact": False}}
    build(RunConfig.model_validate({**cfg, "input": {"path": str(videos)}}), run, progress=False)
    assert all(m.shard.startswith("part-") for m in committed_parts(run))
    return run


def _driver_script(videos, run, runtime_env: dict | None = None) -> str:
    """A build in a subprocess; `runtime_env` (fault hooks) is given to its local Ray."""
    return textwrap.dedent(f"""
        import ray
        from pipeline.build import build
        from schemas.config import RunConfig
        from stages.ray_runtime import VIDEO_WORKER
        if {runtime_env!r}:
            ray.init(address="local", num_cpus=2, include_dashboard=False, resources={{VIDEO_WORKER: 2}},
                     runtime_env={runtime_env!r})
        build(RunConfig.model_validate({{**{CFG!r}, "input": {{"path": {str(videos)!r}}}}}), {str(run)!r},
              progress=False)
    """)


def _compact_script(run, kill_on: str | None) -> str:
    """`compact` in a subprocess that SIGKILLs itself the moment it is about to publish `kill_on`."""
    return textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from pipeline.compact import compact
        from schemas.config import ShardConfig
        real_replace = os.replace
        def replace(src, dst):
            if Path(dst).name == {kill_on!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        os.replace = replace
        compact({str(run)!r}, ShardConfig(max_samples=3))
    """)


def _run(script: str, timeout_s: float = 300) -> int:
    # Ray workers import the fault hooks from `tests`, which is not an installed package: they inherit this path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s,
                          start_new_session=True, env=env)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("kill_on", ["shard-00001.tar", "shard-00002.stats.json", "shard-00001.pairs.parquet"])
def test_driver_killed_mid_compaction(uncompacted, reference, tmp_path, kill_on):
    run = tmp_path / "run"
    shutil.copytree(uncompacted, run)
    assert _run(_compact_script(run, kill_on)) == -signal.SIGKILL
    assert kill_on.split(".")[0] not in {m.shard for m in committed_parts(run)}  # not visible half-written
    assert shard_contents(run) == reference  # readers see every clip once, even now
    assert _run(_compact_script(run, None)) == 0
    assert shard_contents(run) == reference
    assert all(m.shard.startswith("shard-") for m in committed_parts(run))


def _wait_for(predicate, timeout_s: float):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    return None


@pytest.mark.slow
def test_driver_killed_during_probe(videos, reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _driver_script(videos, run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen = _wait_for(lambda: _ffmpeg_processes_on(videos, "ffprobe"), 180)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen, "no ffprobe ran before the deadline: the driver was not killed during probe"
    assert not committed_parts(run) or len(shard_contents(run)) < len(reference)
    assert _run(_driver_script(videos, run)) == 0
    assert shard_contents(run) == reference


def _ffmpeg_processes_on(folder, tool: str = "ffmpeg") -> list[psutil.Process]:
    """FFmpeg-family processes reading from `folder` (Ray may reparent its workers, so search them all)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == tool and any(str(folder) in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.slow
def test_ray_worker_killed_mid_ffmpeg(videos, reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _driver_script(videos, run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = 0
    deadline = time.time() + 180
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
@pytest.mark.parametrize("suffix", [".tar", ".stats.json"])
def test_ray_worker_killed_while_committing_a_part(videos, reference, tmp_path, suffix):
    """The worker dies with some of its part's files written; Ray retries the batch under the same part name."""
    run, flag = tmp_path / "run", tmp_path / "killed.flag"
    env = {"worker_process_setup_hook": "tests.reliability.fault_hooks.kill_once_on_publish",
           "env_vars": {"HICOM_FAULT_FLAG": str(flag), "HICOM_FAULT_SUFFIX": suffix}}
    assert _run(_driver_script(videos, run, env)) == 0
    assert flag.exists(), "no worker was killed"
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
        partial = shard_contents(mount / "run")  # committed parts only: a writer's temp file is never one
        assert len(partial) < len(reference)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        build(cfg, mount / "run", progress=False)
        assert shard_contents(mount / "run") == reference
        # Two commits run at once, so the stop can cancel a writer mid-file: its temp file is removed on resume.
        assert not list((mount / "run").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
