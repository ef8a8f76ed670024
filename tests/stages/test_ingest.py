import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import reasons
from schemas.config import InputConfig
from stages.ingest import detect_kind, ingest, ingest_directory, ingest_llava, ingest_manifest, video_id_for


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
