import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pathlib import Path

from schemas import reasons
from schemas.config import InputConfig
from stages.ingest import detect_kind, ingest, ingest_directory, ingest_llava, ingest_manifest, video_id_for
from tests.s3_server import moto_endpoint, s3_bucket  # noqa: F401


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_is_recursive_filtered_by_extension_and_hashed(tmp_path):
    _touch(tmp_path / "a.mp4")
    _touch(tmp_path / "sub" / "b.MKV")
    _touch(tmp_path / "notes.txt")
    result = ingest_directory(InputConfig(), tmp_path)
    assert sorted(v.relpath for v in result.videos) == ["a.mp4", "sub/b.MKV"]
    assert all(v.sha256 and len(v.sha256) == 64 for v in result.videos)
    assert result.failures == []


def test_video_ids_are_stable_and_tar_key_safe():
    vid = video_id_for("dir/My clip.v2 (1).mp4")
    assert vid == video_id_for("dir/My clip.v2 (1).mp4")
    assert vid != video_id_for("other/My clip.v2 (1).mp4")
    assert "." not in vid and "_" not in vid and " " not in vid


def test_non_utf8_name_is_a_failure_not_a_crash(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"bad\xff\xfename.mp4")
    with open(raw, "wb") as f:
        f.write(b"x")
    result = ingest_directory(InputConfig(), tmp_path)
    assert [f.reason for f in result.failures] == [reasons.BAD_NAME]
    assert result.videos == []
    result.failures[0].model_dump_json()  # the record itself is valid UTF-8


def test_manifest_csv_with_spans_captions_and_bad_paths(tmp_path):
    root = tmp_path / "root"
    _touch(root / "v1.mp4")
    outside = _touch(tmp_path / "secret.mp4")
    manifest = root / "m.csv"
    manifest.write_text(
        "path,start_s,end_s,caption\n"
        "v1.mp4,0,2,a dog runs\n"
        "v1.mp4,2,4,the dog sits\n"
        "../secret.mp4,0,1,x\n"
        f"{outside},0,1,x\n"
        "missing.mp4,0,1,x\n"
    )
    result = ingest_manifest(InputConfig(), manifest)
    assert len(result.videos) == 1
    video = result.videos[0]
    assert [(s.start_s, s.end_s, s.caption) for s in video.spans] == [(0, 2, "a dog runs"), (2, 4, "the dog sits")]
    assert sorted(f.reason for f in result.failures) == sorted(
        [reasons.PATH_ESCAPES_ROOT, reasons.ABSOLUTE_PATH, reasons.MISSING_FILE])
    assert all("secret" not in (v.source or "") for v in result.videos)


def test_panda70m_style_manifest(tmp_path):
    _touch(tmp_path / "yt1.mp4")
    table = pa.table({
        "videoID": ["yt1"], "url": ["yt1.mp4"],
        "timestamp": ["[['0:00:01.000', '0:00:03.500'], ['0:00:04.000', '0:00:06.000']]"],
        "caption": ["['a man talks', 'a car drives']"],
    })
    pq.write_table(table, tmp_path / "panda.parquet")
    result = ingest_manifest(InputConfig(), tmp_path / "panda.parquet")
    spans = result.videos[0].spans
    assert [(s.start_s, s.end_s, s.caption) for s in spans] == [(1.0, 3.5, "a man talks"), (4.0, 6.0, "a car drives")]
    assert result.videos[0].metadata["videoID"] == "yt1"


