"""The trainer on pipeline-built shards: loss falls, only the compressor moves, exports, DDP on 2 Ray Train
workers, SIGKILL + resume, follow mode, configs."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from model import build_model
from model.training.loop import Trainer, model_config
from model.training.shards import resolve_source
from model.training.state import latest_checkpoint, warmup_steps
from model.training.stream import clip_examples
from schemas.train import TrainConfig, load_train_config
from train_shards import copy_run, train_run  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def epoch_keys(run) -> set[str]:
    clips = wds.tariterators.tarfile_samples({"url": t} for t in resolve_source(run).shards)
    return {ex["__key__"] for clip in clips for ex in clip_examples(clip, None)}


def key_log(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / "keys" / f"rank-{rank}.jsonl").read_text().splitlines()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def library_lrs(lr: float, total: int, warmup_ratio: float) -> list[float]:
    """LR before each of `total` steps from transformers' own cosine-with-warmup schedule (the reference)."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(total * warmup_ratio), total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def config(run, out, **kw) -> TrainConfig:
    base = dict(shards=str(run), output_dir=str(out), num_frames=4, micro_batch_size=4, global_batch_size=4,
                lr=2e-3, loader_workers=0, shuffle_buffer=4, save_every_steps=100, use_gpu=False,
                log_sample_keys=True)
    return TrainConfig(**{**base, **kw})


