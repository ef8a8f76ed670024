"""Captioning faults: the endpoint going away, the driver killed mid-captioning, and an API key that must
never reach logs, manifests, shards, indexes or the cache."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from conftest import make_test_video, shard_contents
from pipeline.build import build
from pipeline.captioning import cache_dir
from schemas.config import RunConfig
from stages.llm.cache import ResponseCache
from tests.stub_openai import StubOpenAI, pairs_responder

CAPTIONS = ["A man in a blue coat walks a brown dog through a green park.",
            "A red car drives along a coastal road at sunset.",
            "A chef chops onions and carrots on a wooden board in a kitchen.",
            "Two children build a sandcastle on a sunny beach while waves roll in.",
            "A woman paints a yellow boat on a quiet harbour.",
            "An old man feeds pigeons in a city square."]
SECRET = "sk-test-DO-NOT-LEAK-0123456789abcdef"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caption-videos")
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        for i, caption in enumerate(CAPTIONS):
            make_test_video(folder / f"v{i}.mp4", seconds=2.0, size=f"{160 + 16 * i}x120")
            writer.writerow([f"v{i}.mp4", caption])
    return folder / "manifest.csv"


def config(manifest, stub, key_env: str | None = None) -> dict:
    return {"input": {"path": str(manifest)}, "split": {"mode": "fixed", "window_s": 1, "stride_s": 1},
            "clip": {"frames_per_clip": 2}, "shard": {"max_samples": 2}, "ray": {"num_cpus": 2},
            "captioning": {"instruct": {"pairs_per_clip": 2, "endpoint": {
                "base_url": stub.base_url, "model": "stub-llm", "api_key_env": key_env, "timeout_s": 5,
                "max_retries": 2, "backoff_base_s": 0.01, "max_concurrency": 2}},
                "filter": {"drop_duplicate_clips": False},
                "actors": {"llm_actors": 1, "llm_actor_cpus": 0.25, "filter_actors": 1, "filter_actor_cpus": 0.25}}}


def all_pairs(run_dir) -> list[tuple]:
    from pipeline.stats import connect

    return sorted(connect(run_dir).execute("SELECT sample_id, instruction, answer FROM pairs").fetchall())


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory, ray_local):
    run = tmp_path_factory.mktemp("caption-ref") / "run"
    with StubOpenAI(pairs_responder) as stub:
        report = build(RunConfig.model_validate(config(manifest, stub)), run, progress=False)
    assert not report.deferred and report.counts["pairs"] > len(CAPTIONS) * 2
    return shard_contents(run), all_pairs(run)


def test_endpoint_away_defers_videos_and_a_rerun_finishes_them(manifest, reference, tmp_path, ray_local):
    run = tmp_path / "run"
    with StubOpenAI(pairs_responder) as stub:
        cfg = RunConfig.model_validate(config(manifest, stub))
        stub.mode = "500"
        away = build(cfg, run, progress=False)
        assert len(away.deferred) == len(CAPTIONS) and away.counts["clips"] == 0
        assert json.loads((run / "manifest.json").read_text())["status"] == "incomplete"
        stub.mode = "ok"
        back = build(cfg, run, progress=False)
        assert not back.deferred and back.processed_videos == len(CAPTIONS)
        # bounded: 1 + 2 retries per distinct request; the clips of a video share its caption, hence one each
        assert stub.statuses[500] == 3 * len(CAPTIONS)
    assert shard_contents(run) == reference[0] and all_pairs(run) == reference[1]


DRIVER = textwrap.dedent("""
    import json, sys
    from pipeline.build import build
    from schemas.config import RunConfig
    build(RunConfig.model_validate(json.loads(sys.argv[1])), sys.argv[2], progress=False)