def test_llava_annotations_group_by_video_and_record_bad_entries(tmp_path):
    root = tmp_path / "split_videos"
    _touch(root / "c1.mp4")
    _touch(root / "c2.mp4")
    conv = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]
    entries = [
        {"id": "s1", "video": "c1.mp4", "conversations": conv},
        {"id": "s2", "video": "c1.mp4", "conversations": conv + conv[:1] + [{"from": "gpt", "value": "Again."}]},
        {"id": "s3", "video": "c2.mp4", "conversations": conv},
        {"id": "s4", "video": "../c1.mp4", "conversations": conv},
        {"id": "s5", "video": "/etc/passwd", "conversations": conv},
        {"id": "s6", "conversations": conv},
        {"id": "s7", "video": "c2.mp4", "conversations": [{"from": "robot", "value": "?"}]},
        "not a dict",
    ]
    ann = tmp_path / "qa.json"
    ann.write_text(json.dumps(entries))
    result = ingest_llava(InputConfig(), ann, root)
    by_path = {v.relpath: v for v in result.videos}
    assert [s.id for span in by_path["c1.mp4"].spans for s in span.samples] == ["s1", "s2"]
    assert len(by_path["c1.mp4"].spans[1].samples[0].conversations) == 4  # multi-turn kept whole
    failures = {f.item_id: f.reason for f in result.failures}
    assert failures["s4"] == reasons.PATH_ESCAPES_ROOT
    assert failures["s5"] == reasons.ABSOLUTE_PATH
    assert failures["s6"] == reasons.BAD_ANNOTATION
    assert failures["s7"] == reasons.BAD_ANNOTATION
    assert failures["qa.json:8"] == reasons.BAD_ANNOTATION


def test_llava_file_that_is_not_json_is_one_failure(tmp_path):
    ann = tmp_path / "broken.json"
    ann.write_text("{not json")
    result = ingest_llava(InputConfig(), ann, tmp_path)
    assert [f.reason for f in result.failures] == [reasons.BAD_ANNOTATION]


def test_symlink_escaping_root_and_symlink_loop(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    target = _touch(tmp_path / "outside.mp4")
    (root / "link.mp4").symlink_to(target)
    (root / "loop.mp4").symlink_to(root / "loop.mp4")
    result = ingest_directory(InputConfig(), root)
    reasons_by_name = {f.source: f.reason for f in result.failures}
    assert reasons_by_name["link.mp4"] == reasons.PATH_ESCAPES_ROOT
    assert reasons_by_name["loop.mp4"] == reasons.UNREADABLE
    assert result.videos == []


def test_detect_kind_and_clear_errors(tmp_path):
    assert detect_kind(tmp_path) == "directory"
    (tmp_path / "a.json").write_text("[]")
    assert detect_kind(tmp_path / "a.json") == "llava"
    with pytest.raises(FileNotFoundError):
        ingest(InputConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="data_root"):
        ingest(InputConfig(path=str(tmp_path / "a.json")))


def test_malformed_manifest_rows_are_failures_with_their_line_and_the_rest_is_read(tmp_path):
    _touch(tmp_path / "v1.mp4")
    _touch(tmp_path / "v2.mp4")
    (tmp_path / "m.csv").write_text(
        "path,start_s,end_s,caption\n"
        "v1.mp4,0,2,first\n"
        "v1.mp4,2,4,too,many,fields\n"
        "\n"
        "v2.mp4,1\n"
        "v2.mp4,1,3,kept\n")
    result = ingest_manifest(InputConfig(), tmp_path / "m.csv")
    assert {f.item_id: f.reason for f in result.failures} == {
        "m.csv:3": reasons.MALFORMED_ROW, "m.csv:5": reasons.MALFORMED_ROW}
    assert "line 3" in next(f.detail for f in result.failures if f.item_id == "m.csv:3")
    spans = {v.relpath: [(s.start_s, s.caption, s.row) for s in v.spans] for v in result.videos}
    assert spans == {"v1.mp4": [(0.0, "first", 2)], "v2.mp4": [(1.0, "kept", 6)]}

    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "v1.mp4", "start_s": 0, "end_s": 1}) + "\n"
        "{not json\n"
        "[1, 2]\n"
        + json.dumps({"path": "v2.mp4", "start_s": 0, "end_s": 1}) + "\n")
    result = ingest_manifest(InputConfig(), tmp_path / "m.jsonl")
    assert {f.item_id: f.reason for f in result.failures} == {
        "m.jsonl:2": reasons.MALFORMED_ROW, "m.jsonl:3": reasons.MALFORMED_ROW}
    assert sorted(s.row for v in result.videos for s in v.spans) == [1, 4]


