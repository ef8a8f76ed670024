"""`hicom build --input s3://bucket/videos/ --out s3://bucket/run` end to end against a real S3 server
(moto on 127.0.0.1), then `hicom stats` and `hicom export-llava` on that run; credentials appear nowhere."""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import make_test_video
from stages.storage import Storage
from tests.s3_server import ACCESS_KEY, SECRET_KEY, moto_endpoint, s3_bucket, s3_env  # noqa: F401

HICOM = [sys.executable, "-m", "pipeline.cli"]
REPO = str(Path(__file__).resolve().parents[2])


def hicom(env, cwd, *args):
    proc = subprocess.run([*HICOM, *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(f"hicom {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_build_stats_and_export_on_object_storage(s3_bucket, moto_endpoint, tmp_path, request):
    local = tmp_path / "local"
    local.mkdir()
    make_test_video(local / "a.mp4", seconds=2.5)
    make_test_video(local / "b.mp4", seconds=2.0, size="256x144")
    (local / "broken.mp4").write_text("not a video")
    videos = Storage.from_uri(f"s3://{s3_bucket}/videos")
    for name in ("a.mp4", "sub/b.mp4", "broken.mp4"):
        videos.write_bytes(name, (local / name.split("/")[-1]).read_bytes())
    # the workers' temp folder (short: Ray puts its sockets there too): fetched sources must be gone afterwards
    scratch = Path(tempfile.mkdtemp(prefix="hs3-"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    work = tmp_path / "cwd"  # where the commands run: nothing may land here (an s3:// path taken as local)
    work.mkdir()
    env = {**s3_env(moto_endpoint), "TMPDIR": str(scratch), "RAY_AUTH_MODE": "disabled", "PYTHONPATH": REPO}
    run_uri = f"s3://{s3_bucket}/run"
    args = ["build", "--input", f"s3://{s3_bucket}/videos/", "--out", run_uri, "--no-progress",
            "--set", "split.mode=fixed", "--set", "split.window_s=1.0", "--set", "split.stride_s=1.0",
            "--set", "clip.frames_per_clip=2", "--set", "ray.num_cpus=2"]
    first = hicom(env, work, *args)
    again = hicom(env, work, *args)  # a rerun skips every committed video: no duplicates

    assert "3 videos processed (0 already committed)" in first.stdout, first.stdout
    assert "0 videos processed (3 already committed)" in again.stdout, again.stdout
    run = Storage.from_uri(run_uri)
    stats = hicom(env, work, "stats", run_uri, "--sql", "SELECT (SELECT count(*) FROM clips) AS clips, "
                  "(SELECT count(DISTINCT clip_id) FROM clips) AS distinct_clips, "
                  "(SELECT count(*) FROM videos WHERE status = 'ok' AND length(sha256) = 64) AS hashed_ok, "
                  "(SELECT string_agg(reason, ',') FROM failures) AS reasons").stdout
    clips, distinct, hashed_ok, reasons = stats.splitlines()[-1].split()
    assert int(clips) == int(distinct) >= 4 and int(hashed_ok) == 2, stats
    assert "not_a_video" in reasons
    export = json.loads(hicom(env, work, "export-llava", run_uri, str(tmp_path / "export" / "train.json"),
                              "--no-progress").stdout)
    assert export["clips"] == int(clips)

    assert [p.name for p in work.iterdir()] == []
    leftovers = [p for p in scratch.rglob("*") if p.name.startswith(("hicom-source-", "hicom-upload-"))]
    assert leftovers == []
    seen = [first.stdout, first.stderr, again.stdout, again.stderr, stats]
    seen += [run.read_bytes(rel).decode("latin-1") for rel in run.list("", recursive=True)
             if not rel.endswith(".tar")]
    assert not any(SECRET_KEY in text or ACCESS_KEY in text for text in seen)