""")


@pytest.mark.slow
def test_killed_during_captioning_resumes_without_repaying(manifest, reference, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "HICOM_TEST_KEY": SECRET}
    with StubOpenAI(pairs_responder, latency_s=0.4) as stub:
        settings = config(manifest, stub, "HICOM_TEST_KEY")
        cmd = [sys.executable, "-c", DRIVER, json.dumps(settings), str(run)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and stub.statuses[200] < 4:
            assert proc.poll() is None, "the build finished before it could be killed"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        asked_before = Counter(stub.counts)
        cached = len(ResponseCache(cache_dir(RunConfig.model_validate(settings).captioning, run)))
        # asked but not cached: cut off by the kill, in flight or answered and not yet written; at most the
        # client's concurrency (one actor, max_concurrency 2)
        uncached = len(asked_before) - cached
        assert 0 <= uncached <= 2
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
        repeated = [key for key, n in stub.counts.items() if n > 1 and asked_before[key] > 0]
        # only those may be sent again; a cached answer never is
        assert len(repeated) <= uncached
        before_third = stub.total
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
        assert stub.total == before_third  # everything committed: zero requests
    assert shard_contents(run) == reference[0] and all_pairs(run) == reference[1]


def test_api_key_never_written(manifest, tmp_path):
    run = tmp_path / "run"
    with StubOpenAI(pairs_responder) as stub:
        stub.mode = "400"  # the stub quotes the key back in its error, as OpenAI's 401 does
        stub.fail_times = 1
        (tmp_path / "cfg.yaml").write_text(json.dumps(config(manifest, stub, "HICOM_TEST_KEY")))  # JSON is YAML
        subprocess.run([sys.executable, "-m", "pipeline.cli", "-v", "build", str(tmp_path / "cfg.yaml"), "--out",
                        str(run), "--no-progress"], env={**os.environ, "HICOM_TEST_KEY": SECRET}, check=True,
                       capture_output=True, timeout=600)
        assert stub.statuses[400] > 0
    assert (run / "logs" / "hicom.log").stat().st_size > 0
    leaked = [str(p) for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert any(p.name.endswith(".parquet") for p in run.rglob("*"))  # there was something to search


def build_cli(cfg: dict, run, tmp_path, env_key: str | None = None) -> int:
    """`hicom build` in this process (the session's Ray, 2 CPUs); returns the exit code."""
    from pipeline import cli

    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return cli.main(["build", str(path), "--out", str(run), "--no-progress"])


def committed_files(run) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()
                  and (p.suffix in (".tar", ".parquet") or p.name.endswith(".stats.json")))


@pytest.mark.parametrize("status", ["401", "403", "404"])
def test_rejected_endpoint_stops_with_exit_2_and_commits_nothing(manifest, tmp_path, ray_local, status):
    run = tmp_path / "run"
    with StubOpenAI(pairs_responder) as stub:
        cfg = config(manifest, stub)
        stub.mode = status
        assert build_cli(cfg, run, tmp_path) == 2
        assert committed_files(run) == []  # no shard, index, failure file or stats marker
        assert json.loads((run / "manifest.json").read_text())["status"] != "finished"
        log = (run / "logs" / "hicom.log").read_text()
        assert f"HTTP {status}" in log and stub.base_url in log and "were not committed" in log.lower()
        assert stub.total <= 2  # max_concurrency 2: the first answers stop the client
        if status == "401":  # the right key: a rerun does the work, nothing was skipped
            stub.mode = "ok"
            assert build_cli(cfg, run, tmp_path) == 0
            assert len(all_pairs(run)) > len(CAPTIONS) * 2
            assert "llm instruct:" in (run / "logs" / "hicom.log").read_text()  # the usage summary


@pytest.mark.timeout(400)
def test_default_captioning_actors_run_on_two_cpus(manifest, tmp_path, ray_local):
    """`caption.mode: vlm` with no `actors:` section on a 2-CPU Ray: the actor pools leave a CPU for the
    video stages, so the build finishes (it used to wait forever)."""
    assert ray_local.cluster_resources()["CPU"] == 2
    run = tmp_path / "run"
    with StubOpenAI(pairs_responder) as stub:
        cfg = config(manifest, stub)
        del cfg["captioning"]["actors"]
        cfg["captioning"]["caption"] = {"mode": "vlm", "images_per_request": 2, "endpoint": {
            "base_url": stub.base_url, "model": "stub-vlm", "timeout_s": 5, "max_retries": 2}}
        report = build(RunConfig.model_validate(cfg), run, progress=False)
        assert stub.statuses[200] > 0
    assert not report.deferred and report.counts["clips"] > 0
    pairs = all_pairs(run)
    assert any("a man in a red jacket" in answer.lower() for _, _, answer in pairs)  # from the VLM captions
