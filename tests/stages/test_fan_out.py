"""Fan out: batches of a long video's planned clips, failures once, committed batches not redone."""
from schemas.index import PartMarker
from schemas.records import Failure, Span, VideoRecord, VideoResult
import pyarrow as pa

from stages.fan_out import fan_out
from stages.ray_adapter import RayStage, from_row, to_row
from stages.ray_tasks import VideoPlan, run_batch, run_video
from stages.shard import PartWriter
from stages.storage import Storage
from pipeline.resume import committed_state


def _result(clips: int) -> VideoResult:
    video = VideoRecord(id="long-1", source="/x/long.mp4", relpath="long.mp4")
    dup = Failure(item_id="m.csv:3", stage="ingest", reason="duplicate_span", video_id="long-1")
    return VideoResult(video_id="long-1", source="long.mp4", video=video, failures=[dup],
                       planned=[Span(start_s=i, end_s=i + 1) for i in range(clips)])


def test_a_short_video_is_one_row_and_a_long_one_contiguous_batches():
    assert fan_out(_result(4), clips_per_task=4) == [_result(4)]
    batches = fan_out(_result(10), clips_per_task=4)
    assert [b.batch for b in batches] == [(0, 3), (1, 3), (2, 3)]
    assert [[s.start_s for s in b.planned] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b.failures) for b in batches] == [1, 0, 0]  # the video's failures commit once, with batch 0
    assert [b.commit_id for b in batches] == ["long-1#0/3", "long-1#1/3", "long-1#2/3"]
    assert [b.counts_as_video for b in batches] == [True, False, False]


def test_committed_batches_are_not_redone_and_keep_their_recorded_count():
    # the markers recorded 3 batches; the same cut is made whatever clips_per_task says now
    batches = fan_out(_result(10), clips_per_task=100, done={"long-1": (3, {0, 2})})
    assert [(b.batch, [s.start_s for s in b.planned]) for b in batches] == [((1, 3), [4, 5, 6, 7])]
    failed = _result(10).fail_video("probe", "not_a_video", "x")
    assert fan_out(failed, clips_per_task=2) == [failed]


def _cut(result: VideoResult) -> VideoResult:  # an after-fan-out stage that says what it saw
    return result.fail_video("cut", "test", f"{len(result.planned)} spans")


def test_the_video_task_cuts_a_short_video_itself_and_hands_a_long_one_out_as_batches():
    rows = [to_row(_result(3)), to_row(_result(10).model_copy(update={"video_id": "long-2"}))]
    block = pa.Table.from_pylist(rows)
    plan = VideoPlan(before=[], after=[RayStage("cut", _cut)], clips_per_task=5)
    (finished, count), row = run_video(plan, block, 0)
    assert (finished, count) == (True, 1) and from_row(row).failures[-1].detail == "3 spans"
    (finished, count), batches = run_video(plan, block, 1)
    assert (finished, count) == (False, 2) and [from_row(r).batch for r in batches] == [(0, 2), (1, 2)]
    assert from_row(run_batch(plan, batches, 1)).failures[-1].detail == "5 spans"


def test_a_video_is_committed_once_every_batch_is(tmp_path):
    storage = Storage.from_uri(str(tmp_path))
    batches = fan_out(_result(9), clips_per_task=3)
    for i, batch in enumerate(batches[:2]):
        marker = PartWriter(storage).write(f"part-{i:016x}", [batch])
        assert marker.video_ids == [] and marker.batches == [("long-1", i, 3)]
    state = committed_state(storage)
    assert "long-1" not in state.video_ids and state.partial == {"long-1": (3, {0, 1})}
    PartWriter(storage).write("part-" + "f" * 16, [batches[2]])
    state = committed_state(storage)
    assert "long-1" in state.video_ids and not state.partial
    assert PartMarker.model_validate_json((tmp_path / "shards" / ("part-" + "f" * 16 + ".stats.json")).read_text()
                                          ).num_videos == 0  # the video counts once, with batch 0
