"""The workers' resume filter: committed videos and committed ingest failures are dropped, nothing else."""
import pyarrow as pa

from schemas.records import Failure, VideoRecord, VideoResult
from stages.ingest.entries import failure_result
from stages.ray_adapter import from_row, to_row
from stages.resume_filter import skip_committed, sorted_ids


def _batch(results) -> pa.Table:
    rows = [to_row(r) for r in results]
    return pa.table({"video_id": [r["video_id"] for r in rows], "state": pa.array([r["state"] for r in rows])})


def _video(vid: str) -> VideoResult:
    return VideoResult(video_id=vid, video=VideoRecord(id=vid, source=f"/v/{vid}.mp4", relpath=f"{vid}.mp4"))


def test_committed_rows_are_dropped_by_kind():
    same_id = failure_result(Failure(item_id="b", stage="ingest", reason="bad_name"))  # an item id equal to a video id
    rows = [_video("a"), _video("b"), _video("c"), failure_result(Failure(item_id="m:1", stage="ingest",
                                                                           reason="malformed_row")), same_id]
    out = skip_committed(_batch(rows), videos=sorted_ids({"a", "zz"}), loose=sorted_ids({"m:1"}))
    kept = [from_row(r) for r in out.to_pylist()]
    assert [(r.video_id, r.video is None) for r in kept] == [("b", False), ("c", False), ("b", True)]
    assert skip_committed(_batch(rows), videos=sorted_ids(set()), loose=sorted_ids(set())).num_rows == 5
