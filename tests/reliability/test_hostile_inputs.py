"""Hostile inputs: the run completes, every input is recorded once with its reason, nothing outside the roots
is read, and no FFmpeg process outlives the run."""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from conftest import SUMMARY_LINES
from hostile import OK, make_cases
from pipeline.build import build
from pipeline.stats import connect
from schemas import reasons
from schemas.config import RunConfig


def _summary(what: str, tried: int, recorded: int, lost: int, duplicated: int) -> str:
    line = (f"reliability ({what}): inputs tried {tried}, recorded with a reason {recorded}, lost {lost}, "
            f"duplicated {duplicated}")
    SUMMARY_LINES.append(line)
    return line


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, make_cases(root / "inputs", root / "outside")


def test_hostile_files_each_recorded_once_with_their_reason(hostile, ray_local):
    root, cases = hostile
    cfg = RunConfig.model_validate({"input": {"path": str(root / "inputs")}, "probe": {"timeout_s": 30},
                                    "clip": {"frames_per_clip": 4, "timeout_s": 60}})
    build(cfg, root / "run", progress=False)
    con = connect(root / "run")
    # Every row, not dicts: an input recorded twice must show up as duplicated.
    video_rows = con.execute("SELECT source, status FROM videos").fetchall()
    ingest_rows = con.execute("SELECT source, reason FROM failures WHERE stage = 'ingest'").fetchall()
    video_failure_rows = con.execute(
        "SELECT v.source, f.reason FROM failures f JOIN videos v USING (video_id) WHERE f.item_id = v.video_id"
    ).fetchall()
    records = Counter([s for s, _ in video_rows] + [s for s, _ in ingest_rows])
    failure_records = Counter(s for s, _ in video_failure_rows)
    outcome = {s: OK for s, status in video_rows if status == "ok"}
    outcome.update({s: r for s, r in video_failure_rows + ingest_rows})
    got = {c.name: outcome.get(c.name, "LOST") for c in cases}
    assert got == {c.name: c.expected for c in cases}
    lost = sum(1 for c in cases if records[c.name] == 0)
    # one videos-or-ingest row per input, and at most one video-level failure row per video
    duplicated = sum(n - 1 for n in records.values() if n > 1) + sum(n - 1 for n in failure_records.values() if n > 1)
    _summary("hostile files", len(cases), sum(1 for v in got.values() if v != OK), lost, duplicated)
    assert lost == 0 and duplicated == 0
    leftover = subprocess.run(["pgrep", "-f", str(root / "inputs")], capture_output=True, text=True).stdout
    assert leftover == "", f"FFmpeg processes outlived the run: {leftover}"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_no_file_outside_the_roots_is_opened(hostile, tmp_path):
    """A whole build of the hostile folder (symlinks included) through the CLI: the driver (ingest, hashing)
    and every FFmpeg/ffprobe it or a Ray worker starts (probe, split, clip+decode) run under strace."""
    root, _ = hostile
    log_dir = tmp_path / "strace"
    log_dir.mkdir()
    env = dict(os.environ)
    for tool in ("ffmpeg", "ffprobe"):
        wrapper = tmp_path / f"{tool}-traced"
        wrapper.write_text(f'#!/bin/sh\nexec strace -f -qq -e trace=open,openat,openat2 -o "{log_dir}/$$.log" '
                           f'{shutil.which(tool)} "$@"\n')
        wrapper.chmod(0o755)
        env[f"{tool.upper()}_BINARY"] = str(wrapper)
    run = tmp_path / "run"
    proc = subprocess.run(["strace", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log_dir / "driver.log"),
                           sys.executable, "-m", "pipeline.cli", "build", "--input", str(root / "inputs"), "--out",
                           str(run), "--no-progress", "--set", "clip.frames_per_clip=4"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    traced = sorted(p.name for p in log_dir.glob("*.log"))
    opened = "".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))
    assert "driver.log" in traced and len(traced) > 20, traced  # ffprobe x2 per video + ffmpeg split/clip
    assert str(root / "inputs" / "base.mp4") in opened and "hicom-clip-" in opened  # probe ... clip+decode
    assert str(root / "outside") not in opened


def test_hostile_annotations(tmp_path, ray_local):
    clips = tmp_path / "split_videos"
    clips.mkdir()
    from conftest import make_test_video

    make_test_video(clips / "ok.mp4", seconds=1.5)
    (tmp_path / "outside.mp4").write_bytes((clips / "ok.mp4").read_bytes())
    q = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A pattern."}]
    lines = [
        json.dumps({"id": "good", "video": "ok.mp4", "conversations": q}),
        json.dumps({"id": "rel", "video": "../outside.mp4", "conversations": q}),
        json.dumps({"id": "abs", "video": str(tmp_path / "outside.mp4"), "conversations": q}),
        json.dumps({"id": "nofield", "conversations": q}),
        json.dumps({"id": "badconv", "video": "ok.mp4", "conversations": "hi"}),
        "{this is not json",
        json.dumps({"id": "url", "video": "http://127.0.0.1:9/v.mp4", "conversations": q}),
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    cfg = RunConfig.model_validate({"input": {"path": str(tmp_path / "qa.jsonl"), "kind": "llava",
                                              "data_root": str(clips)}, "split": {"mode": "given"},
                                    "clip": {"frames_per_clip": 2}})
    build(cfg, tmp_path / "run", progress=False)
    con = connect(tmp_path / "run")
    failures = dict(con.execute("SELECT item_id, reason FROM failures").fetchall())
    assert failures == {"rel": reasons.PATH_ESCAPES_ROOT, "abs": reasons.ABSOLUTE_PATH,
                        "nofield": reasons.BAD_ANNOTATION, "badconv": reasons.BAD_ANNOTATION,
                        "qa.jsonl:6": reasons.BAD_ANNOTATION, "url": reasons.UNSUPPORTED_URL}
    assert [r[0] for r in con.execute("SELECT sample_id FROM pairs").fetchall()] == ["good"]
    inputs = ["good", "rel", "abs", "nofield", "badconv", "qa.jsonl:6", "url"]
    records = Counter([i for (i,) in con.execute("SELECT item_id FROM failures").fetchall()]
                      + [i for (i,) in con.execute("SELECT DISTINCT sample_id FROM pairs").fetchall()])
    lost = sum(1 for i in inputs if records[i] == 0)
    duplicated = sum(n - 1 for n in records.values() if n > 1)
    _summary("hostile annotations", len(lines), len(failures), lost, duplicated)
    assert lost == 0 and duplicated == 0 and sum(records.values()) == len(lines)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    from stages.ingest import PathResolver

    (tmp_path / "locked.mp4").write_bytes(b"x")
    (tmp_path / "locked.mp4").chmod(0)
    assert PathResolver(tmp_path).resolve("locked.mp4")[1] == reasons.UNREADABLE
