"""Hostile inputs: the run completes, every input is recorded once with its reason, nothing outside the roots
is read, and no FFmpeg process outlives the run."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import SUMMARY_LINES
from hostile import OK, make_cases
from pipeline.build import build
from pipeline.stats import connect
from schemas import reasons
from schemas.config import ProbeConfig, RunConfig, SplitConfig
from schemas.records import VideoRecord, VideoResult
from stages import probe, split
from stages.ingest import video_id_for


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
                                    "clip": {"num_frames": 4, "timeout_s": 60}})
    build(cfg, root / "run", progress=False)
    con = connect(root / "run")
    videos = dict(con.execute("SELECT source, status FROM videos").fetchall())
    video_failures = dict(con.execute(
        "SELECT v.source, f.reason FROM failures f JOIN videos v USING (video_id) WHERE f.item_id = v.video_id"
    ).fetchall())
    ingest_failures = {f: r for f, r in con.execute(
        "SELECT source, reason FROM failures WHERE stage = 'ingest'").fetchall()}
    got = {}
    for case in cases:
        if case.name in ingest_failures:
            got[case.name] = ingest_failures[case.name]
        elif videos.get(case.name) == "ok":
            got[case.name] = OK
        else:
            got[case.name] = video_failures.get(case.name, "LOST")
    assert got == {c.name: c.expected for c in cases}
    sources = [s for (s,) in con.execute("SELECT source FROM videos").fetchall()] + list(ingest_failures)
    duplicated = len(sources) - len(set(sources))
    lost = sum(1 for v in got.values() if v == "LOST")
    _summary("hostile files", len(cases), sum(1 for v in got.values() if v != OK), lost, duplicated)
    assert lost == 0 and duplicated == 0
    leftover = subprocess.run(["pgrep", "-f", str(root / "inputs")], capture_output=True, text=True).stdout
    assert leftover == "", f"FFmpeg processes outlived the run: {leftover}"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_no_file_outside_the_roots_is_opened(hostile, tmp_path, monkeypatch):
    """Run probe + split on every hostile input under strace and look for the outside file."""
    root, cases = hostile
    log_dir = tmp_path / "strace"
    log_dir.mkdir()
    for tool in ("ffmpeg", "ffprobe"):
        wrapper = tmp_path / f"{tool}-traced"
        wrapper.write_text(f'#!/bin/sh\nexec strace -f -qq -e trace=open,openat -o "{log_dir}/$$.log" '
                           f'{shutil.which(tool)} "$@"\n')
        wrapper.chmod(0o755)
        monkeypatch.setenv(f"{tool.upper()}_BINARY", str(wrapper))
    for case in cases:
        if not case.path.is_file() or case.path.is_symlink():
            continue
        result = VideoResult(video_id=video_id_for(case.name), video=VideoRecord(
            id=video_id_for(case.name), source=str(case.path), relpath=case.name))
        result = probe.apply(result, ProbeConfig())
        if not result.failed:
            split.apply(result, SplitConfig())
    opened = "".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))
    assert opened, "strace logged nothing"
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
                                    "clip": {"num_frames": 2}})
    build(cfg, tmp_path / "run", progress=False)
    con = connect(tmp_path / "run")
    failures = dict(con.execute("SELECT item_id, reason FROM failures").fetchall())
    assert failures == {"rel": reasons.PATH_ESCAPES_ROOT, "abs": reasons.ABSOLUTE_PATH,
                        "nofield": reasons.BAD_ANNOTATION, "badconv": reasons.BAD_ANNOTATION,
                        "qa.jsonl:6": reasons.BAD_ANNOTATION, "url": reasons.UNSUPPORTED_URL}
    assert [r[0] for r in con.execute("SELECT sample_id FROM pairs").fetchall()] == ["good"]
    _summary("hostile annotations", len(lines), len(failures), len(lines) - len(failures) - 1, 0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    from stages.ingest import PathResolver

    (tmp_path / "locked.mp4").write_bytes(b"x")
    (tmp_path / "locked.mp4").chmod(0)
    assert PathResolver(tmp_path).resolve("locked.mp4")[1] == reasons.UNREADABLE
