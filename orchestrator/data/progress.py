"""Progress of a long preparation: rows done, rows/s and ETA.

A tqdm bar on a terminal; elsewhere (Slurm logs, torchrun's piped output) a plain line every
30 s, since a bar's carriage returns make a log unreadable. Nothing appears for work that ends
within a few seconds, so small datasets and tests print only the summary line.
"""

from __future__ import annotations

import sys
import time

DELAY_S = 5.0
LINE_EVERY_S = 30.0


class Progress:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start - LINE_EVERY_S  # the first line once DELAY_S has passed
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="rows", unit_scale=True, delay=DELAY_S,
                             dynamic_ncols=True, leave=False)

    def update(self, rows: int) -> None:
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
            return
        now = time.monotonic()
        if now - self.start >= DELAY_S and now - self._last >= LINE_EVERY_S:
            self._last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        return (f"{self.label}: {self.done}/{self.total} rows ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:.0f} rows/s, ETA {_clock(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
