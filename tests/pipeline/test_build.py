import io
import json
import os
import shutil

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import make_bad_inputs
from pipeline.build import build
from pipeline.stats import connect
from schemas import reasons
from schemas.config import ProbeConfig, RunConfig
from schemas.records import VideoRecord
from stages.probe import probe_video
from stages.sampling import frames_in_span, release_frame_indices


@pytest.fixture(scope="module")
def sample_run(sample_dir, tmp_path_factory, ray_local):
    cfg = RunConfig.model_validate({"input": {"path": str(sample_dir)}, "split": {"mode": "scene", "max_clip_s": 4},
                                    "shard": {"max_samples": 4, "videos_per_part": 1}})
    run_dir = tmp_path_factory.mktemp("run") / "samples"
    report = build(cfg, run_dir, progress=False)
    return cfg, run_dir, report


def test_scene_build_on_real_samples_is_readable_by_webdataset_and_ray(sample_run, sample_dir, ray_local):
    _, run_dir, report = sample_run
    assert report.processed_videos == 4 and report.counts["failures"] == 0
    tars = sorted(str(p) for p in (run_dir / "shards").glob("shard-*.tar"))
    assert len(tars) == report.counts["shards"] >= 2
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    assert len(samples) == report.counts["clips"] >= 8
    probes = {}
    for sample in samples:
        meta = json.loads(sample["json"])
        frames = [sample[f"f{i:03d}.jpg"] for i in range(32)]
        for jpeg in frames[:3]:
            assert Image.open(io.BytesIO(jpeg)).size == (384, 384)
        if meta["video_id"] not in probes:
            probes[meta["video_id"]] = probe_video(
                VideoRecord(id=meta["video_id"], source=str(sample_dir / meta["source"]), relpath=meta["source"]),
                ProbeConfig()).probe
        times = frames_in_span(probes[meta["video_id"]].frame_times_s, meta["start_s"], meta["end_s"])
        assert meta["frame_times_s"] == [times[i] for i in release_frame_indices(len(times), 32)]
        assert meta["id"] == sample["__key__"] == f"{meta['video_id']}_{round(meta['start_s'] * 1000)}_" \
                                                   f"{round(meta['end_s'] * 1000)}"
    ds = ray_local.data.read_webdataset(tars)
    rows = ds.take_all()
    assert len(rows) == len(samples)
    assert np.asarray(rows[0]["f000.jpg"]).shape == (384, 384, 3)


def test_rerun_skips_committed_work(sample_run, caplog):
    cfg, run_dir, first = sample_run
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "shards").iterdir())
    with caplog.at_level("INFO", logger="pipeline.build"):
        again = build(cfg, run_dir, progress=False)
    assert "plan: 4 videos already committed (skipped)" in caplog.text  # said before it starts
    assert "plan: 0 inputs to process" in caplog.text  # counted on the workers: every input is committed
    assert again.processed_videos == 0 and again.skipped_committed == 4
    assert again.counts == first.counts
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "shards").iterdir()) == before


def test_every_input_is_recorded_once_with_its_reason(tmp_path, sample_dir, ray_local):
    inputs = tmp_path / "inputs"
    bad = make_bad_inputs(inputs)
    shutil.copy(sample_dir / "carphone_distorted.mp4", inputs / "real.mp4")
    with open(os.path.join(os.fsencode(inputs), b"latin1-\xe9.mp4"), "wb") as f:
        f.write(b"x")
    cfg = RunConfig.model_validate({"input": {"path": str(inputs)}, "split": {"mode": "fixed", "window_s": 1.5,
                                                                               "stride_s": 1.5}})
    report = build(cfg, tmp_path / "run", progress=False)
    con = connect(tmp_path / "run")
    video_rows = con.execute("SELECT source, status FROM videos").fetchall()
    ingest_failures = con.execute("SELECT reason FROM failures WHERE stage = 'ingest'").fetchall()
    assert len(video_rows) + len(ingest_failures) == len(bad) + 2 == report.inputs_videos + 1
    assert len({s for s, _ in video_rows}) == len(video_rows)
    by_source = dict(con.execute("SELECT source, reason FROM failures WHERE stage <> 'ingest'").fetchall())
    assert by_source == {"empty.mp4": reasons.EMPTY_FILE, "truncated.mp4": reasons.TRUNCATED,
                         "text.mp4": reasons.NOT_A_VIDEO, "audio_only.mp4": reasons.NO_VIDEO_STREAM,
                         "image.mp4": reasons.STILL_IMAGE}
    assert ingest_failures == [(reasons.BAD_NAME,)]
    ok = {s for s, status in video_rows if status == "ok"}
    assert ok == {"good.mp4", "real.mp4"}
    clip_sources = {s for (s,) in con.execute("SELECT DISTINCT source FROM clips").fetchall()}
    assert clip_sources == ok


def test_a_run_reopened_with_another_output_config_is_refused_naming_what_changed(tmp_path):
    from pipeline.run_dir import RunDirectory
    from schemas.config import ClipConfig, RayConfig
    from schemas.saved_config import ConfigMismatch

    run = RunDirectory(tmp_path / "run")
    run.open(RunConfig())
    run.open(RunConfig(ray=RayConfig(num_cpus=3)))  # execution only: a resume may change it
    with pytest.raises(ConfigMismatch, match=r"different config \(clip\); resume with the same config"):
        run.open(RunConfig(clip=ClipConfig(jpeg_qscale=5)))