def test_tiny_trains_loss_falls_only_compressor_changes_and_exports(train_run, tmp_path):
    cfg = config(train_run, tmp_path / "out", epochs=8, save_every_steps=10)
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    assert summary["step"] == summary["total_steps"] == 24 and summary["examples"] == 96

    after = trainer.model.state_dict()
    trainable = {"mm_projector." + n for n, p in trainer.model.mm_projector.named_parameters() if p.requires_grad}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every trainable compressor tensor moved, nothing else did
    assert all(k.startswith("mm_projector.") for k in changed)

    losses = [r["loss"] for r in metrics(Path(cfg.output_dir))]
    assert len(losses) == 24 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert warmup_steps(24, cfg.warmup_ratio) == 1
    assert [r["lr"] for r in metrics(Path(cfg.output_dir))] == pytest.approx(library_lrs(cfg.lr, 24, cfg.warmup_ratio))
    assert (Path(cfg.output_dir) / "metrics.csv").read_text().count("\n") == 25

    fresh = build_model(model_config(cfg))
    result = fresh.load_mm_projector(str(Path(cfg.output_dir) / "mm_projector.bin"), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    exported = torch.load(Path(cfg.output_dir) / "mm_projector.bin", weights_only=True)
    assert all(k.startswith("model.mm_projector.") for k in exported)
    for name, value in fresh.mm_projector.state_dict().items():
        assert torch.equal(value, after["mm_projector." + name])
    ckpt = latest_checkpoint(cfg.checkpoint_path)
    assert ckpt.name == "step-00000024" and [p.name for p in ckpt.parent.iterdir()] != []
    saved = load_file(str(ckpt / "compressor.safetensors"))
    assert all(torch.equal(saved[k], after["mm_projector." + k]) for k in saved)

    again = Trainer(cfg)  # resuming a finished run does nothing more
    assert again.resumed_from == 24 and again.fit()["step"] == 24
    with pytest.raises(ValueError, match="other data settings"):
        Trainer(cfg.model_copy(update={"shuffle_buffer": 8}))


def test_follow_mode_trains_on_shards_that_appear_after_it_started(train_run, tmp_path):
    run = copy_run(train_run, tmp_path / "live", parts=1, status="running")
    out = tmp_path / "out"
    # a shuffle buffer waits to be full before it yields: 2 lets part 0 (3 clips) train on its own
    cfg = config(run, out, micro_batch_size=2, global_batch_size=2, shuffle_buffer=2, follow=True, max_steps=50,
                 follow_poll_s=0.1, follow_idle_timeout_s=60)
    trainer = Trainer(cfg)
    started = time.time()
    result = {}
    worker = threading.Thread(target=lambda: result.update(trainer.fit()), daemon=True)
    worker.start()
    deadline = time.time() + 60
    while not ((out / "keys" / "rank-0.jsonl").exists() and key_log(out)) and time.time() < deadline:
        time.sleep(0.1)
    assert worker.is_alive() and [r["shards"] for r in key_log(out)] == [["shard-00000.tar"]]
    for i in (1, 2, 3):  # the build commits more parts while the trainer runs (tar renamed last), then finishes
        name = f"shard-{i:05d}"
        shutil.copy(train_run / "shards" / f"{name}.stats.json", run / "shards" / f"{name}.stats.json")
        shutil.copy(train_run / "shards" / f"{name}.tar", run / "shards" / f"{name}.tar.tmp")
        os.replace(run / "shards" / f"{name}.tar.tmp", run / "shards" / f"{name}.tar")
    (run / "manifest.json").write_text(json.dumps({"status": "finished"}))
    worker.join(60)
    assert not worker.is_alive() and result["step"] == 6
    assert (run / "shards" / "shard-00003.tar").stat().st_mtime > started
    logged = key_log(out)
    assert {s for r in logged for s in r["shards"]} == {f"shard-{i:05d}.tar" for i in range(4)}
    assert {k for r in logged for k in r["keys"]} == epoch_keys(train_run)


@pytest.mark.slow
def test_two_ray_train_workers_read_disjoint_shards_and_end_identical(train_run, tmp_path, ray_local):
    from model.training.actor import run_training

    cfg = config(train_run, tmp_path / "ddp", num_workers=2, micro_batch_size=1, global_batch_size=2,
                 save_every_steps=3)
    summary = run_training(cfg, progress=False)
    ranks = [json.loads((tmp_path / "ddp" / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and summary["step"] == 6
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"] != ranks[0]["initial_param_sha256"]
    assert not set(ranks[0]["shards"]) & set(ranks[1]["shards"])
    assert len(ranks[0]["shards"]) == len(ranks[1]["shards"]) == 2
    keys = [{k for rec in key_log(tmp_path / "ddp", r) for k in rec["keys"]} for r in range(2)]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == epoch_keys(train_run)
    ckpt = latest_checkpoint(cfg.checkpoint_path)
    assert json.loads((ckpt / "trainer_state.json").read_text())["positions"].keys() == {"0", "1"}


@pytest.mark.slow
def test_killed_trainer_resumes_step_lr_schedule_and_data_position(train_run, tmp_path):
    out = tmp_path / "out"
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(json.dumps(dict(
        preset="tiny", shards=str(train_run), output_dir=str(out), num_frames=4, micro_batch_size=1,
        global_batch_size=1, lr=1e-3, epochs=2, loader_workers=1, shuffle_buffer=4, save_every_steps=3,
        log_sample_keys=True, use_gpu=False, num_cpus=2)))
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(cfg_path), "--no-progress"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    stderr = open(tmp_path / "driver.err", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.time() + 180
    while latest_checkpoint(out / "checkpoints") is None and time.time() < deadline:
        assert proc.poll() is None, "the trainer exited before it could be killed"
        time.sleep(0.02)
    actor_pid = int((out / "ranks" / "rank-0.pid").read_text())  # the trainer actor's process
    os.kill(actor_pid, signal.SIGKILL)
    assert proc.wait(timeout=120) == 3  # the driver ends on its own: one line, exit 3, no traceback
    stderr.seek(0)
    err = stderr.read()
    # the driver's own lines (Ray also forwards the dead actor's log lines, prefixed "(TrainerActor pid=...)")
    own = [line for line in err.splitlines() if line.strip() and not re.match(r"(\x1b\[\d+m)?\(\w+ pid=\d+", line)]
    assert "Traceback" not in "\n".join(own), err[-3000:]
    assert "the training worker died" in own[-1] and "run the same command again to resume" in own[-1], err[-2000:]
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its local Ray is left
    except ProcessLookupError:
        pass
    while _alive(actor_pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(actor_pid)
    killed_at = json.loads((latest_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())["step"]
    assert 3 <= killed_at < 24

    done = subprocess.run([*cmd, "--plot"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss curve: " in done.stdout and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "ranks" / "rank-0.json").read_text())
    assert summary["resumed_from"] == killed_at and summary["step"] == summary["total_steps"] == 24

    records = metrics(out)  # one line per step: the killed run's lines after its checkpoint were dropped
    assert [r["step"] for r in records] == list(range(1, 25))
    assert [r["resumed_from"] for r in records] == [0] * killed_at + [killed_at] * (24 - killed_at)
    assert [r["lr"] for r in records] == pytest.approx(library_lrs(1e-3, 24, 0.03))
    logged = key_log(out)
    assert [r["step"] for r in logged] == list(range(1, 25))
    for epoch in (0, 1):  # each epoch sees every example exactly once, across the kill
        seen = [k for rec in logged if rec["epoch"] == epoch for k in rec["keys"]]
        assert len(seen) == len(set(seen)) == 12 and set(seen) == epoch_keys(train_run)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_train_configs_validate():
    tiny = load_train_config(REPO / "configs" / "train-tiny.yaml")
    assert tiny.preset == "tiny" and tiny.accumulation_steps == 2
    big = load_train_config(REPO / "configs" / "train-7b.yaml")
    assert (big.lr, big.warmup_ratio, big.weight_decay, big.global_batch_size, big.epochs, big.num_frames,
            big.save_every_steps, big.bf16, big.max_grad_norm) == (1e-4, 0.03, 0.0, 512, 1, 32, 500, True, None)
    assert big.init_mm_projector and big.guide_injector_lr == 1e-3
    with pytest.raises(ValueError, match="starts from the stage-1 projector: set init_mm_projector"):
        load_train_config(REPO / "configs" / "train-7b.yaml", {"init_mm_projector": None})
    assert load_train_config(REPO / "configs" / "train-7b.yaml", {"init_mm_projector": None, "from_scratch": True})
    assert big.accumulation_steps == 32 and model_config(big).compressor.spec == "local43_global32"
    with pytest.raises(ValueError, match="not a multiple"):
        TrainConfig(global_batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="follow mode needs max_steps"):
        TrainConfig(follow=True)


def test_paper_mode_starts_from_a_release_stage1_file_and_trains_two_lr_groups(train_run, tmp_path):
    stage1 = tmp_path / "stage1" / "mm_projector.bin"  # release format: release wiring's keys, full-model prefix
    release = build_model(model_config(config(train_run, tmp_path / "r")))
    release.save_mm_projector(str(stage1))
    saved = torch.load(stage1, weights_only=True)
    assert not saved["model.mm_projector.global_compressor.query"].any()  # stage 1 never trains it (direct wiring)

    cfg = config(train_run, tmp_path / "out", compressor_behaviour="paper", init_mm_projector=str(stage1),
                 guide_injector_lr=1e-2, lr=1e-3, save_every_steps=2)
    trainer = Trainer(cfg)
    state = trainer.model.mm_projector.state_dict()
    new = {k for k in state if "guide_injector" in k}
    assert new and {k for k in state if "model.mm_projector." + k in saved} == set(state) - new
    assert all(torch.equal(state[k], saved["model.mm_projector." + k]) for k in state
               if k not in new and k != "global_compressor.query")
    gc = trainer.model.mm_projector.global_compressor
    with torch.no_grad():
        queries = gc.queries(2, torch.randn(2, 64), None)
    distances = torch.cdist(queries[0], queries[0]) + torch.eye(queries.shape[1])
    assert distances.min() > 1e-3  # the global queries differ at step 0
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["compressor", "guide_injector"]

    summary = trainer.fit()
    records = metrics(Path(cfg.output_dir))
    assert len(records) == summary["total_steps"] == 3
    assert [r["lr_guide_injector"] for r in records] == pytest.approx([10 * r["lr"] for r in records])
    assert [r["lr"] for r in records] == pytest.approx(library_lrs(1e-3, 3, cfg.warmup_ratio))
    ckpt = latest_checkpoint(cfg.checkpoint_path)
    assert json.loads((ckpt / "trainer_state.json").read_text())["lr_groups"] == {"compressor": 1e-3,
                                                                                  "guide_injector": 1e-2}
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    assert [(g["name"], g["initial_lr"]) for g in opt["param_groups"]] == [("compressor", 1e-3),
                                                                          ("guide_injector", 1e-2)]
    with pytest.raises(ValueError, match="learning rates"):
        Trainer(cfg.model_copy(update={"guide_injector_lr": 1e-3}))

    broken = {k: v for k, v in saved.items() if not k.endswith("global_compressor.readout.0.weight")}
    torch.save(broken, tmp_path / "broken.bin")
    with pytest.raises(ValueError, match=r"missing \['global_compressor.readout.0.weight'\]"):
        Trainer(cfg.model_copy(update={"init_mm_projector": str(tmp_path / "broken.bin"),
                                       "output_dir": str(tmp_path / "o2")}))


class _Killed(BaseException):
    """Ends a training run right after a checkpoint, as a kill there would (nothing after it is kept)."""


def test_shards_added_between_kill_and_resume_every_example_of_every_epoch_once(train_run, tmp_path, monkeypatch):
    import model.training.loop as loop

    run = copy_run(train_run, tmp_path / "growing", parts=2, status="running")  # 6 examples now, 12 later
    cfg = config(run, tmp_path / "out", micro_batch_size=1, global_batch_size=1, epochs=2, save_every_steps=2)
    real_save = loop.save_checkpoint

    def save_then_die(root, model, optimizer, scheduler, state, keep=2):
        path = real_save(root, model, optimizer, scheduler, state, keep)
        if state["step"] == 4:
            raise _Killed
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    first = Trainer(cfg)
    assert first.state["total_steps"] == 12
    with pytest.raises(_Killed):
        first.fit()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    for i in (2, 3):  # the build commits two more parts, then finishes
        for suffix in (".stats.json", ".tar"):
            shutil.copy(train_run / "shards" / f"shard-{i:05d}{suffix}", run / "shards" / f"shard-{i:05d}{suffix}")
    (run / "manifest.json").write_text(json.dumps({"status": "finished"}))

    resumed = Trainer(cfg)
    assert resumed.resumed_from == 4 and resumed.state["total_steps"] == 6 + 12
    summary = resumed.fit()
    assert summary["step"] == summary["total_steps"] == 18
    logged = key_log(Path(cfg.output_dir))
    assert [r["step"] for r in logged] == list(range(1, 19))
    first_parts = copy_run(train_run, tmp_path / "first-two", parts=2)
    for epoch, expected in ((0, epoch_keys(first_parts)), (1, epoch_keys(train_run))):
        seen = [k for rec in logged if rec["epoch"] == epoch for k in rec["keys"]]
        assert len(seen) == len(set(seen)) == len(expected) and set(seen) == expected

    (run / "shards" / "shard-00000.tar").write_bytes(b"changed")  # a recorded shard changed: refuse, say which
    ckpt = latest_checkpoint(cfg.checkpoint_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert [Path(s).name for s, _ in state["epoch_shards"]] == [f"shard-{i:05d}.tar" for i in range(4)]
    with pytest.raises(ValueError, match="shard-00000.tar .* cannot be replayed"):
        Trainer(cfg)


def test_follow_mode_on_an_incomplete_run_logs_and_stops_by_its_timeout(train_run, tmp_path, caplog):
    import logging

    run = copy_run(train_run, tmp_path / "incomplete", parts=1, status="incomplete")
    cfg = config(run, tmp_path / "out", micro_batch_size=2, global_batch_size=2, shuffle_buffer=2, follow=True,
                 max_steps=50, follow_poll_s=0.05, follow_idle_timeout_s=1.0, follow_log_every_s=0.3)
    started = time.time()
    with caplog.at_level(logging.INFO, logger="model.training"):
        summary = Trainer(cfg).fit()
    assert time.time() - started < 30 and summary["step"] == 2 < summary["total_steps"]  # part 0's 3 examples
    waiting = [r.getMessage() for r in caplog.records if "follow: waiting for part 1" in r.getMessage()]
    assert len(waiting) >= 3 and "build incomplete, 1 parts committed" in waiting[0]
    assert any("stopping after 1s without part 1" in r.getMessage() and "marked incomplete" in r.getMessage()
               for r in caplog.records)
    assert any("data ran out at step 2 of 50" in r.getMessage() for r in caplog.records)


def test_data_errors_say_what_is_wrong(train_run, tmp_path):
    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    (empty / "manifest.json").write_text(json.dumps({"status": "finished"}))
    with pytest.raises(ValueError, match="no committed shards in"):
        Trainer(config(empty, tmp_path / "o1"))
    no_pairs = copy_run(train_run, tmp_path / "no-pairs")
    for stats in (no_pairs / "shards").glob("*.stats.json"):
        stats.write_text(json.dumps({**json.loads(stats.read_text()), "num_pairs": 0}))
    with pytest.raises(ValueError, match="the run has no instruction/answer pairs: build with captioning"):
        Trainer(config(no_pairs, tmp_path / "o2"))


def test_cli_config_errors_are_one_line_with_exit_code_2(tmp_path, caplog):
    from pipeline.cli import main

    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(json.dumps({"preset": "tiny", "shards": str(tmp_path), "output_dir": str(tmp_path / "o")}))
    with caplog.at_level("ERROR"):
        assert main(["train", str(cfg_path), "--follow", "--no-progress"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "follow mode needs max_steps" in errors[0]


def test_an_error_inside_the_trainer_actor_reaches_the_cli_as_one_line(tmp_path, caplog, ray_local):
    from pipeline.cli import main

    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    (empty / "manifest.json").write_text(json.dumps({"status": "finished"}))
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(json.dumps({"preset": "tiny", "shards": str(empty), "output_dir": str(tmp_path / "o"),
                                    "use_gpu": False}))
    with caplog.at_level("ERROR"):
        assert main(["train", str(cfg_path), "--no-progress"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"no committed shards in {empty}"]
