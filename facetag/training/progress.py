"""A per-epoch progress bar on stderr: loss, accuracy, images/s and ETA.

On a terminal the bar redraws in place; in a log (CI, a pipe) it prints one line per
epoch, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO


class ProgressBar:
    def __init__(self, stream: TextIO | None = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._t0 = time.perf_counter()
        self._dirty = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, tp: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._dirty:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, p: Any) -> None:
        """``p`` has epoch, epochs, batch, batches, loss, accuracy, images_per_s, done."""
        frac_epoch = p.batch / max(p.batches, 1)
        done_total = (p.epoch - 1 + frac_epoch) / max(p.epochs, 1)
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done_total - elapsed if done_total > 0 else 0.0
        filled = round(frac_epoch * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (
            f"epoch {p.epoch:>3}/{p.epochs} [{bar}] {p.batch}/{p.batches} "
            f"loss {p.loss:.4f} acc {p.accuracy:.3f} {p.images_per_s:6.0f} img/s "
            f"ETA {eta:5.0f}s"
        )
        stats = getattr(p, "stats", None)
        if p.done and stats is not None:
            line += f" | val loss {stats.val_loss:.4f} acc {stats.val_accuracy:.4f}"
        if self.tty:
            self.stream.write("\r" + line)
            self._dirty = True
            if p.done:
                self.stream.write("\n")
                self._dirty = False
        elif p.done:
            self.stream.write(line + "\n")
        self.stream.flush()
