import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.compact import compact
from pipeline.resume import committed_parts, committed_tars, scan_and_clean
from schemas.config import ShardConfig
from schemas.records import ClipRecord, Failure, QAPair, ShardSample, VideoResult
from stages.shard import TAR_MTIME, TAR_OWNER, PartWriter, part_name_for, tar_header, to_wds
from stages.storage import Storage


def _result(video_id: str, clips: int) -> VideoResult:
    samples = []
    for i in range(clips):
        clip = ClipRecord(id=ClipRecord.make_id(video_id, i, i + 1), video_id=video_id, source=f"{video_id}.mp4",
                          start_s=i, end_s=i + 1, frame_times_s=[i], frame_indices=[0], frames_in_clip=1,
                          frame_size_px=4)
        pair = QAPair(instruction="q", answer="a", sample_id=f"{clip.id}-s", scores={"rel": 0.5})
        samples.append(ShardSample(clip=clip, frames=[b"jpg%d" % i, b"jpg"], mp4=b"mp4", pairs=[pair]))
    return VideoResult(video_id=video_id, source=f"{video_id}.mp4", samples=samples)


def _write_parts(run, groups) -> list[str]:
    writer = PartWriter(Storage.from_uri(run), writer_node_id="node-a")
    names = []
    for ids, sizes in groups:
        results = [_result(v, n) for v, n in zip(ids, sizes)]
        names.append(part_name_for(ids))
        writer.write(names[-1], results)
    return names


def test_part_names_are_deterministic_and_the_marker_commits(tmp_path):
    assert part_name_for(["b", "a"]) == part_name_for(["a", "b"]) != part_name_for(["a"])
    writer = PartWriter(Storage.from_uri(tmp_path), writer_node_id="node-a")
    marker = writer.write("part-0001", [_result("a", 2)], [Failure(item_id="bad.mp4", stage="ingest",
                                                                   reason="missing_file")])
    assert marker.num_samples == 2 and marker.loose_failure_ids == ["bad.mp4"]
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "part-0001.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a_0_1000", "a_1000_2000"]
    assert json.loads(samples[0]["json"])["pairs"][0]["scores"] == {"rel": 0.5}
    videos = pq.read_table(tmp_path / "shards" / "part-0001.videos.parquet").to_pylist()
    assert videos[0]["writer_node_id"] == "node-a"
    # without its marker a part does not exist, whatever else is on disk
    (tmp_path / "shards" / "part-0001.stats.json").unlink()
    assert committed_parts(tmp_path) == [] and committed_tars(tmp_path) == []


def test_uncommitted_leftovers_are_removed_on_resume(tmp_path):
    names = _write_parts(tmp_path, [(["a"], [2]), (["b"], [2])])
    shards = tmp_path / "shards"
    (shards / f"{names[1]}.stats.json").unlink()  # a writer killed just before its marker
    (shards / "part-0123456789abcdef.tar.1a2b3c4d.tmp").write_bytes(b"partial")
    state = scan_and_clean(tmp_path)
    assert state.parts == [names[0]] and state.video_ids == {"a"}
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        f"{names[0]}.{kind}" for kind in ("clips.parquet", "pairs.parquet", "stats.json", "tar", "videos.parquet"))
    assert [p.name for p in (tmp_path / "failures").iterdir()] == [f"{names[0]}.parquet"]


@pytest.mark.parametrize("killed_after", [None, "marker"])
def test_compaction_merges_parts_exactly_once(tmp_path, killed_after, monkeypatch):
    _write_parts(tmp_path, [(["a"], [2]), (["b"], [1]), (["c"], [2]), (["d"], [4])])
    before = {t: [s["__key__"] for s in wds.WebDataset(t, shardshuffle=False)] for t in committed_tars(tmp_path)}
    clips = sorted(k for keys in before.values() for k in keys)
    if killed_after == "marker":  # a kill after the shard's marker, before its parts were deleted
        storage = Storage.from_uri(tmp_path)
        monkeypatch.setattr(Storage, "delete", lambda self, rel: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            compact(storage, ShardConfig(max_samples=3))
        monkeypatch.undo()
        # readers already see the shard, not the parts it replaces
        parts = committed_parts(tmp_path)
        assert parts[0].shard == "shard-00000" and not set(parts[0].replaces) & {p.shard for p in parts}
    compact(tmp_path, ShardConfig(max_samples=3))
    markers = committed_parts(tmp_path)
    assert all(m.shard.startswith("shard-") for m in markers)
    after = [s["__key__"] for t in committed_tars(tmp_path) for s in wds.WebDataset(t, shardshuffle=False)]
    assert sorted(after) == clips and len(after) == len(set(after))
    assert sum(m.num_videos for m in markers) == 4 and sorted(v for m in markers for v in m.video_ids) == list("abcd")
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith("part-")]
    rows = pq.read_table(tmp_path / "shards" / f"{markers[0].shard}.clips.parquet").to_pylist()
    assert {r["shard"] for r in rows} == {markers[0].shard}
    assert compact(tmp_path, ShardConfig(max_samples=3)) == []  # idempotent


