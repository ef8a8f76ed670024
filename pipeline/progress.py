"""The build's one progress display: live counts from the workers' receipts.

On a terminal: one tqdm bar over videos with clips, pairs, failures (by the project's stage names) and parts
committed, plus tqdm's ETA. Elsewhere (CI, `nohup`, a pipe): one plain line every `interval_s` seconds and a
last one at the end, so logs stay readable.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter

from tqdm import tqdm

from schemas.index import PartReceipt

log = logging.getLogger("hicom.progress")


def _eta(done: int, total: int | None, elapsed_s: float) -> str:
    if not done or total is None or done >= total:
        return "-"
    seconds = int(elapsed_s / done * (total - done))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class BuildProgress:
    """Feed it receipts; it shows videos done / total, clips, pairs, failures by stage, parts, ETA.
    `total_videos` None: the input is still streaming, so counts show without a total or ETA."""

    def __init__(self, total_videos: int | None, enabled: bool = True, interval_s: float = 10.0, stream=None):
        self.total = total_videos
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.counts: Counter = Counter()
        self.failed_by_stage: Counter = Counter()
        self.started = time.monotonic()
        self._last_line = self.started
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total_videos, desc="build", unit="video", file=self.stream, dynamic_ncols=True,
                        disable=not tty) if tty else None

    def summary(self) -> str:
        c = self.counts
        failed = ", ".join(f"{stage} {n}" for stage, n in sorted(self.failed_by_stage.items()))
        total = "" if self.total is None else f"/{self.total}"
        return (f"videos {c['videos']}{total}, clips {c['clips']}, pairs {c['pairs']}, "
                f"failures {c['failures']}{f' ({failed})' if failed else ''}, deferred {c['deferred']}, "
                f"parts committed {c['parts']}")

    def update(self, receipt: PartReceipt) -> None:
        done = receipt.num_videos + len(receipt.deferred)
        self.counts.update(videos=done, clips=receipt.num_clips, pairs=receipt.num_pairs,
                           failures=receipt.num_failures, deferred=len(receipt.deferred),
                           parts=1 if receipt.part else 0)
        self.failed_by_stage.update(receipt.failed_by_stage)
        if self.bar is not None:
            c = self.counts
            self.bar.update(done)
            self.bar.set_postfix_str(f"clips={c['clips']} pairs={c['pairs']} failures={c['failures']} "
                                     f"parts={c['parts']}", refresh=False)
            return
        now = time.monotonic()
        if self.enabled and now - self._last_line >= self.interval_s:
            self._last_line = now
            log.info("build: %s, ETA %s", self.summary(),
                     _eta(self.counts["videos"], self.total, now - self.started))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            log.info("build: %s in %.1fs", self.summary(), time.monotonic() - self.started)
