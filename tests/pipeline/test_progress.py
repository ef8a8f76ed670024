import io
import logging
import re
import time

from pipeline.progress import BuildProgress
from schemas.index import PartReceipt


def test_non_tty_progress_is_one_line_per_interval_with_live_counts(caplog):
    stream = io.StringIO()  # not a terminal
    receipt = PartReceipt(part="part-1", num_videos=2, num_clips=6, num_pairs=9, num_failures=1,
                          failed_by_stage={"probe": 1})
    with caplog.at_level(logging.INFO, logger="hicom.progress"):
        display = BuildProgress(10, interval_s=3600, stream=stream)
        display.update(receipt)
        display.update(receipt)
        display.update(PartReceipt(deferred=["v9"]))  # receipts alone write no line
        display.close()
        display.close()  # twice: still one last line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and stream.getvalue() == ""
    assert lines[0].startswith("build: inputs 5/10, clips 12, pairs 18, failures 2 (probe 2), deferred 1, "
                               "parts committed 2 in ")


def test_non_tty_lines_come_every_interval_without_receipts_and_stop_at_close(caplog):
    with caplog.at_level(logging.INFO, logger="hicom.progress"):
        display = BuildProgress(4, interval_s=0.05, stream=io.StringIO())
        time.sleep(0.5)  # no receipt at all: a long first part must not be silence
        display.update(PartReceipt(part="part-1", num_videos=1, num_clips=3))
        time.sleep(0.2)
        display.close()
        closed = len(caplog.records)
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    periodic = [line for line in lines if "elapsed, ETA" in line]
    assert len(periodic) >= 4 and periodic[0].startswith("build: inputs 0/4, clips 0")
    assert any(re.match(r"build: inputs 1/4, clips 3, .* \d+m\d\ds elapsed, ETA \d+m\d\ds$", line) for line in periodic)
    assert len(lines) == closed and " in " in lines[-1] and "elapsed" not in lines[-1]  # nothing after close


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_bar_clock_moves_without_receipts_and_stops_at_close(monkeypatch):
    monkeypatch.setattr("pipeline.progress.TTY_REFRESH_S", 0.05)
    stream = _Terminal()
    display = BuildProgress(4, stream=stream)
    time.sleep(0.4)  # no receipt: the bar is redrawn anyway
    assert stream.getvalue().count("\r") >= 4 and "0/4" in stream.getvalue()
    display.update(PartReceipt(part="part-1", num_videos=1, num_clips=3))
    display.close()
    drawn = stream.getvalue()
    time.sleep(0.2)
    assert stream.getvalue() == drawn and "1/4" in drawn and "clips=3" in drawn


def test_disabled_progress_prints_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="hicom.progress"):
        display = BuildProgress(1, enabled=False, interval_s=0.01)
        display.update(PartReceipt(part="p", num_videos=1))
        time.sleep(0.05)
        display.close()
    assert not caplog.records


def test_live_counts_join_the_periodic_line_and_a_failing_source_is_left_out(caplog):
    answers = iter(["llm instruct 2 sent, 2 ok", "llm instruct 6 sent, 5 ok, 1 failed"])

    def live() -> str:
        try:
            return next(answers)
        except StopIteration:
            raise OSError("usage folder gone") from None

    with caplog.at_level(logging.INFO, logger="hicom.progress"):
        display = BuildProgress(4, interval_s=0.05, stream=io.StringIO(), live=live)
        time.sleep(0.4)
        display.close()
    periodic = [r.getMessage() for r in caplog.records if "elapsed, ETA" in r.getMessage()]
    assert "failures 0, parts committed 0, llm instruct 2 sent, 2 ok, 0m00s elapsed" in periodic[0]
    assert "llm instruct 6 sent, 5 ok, 1 failed, " in periodic[1]
    assert "llm" not in periodic[-1] and periodic[-1].startswith("build: inputs 0/4, clips 0")
