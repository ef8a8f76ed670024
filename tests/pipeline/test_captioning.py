"""Captioning in runs: Ray actor stages, `hicom caption RUN_DIR` annotation versions (atomic per part,
resumable with zero repeated requests), the CLI, the embedded server's lifetime, and (marked `llm`) the
real embedded model."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import caption_command, captioning as cap_pipeline
from pipeline.llm_server import EmbeddedServer, llama_cpp_available
from schemas import caption_reasons as reasons
from schemas.caption import CaptioningConfig, EmbeddedServerConfig
from schemas.config import RunConfig
from stages.shard import PartWriter, shard_name
from stages.storage import Storage
from tests.stub_openai import make_result

CAPTIONS = ["A man in a blue coat walks a brown dog through a green park.",
            "A red car drives along a coastal road at sunset.",
            "A chef chops onions and carrots on a wooden board in a kitchen.",
            "Two children build a sandcastle on a sunny beach while waves roll in."]


def captioning(stub, **kw) -> CaptioningConfig:
    data = {"instruct": {"endpoint": {"base_url": stub.base_url, "model": "stub-llm", "timeout_s": 2.0,
                                      "backoff_base_s": 0.01, "max_retries": 4}, "pairs_per_clip": 3},
            "actors": {"filter_actor_cpus": 0.5, "batch_videos": 2}}
    for key, value in kw.items():
        data.setdefault(key, {}).update(value)
    return CaptioningConfig.model_validate(data)


def videos():
    return [make_result("v0", CAPTIONS[:2], frame_seed=0), make_result("v1", [CAPTIONS[2], None], frame_seed=1),
            make_result("v2", CAPTIONS[3:], frame_seed=2)]


def llm_pairs(results):
    return sorted(p.sample_id for r in results for s in r.samples for p in s.pairs if p.source == "llm")


def test_no_captioning_section_adds_nothing(tmp_path):
    cfg = RunConfig()
    assert cap_pipeline.caption_stages(cfg, tmp_path) == []
    with cap_pipeline.captioning_session(cfg, tmp_path) as session:
        assert session.stages == [] and session.usage() == {}
    cap_pipeline.check(videos()[0])  # no rejected request: nothing to stop


def test_stage_options_declare_actor_pools(stub, tmp_path):
    stages = cap_pipeline.caption_stages(RunConfig(captioning=captioning(stub)), tmp_path, cluster_cpus=8)
    assert [s.name for s, _ in stages] == ["caption", "instruct", "filter"]
    for _, options in stages:
        assert options["batch_format"] == "pyarrow"
        assert set(options["fn_constructor_kwargs"]) == {"captioning", "cache", "usage_dir"}
    llm = stages[0][1]
    assert llm["batch_size"] == 1 and llm["compute"].max_tasks_in_flight_per_actor == 16  # a queue, no batch
    assert stages[2][1]["num_cpus"] == 0.5 and llm["num_cpus"] == 0.25


@pytest.mark.parametrize("cpus", [2, 3, 16])
def test_default_actor_sizes_leave_a_cpu_for_video(cpus):
    actors = CaptioningConfig().actors
    llm, filt = cap_pipeline.actor_cpus(actors, cpus)
    assert 2 * llm + filt <= cpus - 1 and llm > 0 and filt > 0


def test_actor_settings_that_would_hang_are_refused():
    actors = CaptioningConfig.model_validate({"actors": {"filter_actor_cpus": 1.0, "llm_actor_cpus": 0.25}}).actors
    with pytest.raises(ValueError, match="captioning.actors.*ray.num_cpus"):
        cap_pipeline.actor_cpus(actors, 2)
    with pytest.raises(ValueError, match="would hang"):
        cap_pipeline.actor_cpus(CaptioningConfig().actors, 1)


def test_stages_run_on_ray_actor_pools(stub, tmp_path, ray_local):
    from stages.ray_adapter import from_row, to_row

    ray = ray_local
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    cfg = RunConfig(captioning=captioning(stub))
    with cap_pipeline.captioning_session(cfg, tmp_path) as session:
        ds = ray.data.from_items([to_row(r) for r in videos()], override_num_blocks=3)
        for stage, options in session.stages:
            ds = ds.map_batches(stage, **options)
        results = [from_row(row) for row in ds.iter_rows()]
        usage = session.usage()
    assert [r.video_id for r in results] == ["v0", "v1", "v2"]
    assert stub.total == 4  # one request per captioned clip
    kept, failed = llm_pairs(results), [f for r in results for f in r.failures if f.stage in ("instruct", "filter")]
    assert len(kept) + len(failed) == 4 * 3 and len(kept) >= 8
    assert all(p.scores.get("relevance") is not None for r in results for s in r.samples for p in s.pairs
               if p.source == "llm")
    assert [f.reason for f in results[1].failures if f.stage == "caption"] == [reasons.NO_CAPTION]
    assert usage["instruct"]["succeeded"] == 4 and usage["instruct"]["prompt_tokens"] > 0


def committed_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    writer = PartWriter(Storage.from_uri(run_dir))
    for i, result in enumerate(videos()):
        writer.write(shard_name(i), [result])
    return run_dir


def test_caption_command_writes_a_resumable_annotation_version(stub, tmp_path, ray_local, caplog):
    run_dir = committed_run(tmp_path)
    cap = captioning(stub, instruct={"prompt_version": "instruct-v9"})
    report = caption_command.run_caption(run_dir, cap, progress=False)
    out = run_dir / "annotations" / "instruct-v9"
    parts = sorted(p.name for p in out.glob("*.stats.json"))
    assert parts == [f"shard-0000{i}.stats.json" for i in range(3)] and report["done"] == 3  # one per video
    pairs = pq.read_table(sorted(out.glob("*.pairs.parquet"))).to_pylist()
    llm = [p for p in pairs if p["source"] == "llm"]
    failures = pq.read_table(sorted(out.glob("*.failures.parquet"))).to_pylist()
    assert len(llm) + sum(f["stage"] in ("instruct", "filter") for f in failures) == 4 * 3
    assert all(p["prompt_version"] == "instruct-v9" and dict(p["scores"])["relevance"] for p in llm)
    assert sum(p["kind"] == "caption" for p in pairs) == 4  # source caption pairs kept
    assert (out / "captioning.yaml").exists() and report["usage"]["instruct"]["succeeded"] == 4
    sent = stub.total

    usage_runs = set((run_dir / "logs" / "llm_usage").iterdir())
    with caplog.at_level(logging.INFO, logger="pipeline.caption_command"):
        again = caption_command.run_caption(run_dir, cap, progress=False)  # everything committed: skipped
    assert again["skipped"] == 3 and again.get("done", 0) == 0 and stub.total == sent
    assert "all 3 parts" in caplog.text and "nothing to do" in caplog.text
    assert set((run_dir / "logs" / "llm_usage").iterdir()) == usage_runs  # no captioning session was started

    (out / "shard-00001.stats.json").unlink()  # as if killed before part 1 was committed
    before = pq.read_table(out / "shard-00001.pairs.parquet").to_pylist()
    with caplog.at_level(logging.INFO, logger="hicom.progress"):
        redo = caption_command.run_caption(run_dir, cap, progress=True)
    assert redo["done"] == 1 and stub.total == sent  # zero repeated requests: the cache answered
    last = [r.getMessage() for r in caplog.records if r.name == "hicom.progress"][-1]  # the build's display
    assert re.match(r"caption instruct-v9: inputs 1/1, clips \d+, pairs \d+, .*parts committed 1 in ", last), last
    assert redo["usage"]["instruct"]["requests"] == 0 and redo["usage"]["instruct"]["cache_hits"] >= 1
    assert pq.read_table(out / "shard-00001.pairs.parquet").to_pylist() == before

    changed = captioning(stub, instruct={"prompt_version": "instruct-v9", "pairs_per_clip": 2})
    with pytest.raises(ValueError, match="different captioning config"):
        caption_command.run_caption(run_dir, changed, progress=False)


def test_caption_cli(stub, tmp_path, capsys, ray_local):
    run_dir = committed_run(tmp_path)
    config = tmp_path / "captions.yaml"
    config.write_text(yaml.safe_dump({"captioning": captioning(stub).model_dump(mode="json")}))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    caption_command.add_caption_cli(sub)
    args = parser.parse_args(["caption", str(run_dir), "--config", str(config), "--version", "cli-v1",
                              "--set", "instruct.pairs_per_clip=2", "--no-progress"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)  # stdout is the report alone: Ray's lines go to the run's log
    assert report["version"] == "cli-v1" and report["done"] == 3 and stub.total == 4
    table = caption_command.read_annotation_pairs(run_dir, "cli-v1").to_pylist()
    assert {p["sample_id"].rsplit("-", 1)[-1] for p in table if p["source"] == "llm"} <= {"q0", "q1"}
    from pipeline.stats import connect

    con = connect(run_dir, annotations="cli-v1")  # `hicom stats RUN_DIR --annotations cli-v1`
    assert con.execute("SELECT count(*) FROM pairs").fetchone()[0] == len(table)
    assert con.execute("SELECT count(*) FROM pairs WHERE source = 'llm'").fetchone()[0] > 0
    assert connect(run_dir).execute("SELECT count(*) FROM pairs WHERE source = 'llm'").fetchone()[0] == 0


class FakeServer(EmbeddedServer):
    """A stand-in for llama.cpp: an HTTP server that also starts a child process (to check the group kill)."""

    def prepare(self) -> list[str]:
        code = ("import http.server, subprocess, sys; subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(600)']); "
                "h = type('H', (http.server.BaseHTTPRequestHandler,), {'do_GET': lambda s: (s.send_response(200), "
                "s.end_headers()), 'log_message': lambda *a: None}); "
                f"http.server.HTTPServer(('127.0.0.1', {self.port}), h).serve_forever()")
        return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_embedded_server_lifetime_leaves_no_orphan():
    server = FakeServer(EmbeddedServerConfig(enabled=True, startup_timeout_s=30))
    with server:
        assert server.healthy()
        pgid = os.getpgid(server.process.pid)
        time.sleep(0.3)
        members = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == pgid]
        assert len(members) >= 2  # the server and its child
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in members) and not server.healthy()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_embedded_server_that_dies_at_start_is_reported(tmp_path):
    class Crashing(EmbeddedServer):
        def prepare(self):
            return [sys.executable, "-c", "import sys; sys.exit(3)"]

    with pytest.raises(RuntimeError, match="exited with code 3"):
        Crashing(EmbeddedServerConfig(enabled=True), tmp_path / "server.log").start()


@pytest.mark.llm
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed (scripts/install_llm.sh)")
def test_embedded_model_generates_pairs(tmp_path):
    """The real 270M model behind the same client: every expected pair is kept or failed with a reason, and
    some pairs survive the filters (a run that keeps none fails here)."""
    import asyncio

    from stages import filter as pair_filter
    from stages import instruct
    from stages.llm import LLMClient, ResponseCache

    cap = CaptioningConfig.model_validate({
        "instruct": {"pairs_per_clip": 2, "pairs_per_request": 1, "kinds": ["attribute", "temporal"],
                     "endpoint": {"max_tokens": 160, "timeout_s": 120, "max_concurrency": 2, "max_retries": 2,
                                  "temperature": 0.0}},  # greedy: the same pairs on every run
        "embedded_server": {"enabled": True, "n_ctx": 2048}})
    results = [make_result("v0", CAPTIONS[:1]), make_result("v1", CAPTIONS[2:3], frame_seed=1)]
    with cap_pipeline.maybe_server(cap, tmp_path) as base_url:
        cfg = cap_pipeline.with_server(cap, base_url)
        client = LLMClient(cfg.instruct.endpoint, ResponseCache(tmp_path / "cache"))

        async def generate():
            try:
                return [await instruct.ainstruct(r, cfg.instruct, client) for r in results]
            finally:
                await client.aclose()

        results = asyncio.run(generate())
    results = pair_filter.filter_results(results, cfg.filter, pair_filter.TextEncoder())
    kept = llm_pairs(results)
    failed = [f for r in results for f in r.failures if f.stage in ("instruct", "filter")]
    assert len(kept) + len(failed) == 2 * 2
    assert client.usage.succeeded >= 1 and client.usage.completion_tokens > 0
    assert len(kept) >= 1, [f"{f.reason}: {f.detail[:200]}" for f in failed]


def test_demo_captions_config_validates():
    from schemas.config import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    cap = cfg.captioning
    assert cap.embedded_server.enabled and cap.instruct.pairs_per_request == 1
    assert "$caption" in cap.instruct.template and cap.instruct.prompt_version == "demo-gemma270m-v1"
    served = cap_pipeline.with_server(cap, "http://127.0.0.1:1/v1").instruct.endpoint
    assert served.json_mode == "json_object_schema" and served.api_key_env is None


def test_no_batch_barrier_slow_requests_do_not_hold_the_others(stub, tmp_path, ray_local):
    """One request 10x+ slower than the rest: the other videos' requests flow past it through the Ray
    stages (with the build's ordered output too: rows wait in Ray's queue, requests do not)."""
    slow_s = 8.0
    stub.latency_for = lambda body: slow_s if "snail" in json.dumps(body) else 0.2
    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    cap = captioning(stub, actors={"queue_videos": 2})  # 1 slot held by the slow video, 1 for 7 others
    endpoint = cap.instruct.endpoint.model_copy(update={"timeout_s": 30.0})
    cap = cap.model_copy(update={"instruct": cap.instruct.model_copy(update={"endpoint": endpoint})})
    results_in = [make_result("v-slow", ["A slow clip of a snail crossing a wet leaf."], frame_seed=9)]
    results_in += [make_result(f"v{i}", [CAPTIONS[i % 4] + f" Take {i}."], frame_seed=i) for i in range(7)]
    stages = cap_pipeline.caption_stages(RunConfig(captioning=cap), tmp_path, cluster_cpus=2)[:2]
    ds = ray_local.data.from_items([to_row_(r) for r in results_in], override_num_blocks=len(results_in))
    rows = list(cap_pipeline.apply_stages(ds, stages).iter_rows())
    assert len(rows) == 8 and stub.total == 8
    slow = next(i for i, b in enumerate(stub.bodies) if "snail" in json.dumps(b))
    slow_done = stub.received_at[slow] + slow_s
    fast_sent = [t for i, t in enumerate(stub.received_at) if i != slow]
    assert sum(t < slow_done - 2.0 for t in fast_sent) == 7, (stub.received_at, slow)  # none waited for it
    assert stub.max_in_flight >= 2


def to_row_(result):
    from stages.ray_adapter import to_row

    return to_row(result)


def test_usage_counts_move_while_a_video_is_still_captioned(tmp_path, monkeypatch):
    """The build's display reads LLM counts from the actors' usage files: written during a batch, not only
    after it (a video's requests can take minutes on the embedded model)."""
    import asyncio
    import threading

    import pyarrow as pa

    from stages.ray_adapter import to_row
    from tests.stub_openai import StubOpenAI, pairs_responder

    monkeypatch.setattr(cap_pipeline, "USAGE_WRITE_S", 0.05)
    usage_dir = tmp_path / "usage"
    session = cap_pipeline.CaptioningSession(usage_dir=usage_dir)
    with StubOpenAI(pairs_responder, latency_s=0.6) as slow:
        cap = captioning(slow, instruct={"endpoint": {"base_url": slow.base_url, "model": "stub-llm",
                                                      "max_concurrency": 1}})
        stage = cap_pipeline.InstructStage(cap.model_dump(mode="json"), str(tmp_path / "cache"), str(usage_dir))
        batch = pa.Table.from_pylist([to_row(videos()[0])])  # two captioned clips: two requests, one at a time
        seen: list[str] = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                seen.append(session.live_counts())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            asyncio.run(stage(batch))
        finally:
            done.set()
            watcher.join()
    assert "llm instruct 1 sent, 0 ok" in seen  # the first request showed before its answer came
    assert "llm instruct 2 sent, 1 ok" in seen  # the first answer showed while the second request was in flight
    assert session.live_counts() == "llm instruct 2 sent, 2 ok"
