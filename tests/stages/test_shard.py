import json

import pyarrow.parquet as pq
import webdataset as wds

from pipeline.resume import scan_and_clean
from schemas.config import ShardConfig
from schemas.records import ClipRecord, Failure, QAPair, ShardSample, VideoResult
from stages.shard import ShardWriter


def _result(video_id: str, clips: int) -> VideoResult:
    samples = []
    for i in range(clips):
        clip = ClipRecord(id=ClipRecord.make_id(video_id, i, i + 1), video_id=video_id, source=f"{video_id}.mp4",
                          start_s=i, end_s=i + 1, frame_times_s=[i], frame_indices=[0], num_clip_frames=1,
                          frame_size_px=4)
        pair = QAPair(instruction="q", answer="a", sample_id=f"{clip.id}-s", scores={"rel": 0.5})
        samples.append(ShardSample(clip=clip, frames=[b"jpg%d" % i, b"jpg"], mp4=b"mp4", pairs=[pair]))
    return VideoResult(video_id=video_id, source=f"{video_id}.mp4", samples=samples)


def test_whole_videos_per_shard_and_limits(tmp_path):
    writer = ShardWriter(tmp_path, ShardConfig(max_samples=3))
    writer.add_failures([Failure(item_id="bad.mp4", stage="ingest", reason="missing_file")])
    for vid, n in [("a", 2), ("b", 2), ("c", 1), ("d", 4)]:
        writer.add(_result(vid, n))
    writer.flush()
    stats = [json.loads(p.read_text()) for p in sorted((tmp_path / "shards").glob("*.stats.json"))]
    assert [s["video_ids"] for s in stats] == [["a"], ["b", "c"], ["d"]]  # d alone exceeds the limit: kept whole
    assert stats[0]["loose_failure_ids"] == ["bad.mp4"]
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "shard-00002.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"d_{i * 1000}_{(i + 1) * 1000}" for i in range(4)]
    assert set(samples[0]) >= {"json", "f000.jpg", "f001.jpg", "mp4"}
    meta = json.loads(samples[0]["json"])
    assert meta["pairs"][0]["scores"] == {"rel": 0.5}
    pairs = pq.read_table(tmp_path / "shards" / "shard-00002.pairs.parquet").to_pylist()
    assert len(pairs) == 4 and dict(pairs[0]["scores"]) == {"rel": 0.5}
    assert pq.read_table(tmp_path / "failures" / "shard-00000.parquet").column("reason").to_pylist() == [
        "missing_file"]


def test_uncommitted_leftovers_are_removed_on_resume(tmp_path):
    writer = ShardWriter(tmp_path, ShardConfig(max_samples=2))
    writer.add(_result("a", 2))
    writer.add(_result("b", 2))
    writer.flush()
    shards = tmp_path / "shards"
    # simulate a kill between the stats file and the tar of part 1, and a temp file mid-write
    (shards / "shard-00001.tar").unlink()
    (shards / "shard-00002.tar.tmp").write_bytes(b"partial")
    state = scan_and_clean(tmp_path)
    assert state.parts == [0] and state.video_ids == {"a"} and state.next_index == 1
    assert sorted(p.name for p in shards.iterdir()) == [
        "shard-00000.clips.parquet", "shard-00000.pairs.parquet", "shard-00000.stats.json", "shard-00000.tar",
        "shard-00000.videos.parquet"]
    assert sorted(p.name for p in (tmp_path / "failures").iterdir()) == ["shard-00000.parquet"]


def test_tars_are_byte_identical_for_identical_samples(tmp_path):
    for run in ("x", "y"):
        writer = ShardWriter(tmp_path / run, ShardConfig())
        writer.add(_result("a", 3))
        writer.flush()
    assert (tmp_path / "x/shards/shard-00000.tar").read_bytes() == (tmp_path / "y/shards/shard-00000.tar").read_bytes()
