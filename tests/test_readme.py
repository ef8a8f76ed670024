"""Every command the README prints runs as printed: the README is this test's input, so the two cannot drift.

The fenced ```bash blocks are parsed line by line. Each command runs verbatim through bash in a scratch
directory that holds what the README's names refer to: `configs/` (the repo's), a folder of generated videos
for VIDEOS_DIR, a captioned `manifest.csv`, and a small stand-in for the HICom-248K release
(`248328_qa_llavaformat.json` + `split_videos/`). `hicom` is this checkout's CLI. What a test cannot have is
recognised by name below and either runs on a stand-in (the embedded LLM -> a local stub server) or is
skipped with its reason; an unrecognised command always runs.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from conftest import REPO, SUMMARY_LINES, make_test_video

PLACEHOLDERS = {"VIDEOS_DIR": "videos"}  # documented placeholders -> generated inputs in the scratch dir
# Commands a test cannot run, by what they need; each is listed in the test summary, never dropped silently.
SKIPPED = {
    "make demo": "the full demo (setup, the embedded 270M LLM, minutes); its steps are the Commands lines",
    "make test": "runs this test itself",
    "configs/train-7b.yaml": "needs SigLIP + Qwen2.5-7B checkpoints and a Ray cluster (--address auto)",
    "AWS_ENDPOINT_URL": "the user's S3 endpoint and credentials",
    "s3://": "an S3 endpoint; tests/pipeline/test_object_storage.py runs these on a moto server on 127.0.0.1",
    "configs/hicom248k.yaml": "a SigLIP checkpoint and a VLM server; tests/pipeline/test_recipe_build.py runs it "
                              "with a tiny random SigLIP and the stub VLM",
    "runs/ext": "the stats of that recipe run (tests/pipeline/test_recipe_build.py runs stats --compare)",
}
USES_EMBEDDED_LLM = "configs/demo.yaml"  # stand-in: the stub OpenAI server instead of the llama.cpp one


def readme_commands() -> list[str]:
    """Each command line of every ```bash block, exactly as printed (bash skips the trailing comments)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a continued line is one command
            if shlex.split(line, comments=True):
                commands.append(line.strip())
    return commands


def _inputs(cwd) -> None:
    """What the README's names point at, small: 2 videos, a captioned manifest, a 2-clip release."""
    (cwd / "configs").symlink_to(REPO / "configs")
    videos = cwd / "videos"
    videos.mkdir()
    make_test_video(videos / "a.mp4", seconds=2.5, size="160x120")
    make_test_video(videos / "b.mp4", seconds=2.0, size="128x96")
    with open(cwd / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerow(["videos/a.mp4", "A colourful test pattern with a moving gradient and a counter."])
        writer.writerow(["videos/b.mp4", "A smaller colourful test pattern with bars and a ticking clock."])
    clips = cwd / "split_videos"
    clips.mkdir()
    make_test_video(clips / "c1.mp4", seconds=1.5, size="160x120")
    q = [{"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": "A test pattern."}]
    (cwd / "248328_qa_llavaformat.json").write_text(json.dumps([{"id": "s1", "video": "c1.mp4", "conversations": q}]))


def _stand_in(command: str, stub_url: str) -> str:
    """The command with what the test cannot have replaced; unchanged when it needs nothing."""
    if USES_EMBEDDED_LLM in command:  # the extra options go before the README's trailing comment
        command = (command.partition("  #")[0] + " --set captioning.embedded_server.enabled=false"
                   f" --set captioning.instruct.endpoint.base_url={stub_url}")
    for name, value in PLACEHOLDERS.items():
        command = command.replace(name, value)
    return command


@pytest.mark.slow
def test_every_readme_command_runs_as_printed(tmp_path, stub):
    commands = readme_commands()
    assert any("configs/folder.yaml --input VIDEOS_DIR" in c for c in commands)
    _inputs(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hicom").write_text(f'#!/bin/sh\nexec {sys.executable} -m pipeline.cli "$@"\n')
    (bin_dir / "hicom").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    ran, skipped = [], []
    for command in commands:
        reason = next((why for key, why in SKIPPED.items() if key in command), None)
        if reason:
            skipped.append(f"{command.partition('  #')[0].rstrip()}  ({reason})")
            continue
        started = time.monotonic()
        proc = subprocess.run(["bash", "-c", _stand_in(command, stub.base_url)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{proc.stderr[-3000:]}"
        ran.append(f"{time.monotonic() - started:5.1f}s  {command.partition('  #')[0].rstrip()}")
    SUMMARY_LINES.append(f"README commands: {len(ran)} ran as printed, {len(skipped)} skipped by name:")
    SUMMARY_LINES.extend(f"  ran {line}" for line in ran)
    SUMMARY_LINES.extend(f"  skipped: {line}" for line in skipped)
    assert {key for key in SKIPPED if any(key in c for c in commands)} == set(SKIPPED)  # each still in the README
    assert (tmp_path / "out" / "train.json").exists() and (tmp_path / "runs" / "m-train").is_dir()
    assert json.loads((tmp_path / "out" / "train.json").read_text())  # the demo config's run has pairs


def test_readme_parser_sees_every_block():
    commands = readme_commands()
    assert commands[0].startswith("make demo") and any(c.startswith("hicom rebuild") for c in commands)
    assert all(not c.startswith("#") for c in commands)
