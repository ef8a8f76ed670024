"""A local build's Ray talks to nothing but 127.0.0.1: no dashboard, no usage stats, no metadata look-ups."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

LOCAL = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
SCRIPT = textwrap.dedent("""
    import sys, time, ray
    from stages.ray_runtime import init_ray
    init_ray(None, 1)
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    print("ready", flush=True)
    time.sleep(120)
""")


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.slow
def test_local_ray_listens_and_connects_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        seen, outside = set(), []
        for _ in range(10):  # agents finish starting in the seconds after init
            for p in _tree(proc.pid):
                try:
                    connections = p.net_connections(kind="inet")
                    name = p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                for c in connections:
                    seen.add(name)
                    if c.laddr and c.laddr.ip not in LOCAL:
                        outside.append((name, "listens/binds", c.laddr))
                    if c.raddr and c.raddr.ip not in LOCAL:
                        outside.append((name, "connects to", c.raddr))
            time.sleep(1)
        assert {"gcs_server", "raylet"} <= seen, seen
        assert not outside, outside
        names = {p.name() for p in _tree(proc.pid) if p.is_running()}
        assert not any("dashboard" in n and "agent" not in n for n in names), names
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
