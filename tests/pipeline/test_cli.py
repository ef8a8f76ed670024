import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, make_test_video
from pipeline.stats import connect

HICOM = [sys.executable, "-m", "pipeline.cli"]


def hicom(*args, check=True):
    proc = subprocess.run([*HICOM, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"hicom {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_documents_every_command():
    out = hicom("--help").stdout
    for command in ("build", "rebuild", "stats", "export-llava", "caption", "train"):
        assert command in out
    assert "--dry-run" in hicom("build", "--help").stdout
    assert "--annotations" in hicom("rebuild", "--help").stdout


def test_build_driver_does_not_import_torch():
    """torch takes ~1.5 s to import; only the workers that embed frames (recipe keyframes, categories) need it."""
    code = ("import sys, pipeline.cli, pipeline.build, pipeline.captioning, pipeline.caption_command; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def release_like(tmp_path_factory):
    """A HICom-248K-shaped release: pre-split clips + LLaVA JSON (multi-turn, bad paths, bad entries)."""
    root = tmp_path_factory.mktemp("release")
    clips = root / "split_videos"
    clips.mkdir()
    make_test_video(clips / "c1.mp4", seconds=2.0)
    make_test_video(clips / "c2.mp4", seconds=1.5, size="256x144")
    (clips / "broken.mp4").write_text("nope")
    q = {"from": "human", "value": "<video>\nWhat is shown?"}
    a = {"from": "gpt", "value": "A colourful test pattern."}
    entries = [
        {"id": "s1", "video": "c1.mp4", "conversations": [q, a]},
        {"id": "s2", "video": "c1.mp4", "conversations": [q, a, {"from": "human", "value": "And then?"}, a]},
        {"id": "s3", "video": "c2.mp4", "conversations": [q, a]},
        {"id": "s4", "video": "broken.mp4", "conversations": [q, a]},
        {"id": "s5", "video": "../../etc/hosts", "conversations": [q, a]},
        {"id": "s6", "video": "missing.mp4", "conversations": [q, a]},
        {"id": "s7", "conversations": [q, a]},
    ]
    (root / "qa.json").write_text(json.dumps(entries))
    return root


def test_rebuild_stats_and_export_llava(release_like, tmp_path):
    run = tmp_path / "run"
    out = hicom("rebuild", "--annotations", str(release_like / "qa.json"), "--video-root",
                str(release_like / "split_videos"), "--out", str(run), "--no-progress",
                "--set", "clip.frames_per_clip=8").stdout
    assert "2 clips" in out
    con = connect(run)
    in_pairs = {r[0] for r in con.execute("SELECT DISTINCT sample_id FROM pairs").fetchall()}
    failed = dict(con.execute("SELECT item_id, reason FROM failures").fetchall())
    assert in_pairs == {"s1", "s2", "s3"}
    assert failed == {"s4": "not_a_video", "s5": "path_escapes_root", "s6": "missing_file", "s7": "bad_annotation"}
    assert con.execute("SELECT count(*) FROM pairs WHERE sample_id = 's2'").fetchone()[0] == 2

    report = hicom("stats", str(run), "--plot", str(tmp_path / "plots")).stdout
    assert "Failures by reason" in report and "path_escapes_root" in report
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4
    sql = hicom("stats", str(run), "--sql", "SELECT count(*) AS n FROM clips").stdout
    assert sql.splitlines()[-1].strip() == "2"
    refused = hicom("stats", str(run), "--sql", f"COPY clips TO '{tmp_path / 'x.csv'}'", check=False)
    assert refused.returncode == 2 and not (tmp_path / "x.csv").exists()
    refused = hicom("stats", str(run), "--sql", f"ATTACH '{tmp_path / 'x.db'}' AS x", check=False)
    assert refused.returncode == 2 and not (tmp_path / "x.db").exists()

    hicom("export-llava", str(run), str(tmp_path / "export" / "train.json"), "--no-progress")
    exported = json.loads((tmp_path / "export" / "train.json").read_text())
    original = {e["id"]: e for e in json.loads((release_like / "qa.json").read_text())}
    assert sorted(e["id"] for e in exported) == ["s1", "s2", "s3"]
    for entry in exported:
        assert entry["conversations"] == original[entry["id"]]["conversations"]
        assert (tmp_path / "export" / "train_clips" / entry["video"]).stat().st_size > 0


def test_dry_run_lists_without_writing(sample_dir, tmp_path):
    proc = hicom("build", "--input", str(sample_dir), "--out", str(tmp_path / "run"), "--dry-run")
    assert "4 videos would be processed" in proc.stdout and "bikes.mp4" in proc.stdout
    assert not (tmp_path / "run").exists()
    # no run directory, so no log file: Ray's start-up notices are dropped, not shown
    assert not [line for line in proc.stderr.splitlines() if any(noise in line for noise in RAY_NOISE)], proc.stderr


def test_bad_config_fails_loudly(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("split:\n  mode: sideways\n")
    proc = hicom("build", str(cfg), "--input", str(tmp_path), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0 and "mode" in proc.stderr


def test_start_errors_are_one_line_exit_2_and_leave_no_run_dir(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_test_video(videos / "a.mp4", seconds=1.0)
    run = tmp_path / "runs" / "x"
    proc = hicom("build", "configs/demo.yaml", "--input", str(videos), "--out", str(run), check=False)
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert proc.returncode == 2 and len(errors) == 1
    assert "input.kind: manifest" in errors[0] and "configs/folder.yaml" in errors[0] and "--set input.kind" in errors[0]
    assert not run.exists()
    proc = hicom("build", "configs/folder.yaml", "--input", str(tmp_path / "missing"), "--out", str(run), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and not (tmp_path / "runs").exists()
    proc = hicom("build", "--input", str(videos), "--out", str(run), "--set", "clip.frames_per_clip", check=False)
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr and not run.exists()
    proc = hicom("export-llava", str(tmp_path / "runs"), str(tmp_path / "out" / "train.json"), check=False)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


def test_folder_run_without_pairs_says_so_in_export_and_plots(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_test_video(videos / "a.mp4", seconds=1.5)
    run = tmp_path / "run"
    hicom("build", "configs/folder.yaml", "--input", str(videos), "--out", str(run), "--no-progress",
          "--set", "clip.frames_per_clip=2")
    proc = hicom("export-llava", str(run), str(tmp_path / "out" / "train.json"), "--no-progress")
    assert json.loads((tmp_path / "out" / "train.json").read_text()) == []
    assert "no instruction/answer pairs" in proc.stderr
    proc = hicom("stats", str(run), "--plot", str(tmp_path / "plots"))
    assert "plot answer_chars: no data" in proc.stderr and (tmp_path / "plots" / "answer_chars.png").stat().st_size


# Lines Ray prints by itself (Python loggers, its C++ core worker, Ray Data's progress) that a build's terminal
# must not show; each went to the run's log once it was routed there.
RAY_NOISE = ("Token authentication", "object store", "core_worker", "Truncating", "deprecated", "Map(",
             "Running Dataset", "ray.data", "ray._private", "logging_progress", "new progress UI")
PROJECT_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) (hicom|pipeline|stages)[.\w]*: "


def test_build_terminal_shows_only_the_projects_lines(tmp_path, stub):
    """A captioned build and `hicom caption` (its Ray Data actor pools make Ray's core worker log an ERROR line)
    with stderr captured (not a TTY): every stderr line is one of the project's log lines; Ray's are in the run's
    log."""
    videos = tmp_path / "videos"
    videos.mkdir()
    make_test_video(videos / "a.mp4", seconds=2.0, size="160x120")
    (tmp_path / "manifest.csv").write_text("path,caption\nvideos/a.mp4,A colourful test pattern with a counter.\n")
    run = tmp_path / "run"
    proc = hicom("build", "configs/demo.yaml", "--input", str(tmp_path / "manifest.csv"), "--out", str(run),
                 "--set", "captioning.embedded_server.enabled=false", "--set", "clip.frames_per_clip=4",
                 "--set", f"captioning.instruct.endpoint.base_url={stub.base_url}")
    lines = proc.stderr.splitlines()
    assert any("hicom.progress: build: inputs 1/1, clips" in line for line in lines)
    caption = hicom("caption", str(run), "--version", "v2")  # the same actor pools, on the run's clips
    for stderr in (proc.stderr, caption.stderr):
        lines = stderr.splitlines()
        assert lines and not [line for line in lines if any(noise in line for noise in RAY_NOISE)], stderr
        assert all(re.match(PROJECT_LINE, line) for line in lines), stderr
    log_text = (run / "logs" / "hicom.log").read_text()
    assert "constructor arguments in the object store" in log_text  # Ray's C++ lines: routed, not lost
    if "RAY_AUTH_MODE" not in os.environ:
        assert log_text.count("Token authentication is enabled") >= 2
