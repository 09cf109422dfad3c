"""The CLI's only progress display: ``facetag.progress.Progress`` reports drawn with
rich.progress on stderr (bar, percent, count, the job's own figures, ETA).

On a terminal one bar per task redraws in place and stays when the task ends; in a log
(CI, a pipe) there is no live display: each task prints one line when it ends, and a long
one also every 30 s, so logs stay readable. Messages (one line per problem) go above the bar.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from facetag.fsnames import printable
from facetag.progress import Progress

LOG_EVERY_S = 30.0  # a log line for a long task this often


def format_figures(figures: dict[str, float]) -> str:
    """{"loss": 0.41, "img/s": 812} -> "loss 0.4100  812.0 img/s" (rates after the value)."""
    parts = [f"{v:.1f} {k}" if k.endswith("/s") else f"{k} {v:.4f}" for k, v in figures.items()]
    return "  ".join(parts)


def eta_seconds(p: Progress) -> float | None:
    """Time left from the job's own rate (units worked on in this run), None if unknown."""
    rate = next((v for k, v in p.figures.items() if k.endswith("/s")), 0.0)
    return (p.total - p.done) / rate if rate > 0 else None


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta")
        return Text("ETA --:--" if eta is None else f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}")


class ProgressBar:
    """Context manager; ``update`` takes a Progress, ``message`` a problem line."""

    def __init__(self, kind: str = "error") -> None:
        self.kind = kind  # how message() lines start: "error" (tag) or "warning" (enroll)
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal
        self.rich: RichProgress | None = None
        if self.live:
            self.rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[figures]}"),
                _EtaColumn(),
                console=self.console,
            )
        self.current: Progress | None = None
        self.task_id: int | None = None
        self.last_line = 0.0

    def __enter__(self) -> ProgressBar:
        if self.rich is not None:
            self.rich.start()
        return self

    def __exit__(
        self, tp: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._end_task()
        if self.rich is not None:
            self.rich.stop()

    def update(self, p: Progress) -> None:
        if self.current is None or p.task != self.current.task:
            self._end_task()
            if self.rich is not None:
                self.task_id = self.rich.add_task(p.task, total=p.total, figures="", eta=None)
            self.last_line = time.monotonic()
        self.current = p
        if self.rich is not None and self.task_id is not None:
            self.rich.update(
                self.task_id,  # type: ignore[arg-type]
                completed=p.done,
                total=p.total,
                figures=format_figures(p.figures),
                eta=eta_seconds(p),
            )
        elif time.monotonic() - self.last_line >= LOG_EVERY_S and not p.finished:
            self._line(p)
            self.last_line = time.monotonic()

    def message(self, text: str) -> None:
        style = "red" if self.kind == "error" else "yellow"
        self.console.print(f"{self.kind}: {printable(text)}", style=style, markup=False)

    def _end_task(self) -> None:
        p = self.current
        if p is None:
            return
        if self.rich is None:
            self._line(p)
        elif p.summary:
            self.console.print(f"  {p.summary}", markup=False)
        self.current, self.task_id = None, None

    def _line(self, p: Progress) -> None:
        line = f"{p.task} {p.done}/{p.total}  {format_figures(p.figures)}"
        if p.summary:
            line += f" | {p.summary}"
        self.console.print(line, markup=False)
