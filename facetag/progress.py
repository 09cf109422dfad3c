"""Progress reports from long jobs: the library's side of the progress bar.

Library code never draws anything: a long job (a training epoch, a pass over a photo
library, building patches) calls a ``ProgressFn`` with a ``Progress`` after each unit of
work, and the CLI, which owns the only progress bar (facetag.cli.progress, rich.progress),
draws it. Tests pass their own callback (to stop a run at a given point, say).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    """How far one task of a job is: ``done`` of ``total`` units, and figures to show."""

    task: str  # what is counted: "epoch   3/40", "photos", "pnet patches" ...
    done: int
    total: int
    # Shown beside the bar, in this order: {"loss": 0.41, "img/s": 812.0}
    figures: dict[str, float] = field(default_factory=dict)
    summary: str = ""  # a line to keep once the task is finished (an epoch's validation)
    epoch: int = 0  # training: the epoch (from 1) this task belongs to; 0 otherwise

    @property
    def finished(self) -> bool:
        return self.done >= self.total


ProgressFn = Callable[[Progress], None]


class Meter:
    """Counts the units of one task and reports each step to ``callback`` (may be None).

    The rate counts only the units this run worked on: ``step(worked=False)`` (a photo
    taken from the manifest of an earlier run, say) moves the bar but not the rate.
    """

    def __init__(self, task: str, total: int, callback: ProgressFn | None, unit: str) -> None:
        self.task, self.total, self.callback, self.unit = task, total, callback, unit
        self.done = self.worked = 0
        self.t0 = time.perf_counter()

    def step(self, worked: bool = True) -> None:
        self.done += 1
        if worked:
            self.worked += 1
        elif self.worked == 0:
            self.t0 = time.perf_counter()  # the clock starts when the real work does
        if self.callback is None:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.worked / elapsed if self.worked else 0.0
        self.callback(Progress(self.task, self.done, self.total, {self.unit: rate}))