def test_duplicate_spans_are_reported_not_merged(tmp_path):
    _touch(tmp_path / "v1.mp4")
    _touch(tmp_path / "v2.mp4")
    (tmp_path / "m.csv").write_text(
        "path,start_s,end_s,caption\n"
        "v1.mp4,0,2,a dog runs\n"
        "v1.mp4,2,4,the dog sits\n"
        "v1.mp4,0,2,the same span again\n"
        "v2.mp4,,,\n"
        "v2.mp4,,,\n")
    result = ingest_manifest(InputConfig(), tmp_path / "m.csv")
    by_path = {v.relpath: v for v in result.videos}
    assert [(s.start_s, s.caption) for s in by_path["v1.mp4"].spans] == [(0, "a dog runs"), (2, "the dog sits")]
    duplicates = {f.item_id: f for f in result.failures}
    assert set(duplicates) == {"m.csv:4", "m.csv:6"}
    assert all(f.reason == reasons.DUPLICATE_SPAN for f in duplicates.values())
    assert "row 2" in duplicates["m.csv:4"].detail and duplicates["m.csv:4"].video_id == by_path["v1.mp4"].id


def test_input_dataset_on_ray_gives_what_the_in_process_read_gives(tmp_path, ray_local):
    from stages.ingest import input_dataset, read_all
    from stages.ray_adapter import from_row

    root = tmp_path / "root"
    for name in ("a.mp4", "sub/b.mp4", "sub/deeper/c.mkv", "sub/notes.txt"):
        _touch(root / name)
    (root / "m.csv").write_text("path,start_s,end_s,caption\na.mp4,0,2,x\nbad,row\nsub/b.mp4,1,3,y\n"
                                "a.mp4,0,2,again\n../escape.mp4,0,1,z\na.mp4,3,4,w\n")

    def summary(videos, failures):
        return (sorted((v.id, v.relpath, tuple((s.start_s, s.row) for s in v.spans)) for v in videos),
                sorted((f.item_id, f.reason) for f in failures))

    for path in (root, root / "m.csv"):
        cfg = InputConfig(path=str(path), hash_files=False)
        results = [from_row(row) for row in input_dataset(cfg).iter_rows()]
        on_ray = summary([r.video for r in results if not r.failed],
                         [f for r in results for f in r.failures])
        assert all(r.video is None and len(r.failures) == 1 for r in results if r.failed)
        expected = read_all(cfg)
        assert on_ray == summary(expected.videos, expected.failures)
    assert len(on_ray[0]) == 2 and len(on_ray[1]) == 3  # the manifest: 2 videos; bad row, duplicate, escape


def test_sha256_in_the_worker_is_skipped_for_files_probe_rejects_on_size(tmp_path):
    import hashlib

    from stages.ingest import local_source
    from stages.ingest.paths import Located
    from stages.ingest.entries import Entry, build_video

    data = b"video bytes" * 100
    video, _ = build_video(Located(str(_touch(tmp_path / "v.mp4", data)), "v.mp4", len(data)), [Entry("v.mp4", "v")])
    with local_source(video, InputConfig(), max_file_bytes=10**6) as local:
        assert local.sha256 == hashlib.sha256(data).hexdigest() and local.source == video.source
    with local_source(video, InputConfig(), max_file_bytes=100) as local:
        assert local.sha256 is None  # probe rejects it on size: not read at all


