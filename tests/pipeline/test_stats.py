import json

import duckdb
import pytest

from pipeline.export import export_llava
from pipeline.stats import connect, report, run_sql
from schemas.records import AnnotationSample, Failure, VideoResult
from stages.shard import PartWriter, part_name_for
from stages.storage import Storage
from tests.stages.test_shard import _result as shard_result
from tests.s3_server import SECRET_KEY, moto_endpoint, s3_bucket  # noqa: F401


def _result(video_id: str, clips: int) -> VideoResult:
    """test_shard's finished video, with a LLaVA sample and a distinct mp4 per clip, and one late failure."""
    result = shard_result(video_id, clips)
    for sample in result.samples:
        sample.samples = [AnnotationSample.model_validate({"id": f"{sample.clip.id}-s", "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A thing."}]})]
        sample.mp4 = b"mp4-" + sample.clip.id.encode()
    result.failures = [Failure(item_id=f"{video_id}-late", video_id=video_id, stage="split", reason="no_clips")]
    return result


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path) -> Storage:
    """A run with two committed parts and one part whose marker never came (a writer killed mid-commit)."""
    if request.param == "local":
        storage = Storage.from_uri(tmp_path / "run")
    else:
        storage = Storage.from_uri(f"s3://{request.getfixturevalue('s3_bucket')}/run")
    writer = PartWriter(storage, writer_node_id="node-a")
    writer.write(part_name_for(["a"]), [_result("a", 2)], [Failure(item_id="m.csv:3", stage="ingest",
                                                                   reason="malformed_manifest_row")])
    writer.write(part_name_for(["b"]), [_result("b", 3)])
    uncommitted = part_name_for(["c"])
    writer.write(uncommitted, [_result("c", 4)])
    storage.delete(f"shards/{uncommitted}.stats.json")
    return storage


def test_views_count_committed_parts_only(run):
    con = connect(run if not run.is_local else run.uri())
    counts = con.execute("SELECT (SELECT count(*) FROM clips), (SELECT count(*) FROM pairs), "
                         "(SELECT count(*) FROM videos), (SELECT count(*) FROM failures), "
                         "(SELECT count(*) FROM shards)").fetchone()
    assert counts == (5, 5, 2, 3, 2)
    kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
    assert all(kinds[t] == "VIEW" for t in ("clips", "pairs", "videos", "failures")), kinds  # nothing copied
    text = report(con)
    assert "== Totals ==" in text and "malformed_manifest_row" in text
    assert SECRET_KEY not in text


def test_user_sql_reads_but_never_touches_files(run, tmp_path):
    con = connect(run)
    assert run_sql(con, "SELECT count(*) AS n FROM clips").splitlines()[-1].strip() == "5"
    index = next(rel for rel in run.list("shards") if rel.endswith(".clips.parquet"))
    before = run.read_bytes(index)
    target = run.local_path(index) or tmp_path / "x.parquet"
    for sql in (f"COPY (SELECT 42) TO '{target}' (FORMAT csv, USE_TMP_FILE false)",
                f"ATTACH '{tmp_path / 'x.db'}' AS x",
                "SET enable_external_access = true",
                "CREATE TABLE t AS SELECT * FROM clips",
                "SELECT 1; DROP VIEW clips"):
        with pytest.raises(duckdb.Error):
            run_sql(con, sql)
    for sql in ("SELECT * FROM read_csv('/etc/passwd')", f"SELECT * FROM read_parquet('{tmp_path}/*.parquet')"):
        with pytest.raises(duckdb.PermissionException):  # refused by DuckDB itself, not only by run_sql
            con.execute(sql).fetchall()
    assert run.read_bytes(index) == before
    assert run_sql(con, "SELECT count(*) FROM clips").splitlines()[-1].strip() == "5"


def test_export_llava_streams_committed_tars(run, tmp_path):
    counts = export_llava(run, tmp_path / "out" / "train.json", progress=False)
    assert counts["clips"] == counts["samples"] == 5  # the uncommitted part's 4 clips are not exported
    entries = json.loads((tmp_path / "out" / "train.json").read_text())
    assert sorted(e["id"] for e in entries) == sorted(f"{v}_{i * 1000}_{(i + 1) * 1000}-s"
                                                      for v, n in (("a", 2), ("b", 3)) for i in range(n))
    for entry in entries:
        clip = tmp_path / "out" / "train_clips" / entry["video"]
        assert clip.read_bytes() == b"mp4-" + entry["video"][:-4].encode()


def test_export_llava_failing_partway_leaves_nothing_and_says_so_in_one_line(run, tmp_path, monkeypatch):
    earlier = tmp_path / "kept" / "train_clips"
    earlier.mkdir(parents=True)
    (earlier / "unrelated.mp4").write_bytes(b"an earlier export's clip")
    calls = []
    real = Storage.write_bytes

    def second_clip_fails(self, rel, data):
        calls.append(rel)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", second_clip_fails)
    for out in (tmp_path / "out" / "deeper" / "train.json", tmp_path / "kept" / "train.json"):
        calls.clear()
        with pytest.raises(RuntimeError) as err:
            export_llava(run, out, progress=False)
        message = str(err.value)
        assert "\n" not in message and "stopped after 1 clips" in message and "No space left" in message
    assert not (tmp_path / "out").exists()  # the folders it made are gone with what it wrote in them
    assert [p.name for p in (tmp_path / "kept").rglob("*")] == ["train_clips", "unrelated.mp4"]

    monkeypatch.setattr(Storage, "write_bytes", real)
    from pipeline.cli import main

    def reading_fails(*args):
        raise OSError("disk gone")

    monkeypatch.setattr("pipeline.export._export", reading_fails)  # the CLI: exit 2, one line, nothing left
    assert main(["export-llava", run.uri(), str(tmp_path / "out" / "train.json"), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()
