import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_test_video
from stages import clip_decode, scratch
from stages.ffmpeg_tools import FfmpegError, run_tool

REPO = Path(__file__).resolve().parents[2]


def test_a_configured_folder_wins(tmp_path):
    assert scratch.scratch_root(str(tmp_path)) == str(tmp_path)


def test_memory_is_chosen_only_with_room(tmp_path, monkeypatch):
    monkeypatch.setattr(scratch, "MEMORY_DIR", tmp_path)
    monkeypatch.setattr(scratch, "MEMORY_MIN_FREE_BYTES", 1)
    assert scratch.scratch_root(None) == str(tmp_path)
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(scratch, "MEMORY_MIN_FREE_BYTES", free * 2)
    assert scratch.scratch_root(None) == scratch.disk_root()
    monkeypatch.setattr(scratch, "MEMORY_DIR", tmp_path / "missing")
    monkeypatch.setattr(scratch, "MEMORY_MIN_FREE_BYTES", 1)
    assert scratch.scratch_root(None) == scratch.disk_root()


def test_a_full_output_is_told_from_a_bad_input(tmp_path):
    """FFmpeg exits 0 when an output's trailer cannot be written; its stderr still says why."""
    source = make_test_video(tmp_path / "v.mp4", seconds=1.0)
    full = run_tool(["ffmpeg", "-v", "error", "-i", str(source), "-f", "mjpeg", "-y", "/dev/full"], 30)
    assert scratch.out_of_space(full.stderr)
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(FfmpegError) as bad:
        run_tool(["ffmpeg", "-v", "error", "-i", str(tmp_path / "bad.mp4"), "-f", "null", "-"], 30)
    assert not scratch.out_of_space(bad.value.stderr)
    with pytest.raises(FfmpegError, match="ran out of space"):  # the clip stage's runner does not take the 0
        clip_decode._write(["ffmpeg", "-v", "error", "-i", str(source), "-f", "mjpeg", "-y", "/dev/full"], 30)


_CUT_IN_TINY_MEMORY = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from schemas.config import ClipConfig, ProbeConfig
from schemas.records import Span, VideoRecord
from stages import clip_decode, scratch
from stages.clip_decode import clip_and_decode
from stages.probe import probe_video
logging.basicConfig(level=logging.WARNING, format="%(message)s")
scratch.MEMORY_DIR, scratch.MEMORY_MIN_FREE_BYTES = Path(sys.argv[2]), 1
video = probe_video(VideoRecord(id="v", source=sys.argv[3], relpath="v.mp4"), ProbeConfig())
samples, failures = clip_and_decode(video, [Span(start_s=0.0, end_s=1.0), Span(start_s=1.0, end_s=2.0)], ClipConfig())
print(json.dumps({"frames": [len(s.frames) for s in samples], "failures": [f.reason for f in failures]}))
"""


def test_a_batch_that_fills_memory_is_cut_again_on_disk(tmp_path):
    """A real 64 KiB tmpfs (mounted in a user namespace) as the memory folder: FFmpeg fills it, and the batch
    is cut again in the temp folder with nothing lost."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine cannot mount a tmpfs in a user namespace (unshare -rm)")
    source = make_test_video(tmp_path / "v.mp4", seconds=2.0)
    script = (f"mount -t tmpfs -o size=64k tmpfs {tiny} && exec {sys.executable} -c \"$0\" {REPO} {tiny} {source}")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script, _CUT_IN_TINY_MEMORY], capture_output=True,
                         text=True, env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"{tiny} is full: cutting v.mp4's batch again in {tmp_path}" in out.stderr
    assert json.loads(out.stdout) == {"frames": [32, 32], "failures": []}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("hicom-clip-")] == []


def test_only_stale_batch_folders_are_swept(tmp_path):
    old, fresh, other = (tmp_path / name for name in ("hicom-clip-old", "hicom-clip-fresh", "keep-me"))
    for folder in (old, fresh, other):
        folder.mkdir()
        (folder / "0_001.jpg").write_bytes(b"x")
    (tmp_path / "hicom-clip-file").write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in (old, other, tmp_path / "hicom-clip-file"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert scratch.sweep_stale(str(tmp_path), older_than_s=600) == ["hicom-clip-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hicom-clip-file", "hicom-clip-fresh", "keep-me"]
    assert scratch.sweep_stale(str(tmp_path / "missing"), older_than_s=600) == []