def test_object_store_inputs_listed_located_and_fetched(s3_bucket, tmp_path):
    import hashlib

    from stages.ingest import local_source, read_all
    from stages.storage import Storage

    videos = Storage.from_uri(f"s3://{s3_bucket}/videos")
    payload = b"\x00\x00\x00\x18ftypmp42" + b"x" * 5000
    for key in ("a.mp4", "sub/b.mp4", "sub/readme.txt", "big.mp4"):
        videos.write_bytes(key, payload if key != "big.mp4" else payload * 3)
    result = read_all(InputConfig(path=f"s3://{s3_bucket}/videos/"))
    assert sorted(v.relpath for v in result.videos) == ["a.mp4", "big.mp4", "sub/b.mp4"]
    assert result.failures == [] and all(v.sha256 is None for v in result.videos)  # hashed when fetched
    a = next(v for v in result.videos if v.relpath == "a.mp4")
    assert a.source == f"s3://{s3_bucket}/videos/a.mp4" and a.size_bytes == len(payload)

    with local_source(a, InputConfig(), max_file_bytes=10**6) as local:
        fetched = Path(local.source)
        assert fetched.read_bytes() == payload and local.sha256 == hashlib.sha256(payload).hexdigest()
    assert not fetched.exists()  # the temp copy is gone after the block
    big = next(v for v in result.videos if v.relpath == "big.mp4")
    with local_source(big, InputConfig(), max_file_bytes=len(payload) * 2) as local:
        assert os.path.getsize(local.source) == big.size_bytes and local.sha256 is None  # a sparse stand-in

    manifests = Storage.from_uri(f"s3://{s3_bucket}/meta")
    manifests.write_text("m.csv", "path,start_s,end_s,caption\n"
                                  "a.mp4,0,1,rel key\n"
                                  f"s3://{s3_bucket}/videos/sub/b.mp4,0,1,full uri\n"
                                  "../meta/m.csv,0,1,escapes\n"
                                  f"s3://other-{s3_bucket}/videos/a.mp4,0,1,other bucket\n"
                                  "missing.mp4,0,1,gone\n")
    result = read_all(InputConfig(path=f"s3://{s3_bucket}/meta/m.csv", data_root=f"s3://{s3_bucket}/videos"))
    assert sorted((v.relpath, v.spans[0].caption) for v in result.videos) == [
        ("a.mp4", "rel key"), ("sub/b.mp4", "full uri")]
    assert sorted(f.reason for f in result.failures) == sorted(
        [reasons.PATH_ESCAPES_ROOT, reasons.UNSUPPORTED_URL, reasons.MISSING_FILE])


def test_run_local_restores_the_source_and_fails_an_unfetchable_video(s3_bucket):
    from schemas.records import VideoRecord, VideoResult
    from stages.ingest import run_local

    seen = []

    def step(result):
        seen.append(Path(result.video.source).read_bytes())
        return result

    from stages.storage import Storage

    Storage.from_uri(f"s3://{s3_bucket}/v").write_bytes("a.mp4", b"abc")
    video = VideoRecord(id="a", source=f"s3://{s3_bucket}/v/a.mp4", relpath="a.mp4", size_bytes=3)
    done = run_local(VideoResult(video_id="a", video=video), InputConfig(), 100, [step])
    assert seen == [b"abc"] and done.video.source == video.source and done.video.sha256 and not done.failed
    gone = video.model_copy(update={"source": f"s3://{s3_bucket}/v/gone.mp4"})
    failed = run_local(VideoResult(video_id="a", video=gone), InputConfig(), 100, [step])
    assert failed.failed and failed.failures[0].reason == reasons.UNREADABLE and len(seen) == 1


def test_credentials_in_an_input_uri_are_refused_without_being_echoed():
    from pydantic import ValidationError

    for path in ("s3://AKIAX:very-secret@bucket/videos/", "s3://bucket/videos/?secret_key=very-secret"):
        with pytest.raises(ValidationError) as error:
            InputConfig(path=path)
        assert "AWS_ACCESS_KEY_ID" in str(error.value) and "very-secret" not in str(error.value)
    assert InputConfig(path="s3://bucket/videos/", data_root="s3://bucket/videos").path == "s3://bucket/videos/"
