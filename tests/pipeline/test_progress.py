import io
import logging

from pipeline.progress import BuildProgress
from schemas.index import PartReceipt


def test_non_tty_progress_is_one_line_per_interval_with_live_counts(caplog):
    stream = io.StringIO()  # not a terminal
    receipt = PartReceipt(part="part-1", num_videos=2, num_clips=6, num_pairs=9, num_failures=1,
                          failed_by_stage={"probe": 1})
    with caplog.at_level(logging.INFO, logger="hicom.progress"):
        display = BuildProgress(10, interval_s=3600, stream=stream)
        display.update(receipt)
        display.update(receipt)  # within the interval: no line
        display.interval_s = 0
        display.update(PartReceipt(deferred=["v9"]))
        display.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and stream.getvalue() == ""
    assert "videos 5/10, clips 12, pairs 18, failures 2 (probe 2), deferred 1, parts committed 2, ETA" in lines[0]
    assert lines[1].startswith("build: videos 5/10")


def test_disabled_progress_prints_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="hicom.progress"):
        display = BuildProgress(1, enabled=False, interval_s=0)
        display.update(PartReceipt(part="p", num_videos=1))
        display.close()
    assert not caplog.records