@pytest.mark.parametrize("markers", ["with the members' end", "of an earlier version"])
def test_a_compacted_tar_is_the_bytes_of_a_member_by_member_copy(tmp_path, markers):
    """Compaction concatenates the parts' member bytes, up to where each marker says they end (or where the
    headers say, for markers that do not record it); `tarfile` re-adding every member gives the same file."""
    import tarfile

    from pipeline.compact import _members_end

    names = sorted(_write_parts(tmp_path, [(["a"], [2]), (["b"], [1]), (["c"], [3])]))
    for name in names:
        marker_path, tar = tmp_path / "shards" / f"{name}.stats.json", tmp_path / "shards" / f"{name}.tar"
        marker = json.loads(marker_path.read_text())
        with open(tar, "rb") as f:
            assert marker["tar_members_end"] == _members_end(f) < tar.stat().st_size
        if markers == "of an earlier version":
            del marker["tar_members_end"]
            marker_path.write_text(json.dumps(marker))
    with open(tmp_path / "reference.tar", "wb") as f, tarfile.open(fileobj=f, mode="w|") as out:
        for name in names:
            with tarfile.open(tmp_path / "shards" / f"{name}.tar", mode="r|") as src:
                for member in src:
                    out.addfile(member, src.extractfile(member))
    compact(tmp_path, ShardConfig(max_samples=100))
    assert (tmp_path / "shards" / "shard-00000.tar").read_bytes() == (tmp_path / "reference.tar").read_bytes()
    with open(tmp_path / "shards" / "shard-00000.tar", "rb") as f:
        assert committed_parts(tmp_path)[0].tar_members_end == _members_end(f)


def test_tars_are_byte_identical_for_identical_samples(tmp_path):
    for run in ("x", "y"):
        PartWriter(Storage.from_uri(tmp_path / run)).write("part-1", [_result("a", 3)])
    assert (tmp_path / "x/shards/part-1.tar").read_bytes() == (tmp_path / "y/shards/part-1.tar").read_bytes()


def test_part_tars_are_the_bytes_webdatasets_writer_makes(tmp_path):
    """Parts are written with the standard library (webdataset imports torch in every committing worker); the
    archive is byte for byte what `webdataset.TarWriter` writes for the same samples, and reads back whole."""
    result = _result("a", 3)
    PartWriter(Storage.from_uri(tmp_path / "ours")).write("part-1", [result])
    with open(tmp_path / "theirs.tar", "wb") as f, wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as tar:
        for sample in result.samples:
            tar.write(to_wds(sample))
    ours = (tmp_path / "ours/shards/part-1.tar").read_bytes()
    assert ours == (tmp_path / "theirs.tar").read_bytes()
    read = list(wds.WebDataset(str(tmp_path / "ours/shards/part-1.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == [s.clip.id for s in result.samples]
    assert read[1]["f001.jpg"] == b"jpg" and read[2]["mp4"] == b"mp4"


@pytest.mark.parametrize("name", ["a.json", "v000-441055c5a6_0_2000.f000.jpg", "k" * 95 + ".json",
                                  "k" * 96 + ".json", "clip-é.mp4", "bad-\udcff.jpg"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 8 ** 11 - 1, 8 ** 11])
def test_a_member_header_is_the_one_tarfile_builds(name, size):
    """The template header of a short ASCII name is `tarfile`'s byte for byte; a name past 100 characters, a
    non-ASCII or undecodable one, or a size past USTAR's field take `tarfile`'s PAX header."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uname = info.gname = TAR_OWNER
    assert tar_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def test_hicom_compact_uses_the_run_limits(tmp_path, capsys):
    from pipeline.cli import main

    _write_parts(tmp_path, [(["a"], [1]), (["b"], [1]), (["c"], [1])])
    (tmp_path / "config.yaml").write_text("shard: {max_samples: 2}\n")
    assert main(["compact", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "shards": ["shard-00000", "shard-00001"], "parts_replaced": 3}
    assert [m.num_samples for m in committed_parts(tmp_path)] == [2, 1]
