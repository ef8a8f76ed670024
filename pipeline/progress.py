"""The one progress display of `hicom build` and `hicom caption`: live counts from the receipts of committed
parts.

On a terminal: one tqdm bar over inputs (videos and ingest failures) with clips, pairs, failures (by the
project's stage names) and parts committed, plus tqdm's ETA, redrawn every second so its clock moves between
receipts. Elsewhere (CI, `nohup`, a pipe): one plain line every `interval_s` seconds while the build runs,
receipts or not, and a last one at the end, so logs stay readable and a long wait for the first part is not
silence. `live` adds counts the receipts don't carry: the LLM requests sent and answered so far, which move
while a part is still being captioned.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from tqdm import tqdm

from schemas.index import PartReceipt

log = logging.getLogger("hicom.progress")
TTY_REFRESH_S = 1.0  # the bar's clock and ETA move this often between receipts


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _eta(done: int, total: int | None, elapsed_s: float) -> str:
    if not done or total is None or done >= total:
        return "-"
    return _clock(elapsed_s / done * (total - done))


class BuildProgress:
    """Feed it receipts; it shows inputs done / total (videos and ingest failures), clips, pairs, failures by
    stage, deferred videos (when any), parts, ETA.

    `total_inputs` None: not counted, so counts show without a total or ETA. A daemon thread
    writes the periodic line (or redraws the bar) until `close()`; receipts arrive on the driver's thread, so
    counts are read and written under one lock."""

    def __init__(self, total_inputs: int | None, enabled: bool = True, interval_s: float = 10.0, stream=None,
                 live: Callable[[], str] | None = None, label: str = "build"):
        self.total = total_inputs
        self.label = label  # the command: `build`, `caption v2`
        self.live = live  # counts receipts don't carry (LLM requests), read per tick
        self._live_shown = ""  # the last `live` text, kept for redraws between ticks
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.counts: Counter = Counter()
        self.failed_by_stage: Counter = Counter()
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total_inputs, desc=label, unit="input", file=self.stream, dynamic_ncols=True,
                        disable=not tty) if tty else None
        self._ticker = None
        if enabled:
            period = TTY_REFRESH_S if self.bar is not None else interval_s
            self._ticker = threading.Thread(target=self._tick, args=(period,), name="build-progress", daemon=True)
            self._ticker.start()

    def summary(self) -> str:
        with self._lock:
            c = self.counts.copy()
            failed = ", ".join(f"{stage} {n}" for stage, n in sorted(self.failed_by_stage.items()))
        total = "" if self.total is None else f"/{self.total}"
        deferred = f"deferred {c['deferred']}, " if c["deferred"] else ""  # only an unavailable endpoint defers
        return (f"inputs {c['inputs']}{total}, clips {c['clips']}, pairs {c['pairs']}, "
                f"failures {c['failures']}{f' ({failed})' if failed else ''}, {deferred}parts committed {c['parts']}")

    def update(self, receipt: PartReceipt) -> None:
        done = receipt.num_videos + len(receipt.deferred) + receipt.num_loose_failures
        with self._lock:
            self.counts.update(inputs=done, clips=receipt.num_clips, pairs=receipt.num_pairs,
                               failures=receipt.num_failures, deferred=len(receipt.deferred),
                               parts=1 if receipt.part else 0)
            self.failed_by_stage.update(receipt.failed_by_stage)
            if self.bar is not None:
                self._set_postfix()
                self.bar.update(done)

    def _set_postfix(self) -> None:
        """The bar's counts; called with the lock held."""
        c = self.counts
        live = f" {self._live_shown}" if self._live_shown else ""
        self.bar.set_postfix_str(f"clips={c['clips']} pairs={c['pairs']} failures={c['failures']} "
                                 f"parts={c['parts']}{live}", refresh=False)

    def _live_text(self) -> str:
        try:
            return self.live() if self.live is not None else ""
        except Exception as exc:  # a display never stops a build
            log.debug("live counts unavailable: %s", exc)
            return ""

    def _line(self) -> None:
        elapsed = time.monotonic() - self.started
        live = self._live_text()
        with self._lock:
            done = self.counts["inputs"]
        log.info("%s: %s%s, %s elapsed, ETA %s", self.label, self.summary(), f", {live}" if live else "",
                 _clock(elapsed), _eta(done, self.total, elapsed))

    def _tick(self, period: float) -> None:
        while not self._stop.wait(period):
            if self.bar is not None:
                live = self._live_text()
                with self._lock:
                    self._live_shown = live
                    self._set_postfix()
                    self.bar.refresh()
            else:
                self._line()

    def close(self) -> None:
        """Stop the periodic line (or bar) and write the last one. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            log.info("%s: %s in %.1fs", self.label, self.summary(), time.monotonic() - self.started)
