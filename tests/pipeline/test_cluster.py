"""A real 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`), token auth on."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_test_video, shard_contents
from pipeline.stats import connect

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_alive_nodes(address: str, env: dict) -> int:
    probe = subprocess.run([sys.executable, "-c", _COUNT_NODES % address], env=env, capture_output=True, text=True,
                           timeout=120)
    lines = probe.stdout.strip().splitlines()
    return int(lines[-1]) if probe.returncode == 0 and lines else 0


_COUNT_NODES = "import ray; ray.init(address='%s', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"


def _start_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block` in its own process group, so stopping it touches no other Ray on the machine
    (`ray stop` would also kill the test session's own local Ray)."""
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop_node(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):  # a node may take 30 s+ to drain on SIGTERM
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def two_node_cluster(tmp_path):
    # One shared token for every process, as in production; never auth disabled.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           # the nodes' workers import test fault hooks from `tests` (not an installed package)
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = Path("/tmp") / f"ray-{secrets.token_hex(3)}"  # short: unix socket paths are length-limited
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes = []
    try:
        nodes.append(_start_node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                  f"--temp-dir={temp_dir}", '--resources={"head_node": 1, "video_worker": 1}', *common],
                                 env))
        _wait_for_nodes(address, env, 1)
        nodes.append(_start_node([f"--address={address}", "--num-cpus=1",
                                  '--resources={"worker_node": 1, "video_worker": 1}', *common], env))
        _wait_for_nodes(address, env, 2)
        yield address, env
    finally:
        for proc in reversed(nodes):
            _stop_node(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(address: str, env: dict, count: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if _count_alive_nodes(address, env) >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"{count} Ray node(s) did not come up at {address}")


@pytest.mark.cluster
@pytest.mark.slow
def test_build_runs_across_two_nodes(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    assert _count_alive_nodes(address, env) == 2
    intruder = _start_node([f"--address={address}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                            "--disable-usage-stats"], {**env, "RAY_AUTH_TOKEN": "not-the-token"})
    try:
        time.sleep(15)
        assert _count_alive_nodes(address, env) == 2, "a node without the cluster token joined"
    finally:
        _stop_node(intruder)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(6):
        make_test_video(videos / f"v{i}.mp4", seconds=4.0, size="480x360")
    run, flag = tmp_path / "run", tmp_path / "killed.flag"
    # The driver joins the cluster with a fault hook: the first worker about to publish a part's marker dies
    # (its data files are written, the marker is not); Ray retries the batch, which rewrites the same part.
    hook = {"worker_process_setup_hook": "tests.reliability.fault_hooks.kill_once_on_publish",
            "env_vars": {"HICOM_FAULT_FLAG": str(flag), "HICOM_FAULT_SUFFIX": ".stats.json"}}
    driver = (f"import ray, sys; ray.init(address={address!r}, runtime_env={hook!r}, logging_level='ERROR'); "
              "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", driver, "build", "--input", str(videos), "--out", str(run),
                           "--address", address, "--no-progress", "--set", "split.mode=fixed",
                           "--set", "split.window_s=2", "--set", "split.stride_s=2",
                           "--set", "shard.videos_per_part=1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert flag.exists(), "no worker was killed mid-commit"
    assert len(shard_contents(run)) == 12  # every clip once: no duplicate, no gap after the kill
    con = connect(run)
    assert con.execute("SELECT count(*) FROM clips").fetchone()[0] == 12
    writers = {r[0] for r in con.execute("SELECT DISTINCT writer_node_id FROM videos").fetchall()}
    assert len(writers) == 2 and None not in writers, f"parts were not written on both nodes: {writers}"
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
