"""Memory: the driver streams (one open shard on disk, index rows in memory), so 10x more input keeps RSS flat."""
import subprocess
import sys
import textwrap

import pytest

from conftest import SUMMARY_LINES, make_test_video

BUILD = textwrap.dedent("""
    import resource, sys
    from pipeline.build import build
    from schemas.config import RunConfig
    cfg = RunConfig.model_validate({"input": {"path": sys.argv[1]}, "ray": {"num_cpus": 2},
                                    "split": {"mode": "fixed", "window_s": 1, "stride_s": 1}})
    report = build(cfg, sys.argv[2], progress=False)
    print(report.counts["clips"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def _peak_rss_mb(inputs, run) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", BUILD, str(inputs), str(run)], capture_output=True, text=True,
                         check=True, timeout=600).stdout.split()
    return int(out[-2]), int(out[-1])


@pytest.mark.slow
def test_driver_rss_stays_flat_on_10x_input(tmp_path):
    source = make_test_video(tmp_path / "src.mp4", seconds=3.0, size="320x240")
    sizes = {}
    for count in (4, 40):
        inputs = tmp_path / f"in{count}"
        inputs.mkdir()
        for i in range(count):
            (inputs / f"v{i:02d}.mp4").hardlink_to(source)
        sizes[count] = _peak_rss_mb(inputs, tmp_path / f"run{count}")
    (clips_small, rss_small), (clips_large, rss_large) = sizes[4], sizes[40]
    SUMMARY_LINES.append(f"memory: driver peak RSS {rss_small} MiB for {clips_small} clips, "
                         f"{rss_large} MiB for {clips_large} clips")
    assert clips_large == 10 * clips_small == 120
    # 120 clips of 32 frames at 384 px are ~60 MiB of JPEG: holding them would show; streaming does not
    assert rss_large - rss_small < 40
