"""The shard loader on pipeline-built shards: expansion, splits, determinism, exact skip, follow mode."""
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from model.collate import HicomProcessor
from model.training.shards import ShardSource, deal, resolve_source
from model.training.stream import Collator, ShardStream, clip_examples, count_examples, make_loader, normalise_pixels
from model.presets import tiny_guide_tokenizer, tiny_llm_tokenizer
from model.towers import FrameProcessor
from stages.sampling import release_frame_indices
from train_shards import copy_run, train_run  # noqa: F401


def all_keys(source: ShardSource) -> list[str]:
    clips = wds.tariterators.tarfile_samples({"url": t} for t in source.shards)
    return [ex["__key__"] for clip in clips for ex in clip_examples(clip, None)]


def keys(stream, worker=0):
    return [ex["__key__"] for ex in stream.worker_stream(worker)]


@pytest.fixture(scope="module")
def processor():
    return HicomProcessor(tokenizer=tiny_llm_tokenizer(), guide_tokenizer=tiny_guide_tokenizer(),
                          frames=FrameProcessor(image_size=112))


def jpeg(value: int, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_pipeline_shards_expand_to_keyed_examples(train_run):
    source = resolve_source(train_run)
    assert source.run_dir == train_run and [p.split("/")[-1] for p in source.shards] == [
        f"shard-{i:05d}.tar" for i in range(4)]
    assert resolve_source(train_run / "shards").shards == source.shards
    assert resolve_source(str(train_run / "shards" / "shard-*.tar")).shards == source.shards
    found = all_keys(source)
    assert len(found) == len(set(found)) == 12 == sum(count_examples(t) for t in source.shards)
    clip, sample, turn = found[0].split("/")
    assert sample == f"{clip}-caption" and turn == "0"


def test_multi_sample_multi_turn_clip_and_frame_resampling(tmp_path):
    frames = {f"f{i:03d}.jpg": jpeg(10 * i) for i in range(8)}
    conv2 = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A ball."},
             {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red."}]
    meta = {"id": "c1", "samples": [
        {"id": "s-a", "conversations": conv2},
        {"id": "s-b", "conversations": [{"from": "human", "value": "<video>\nDescribe."},
                                        {"from": "gpt", "value": "x"}]},
        {"id": "bad", "conversations": [{"from": "gpt", "value": "no question"}]}]}
    tar = tmp_path / "shard-00000.tar"
    with wds.TarWriter(str(tar)) as w:
        w.write({"__key__": "c1", "json": json.dumps(meta).encode(), **frames})
    assert count_examples(str(tar)) == 3
    clip = next(iter(wds.tariterators.tarfile_samples([{"url": str(tar)}])))
    examples = clip_examples(clip, num_frames=4)
    assert [e["__key__"] for e in examples] == ["c1/s-a/0", "c1/s-a/1", "c1/s-b/0"]
    assert [len(e["json"]["conversations"]) for e in examples] == [2, 4, 2]
    picked = release_frame_indices(8, 4)
    assert examples[0]["frames"] == [frames[f"f{i:03d}.jpg"] for i in picked]
    assert len(clip_examples(clip, None)[0]["frames"]) == 8


def test_uint8_collate_normalises_like_the_frame_processor(train_run, processor):
    stream = ShardStream(resolve_source(train_run), 4, shuffle_buffer=0, loader_workers=0)
    examples = list(stream)[:3]
    batch = Collator(processor)(examples)
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (12, 3, 112, 112)
    assert batch["worker"] == 0 and batch["position"] == 3 and batch["keys"] == [e["__key__"] for e in examples]
    reference = processor.collate(examples)["pixel_values"]
    assert torch.allclose(normalise_pixels(batch["pixel_values"], processor.frames), reference, atol=1e-6)


def test_ranks_and_loader_workers_read_disjoint_shards_covering_the_epoch(train_run):
    source = resolve_source(train_run)
    seen, shards = [], []
    for rank in range(2):
        stream = ShardStream(source, 4, rank, 2, seed=3, shuffle_buffer=4, loader_workers=2)
        for worker in range(2):
            mine = list(stream.worker_tars(worker))
            assert len(mine) == 1
            shards += mine
            seen += keys(stream, worker)
    assert sorted(shards) == source.shards
    assert sorted(seen) == sorted(all_keys(source))
    assert deal(list(range(10)), 1, 2, 1, 2) == [3, 7]
    with pytest.raises(ValueError, match="4 shards for 5 trainer workers"):
        ShardStream(source, 4, 0, 5)


def test_streams_are_seeded_and_skipping_resumes_exactly(train_run):
    source = resolve_source(train_run)
    stream = ShardStream(source, 4, seed=7, shuffle_buffer=5, loader_workers=1)
    stream.set_epoch(0)
    first = keys(stream)
    assert first == keys(stream) and sorted(first) == sorted(all_keys(source))
    stream.set_epoch(1)
    assert keys(stream) != first and sorted(keys(stream)) == sorted(first)
    stream.set_epoch(0, {0: 5})
    assert [ex["__key__"] for ex in stream] == first[5:]
    assert [ex["__ordinal__"] for ex in stream] == list(range(5, 12))


def test_dataloader_positions_resume_without_duplicates(train_run, processor):
    stream = ShardStream(resolve_source(train_run), 4, seed=1, shuffle_buffer=4, loader_workers=2)
    stream.set_epoch(0)
    consumed, seen = {}, []
    for i, batch in enumerate(make_loader(stream, processor, micro_batch_size=2)):
        if i == 3:
            break
        consumed[batch["worker"]] = batch["position"]
        seen += batch["keys"]
    assert set(consumed) == {0, 1}
    stream.set_epoch(0, consumed)
    rest = [k for batch in make_loader(stream, processor, micro_batch_size=2) for k in batch["keys"]]
    assert not set(seen) & set(rest)
    assert sorted(seen + rest) == sorted(all_keys(resolve_source(train_run)))


def _add_part(src_shards, dest_shards, src_index: int, dest_index: int) -> None:
    """Commit a part the way the shard writer does: stats first, the tar renamed into place last."""
    name, new = f"shard-{src_index:05d}", f"shard-{dest_index:05d}"
    shutil.copy(src_shards / f"{name}.stats.json", dest_shards / f"{new}.stats.json")
    shutil.copy(src_shards / f"{name}.tar", dest_shards / f"{new}.tar.tmp")
    (dest_shards / f"{new}.tar.tmp").rename(dest_shards / f"{new}.tar")


def test_follow_mode_reads_new_parts_and_stops_when_the_build_finishes(train_run, tmp_path):
    run = copy_run(train_run, tmp_path / "live", parts=1, status="running")
    source = resolve_source(run)
    assert len(source.shards) == 1 and not source.finished()
    stream = ShardStream(source, 4, shuffle_buffer=0, follow=True, poll_s=0.05, idle_timeout_s=60, loader_workers=0)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(ex["__key__"] for ex in stream), daemon=True)
    reader.start()
    deadline = time.time() + 30
    while len(got) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert len(got) == 3 and reader.is_alive()  # waiting for part 1
    _add_part(train_run / "shards", run / "shards", 1, 1)
    (run / "shards" / "shard-00002.stats.json").write_text(json.dumps({"num_samples": 0}))  # failures only: no tar
    _add_part(train_run / "shards", run / "shards", 2, 3)
    time.sleep(0.5)
    assert len(got) == 9 and reader.is_alive()  # the manifest still says running
    _add_part(train_run / "shards", run / "shards", 3, 4)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "finished"}))
    reader.join(30)
    assert not reader.is_alive()
    assert sorted(got) == sorted(all_keys(resolve_source(train_run)))


def test_stream_warns_once_when_the_model_wants_more_frames_than_stored(train_run, caplog):
    import logging

    stream = ShardStream(resolve_source(train_run), num_frames=8, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="model.training.stream"):
        examples = list(stream.worker_stream(0))
    assert len(examples) == 12 and all(len(ex["frames"]) == 8 for ex in examples)
    warned = [r.getMessage() for r in caplog.records if "frames are repeated" in r.getMessage()]
    assert len(warned) == 1 and "holds 4 frames but the model takes 8" in warned[0]
