"""A real 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`), token auth on."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_test_video
from pipeline.stats import connect

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path):
    # One shared token for every process, as in production; never auth disabled.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = Path("/tmp") / f"ray-{secrets.token_hex(3)}"  # short: unix socket paths are length-limited
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                        f"--temp-dir={temp_dir}", '--resources={"head_node": 1}', *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address={address}", "--num-cpus=1", '--resources={"worker_node": 1}',
                        *common], env=env, check=True, capture_output=True, timeout=120)
        yield address, env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.cluster
@pytest.mark.slow
def test_build_runs_across_two_nodes(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    status = subprocess.run([sys.executable, "-c",
                             "import ray, json; ray.init(address='%s'); print(json.dumps(len(ray.nodes())))" % address],
                            env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.strip().splitlines()[-1] == "2", status.stderr
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(6):
        make_test_video(videos / f"v{i}.mp4", seconds=4.0, size="480x360")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--input", str(videos), "--out", str(run),
                           "--address", address, "--no-progress", "--set", "split.mode=fixed",
                           "--set", "split.window_s=2", "--set", "split.stride_s=2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    con = connect(run)
    assert con.execute("SELECT count(*) FROM clips").fetchone()[0] == 12
    nodes = {r[0] for r in con.execute("SELECT DISTINCT node_id FROM videos").fetchall()}
    assert len(nodes) == 2, f"all work ran on one node: {nodes}"
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
