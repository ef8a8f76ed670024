"""A local build's Ray reaches nothing outside this machine: no usage stats, no cloud metadata look-ups, no DNS.

Known gap (measured by this test's first version): Ray 2.60's GCS and raylet still *listen* on all interfaces
(`::`) and talk to each other over the host's own address, whatever `_node_ip_address` says; so the check is
that every connection stays on this machine, not that every socket is bound to 127.0.0.1.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

def own_addresses() -> set[str]:
    ips = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return ips | {f"::ffff:{ip}" for ip in ips} | {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
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
def test_local_ray_connects_to_nothing_outside_this_machine(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=stderr,
                            text=True, env=env, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready", (tmp_path / "stderr.txt").read_text()[-3000:]
        seen, outside, local = set(), [], own_addresses()
        for _ in range(10):  # agents finish starting in the seconds after init
            for p in _tree(proc.pid):
                try:
                    connections = p.net_connections(kind="inet")
                    name = p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                for c in connections:
                    seen.add(name)
                    if c.raddr and c.raddr.ip not in local:
                        outside.append((name, "connects to", c.raddr))
            time.sleep(1)
        assert {"gcs_server", "raylet"} <= seen, seen
        assert not outside, outside
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_joining_the_running_ray_without_a_log_file_keeps_the_runs_log(ray_local, tmp_path):
    """Captioning's set-up calls init_ray without a log file while a build runs: Ray's lines must still reach
    the run's log (they went nowhere once captioning started, and its warnings to the terminal)."""
    import logging

    from stages.ray_runtime import init_ray

    log_file = tmp_path / "logs" / "hicom.log"
    init_ray(None, 2, log_file)  # the build
    init_ray(None, 2)  # captioning joins the same Ray
    logging.getLogger("ray.data").info("a line from Ray Data")
    assert "a line from Ray Data" in log_file.read_text()
