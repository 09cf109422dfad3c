"""The library's progress reports and the CLI's one progress bar (in a log, not a terminal)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from facetag.cli.progress import ProgressBar, eta_seconds, format_figures
from facetag.progress import Meter, Progress


def test_meter_starts_its_clock_when_real_work_starts():
    seen: list[Progress] = []
    meter = Meter("photos", 3, seen.append, "photos/s")
    meter.step(worked=False)
    meter.step()
    meter.step()
    assert [p.done for p in seen] == [1, 2, 3]
    assert seen[0].figures == {"photos/s": 0.0}
    assert seen[-1].finished


def test_format_figures_puts_rates_after_their_value():
    assert format_figures({"loss": 0.5, "img/s": 812.0}) == "loss 0.5000  812.0 img/s"


def test_eta_comes_from_the_jobs_own_rate():
    assert eta_seconds(Progress("photos", 10, 40, {"photos/s": 5.0})) == pytest.approx(6.0)
    assert eta_seconds(Progress("photos", 0, 40, {"photos/s": 0.0})) is None


def test_progress_bar_in_a_log_prints_one_line_per_task_with_its_summary():
    out = io.StringIO()
    bar = ProgressBar()
    bar.console = Console(file=out, highlight=False, soft_wrap=True)  # a pipe: no live bar
    with bar:
        for epoch in (1, 2):
            for i in (1, 2):
                bar.update(Progress(f"epoch {epoch:>3}/2", i, 2, {"loss": 1.0 / i}, epoch=epoch))
            bar.update(Progress(f"epoch {epoch:>3}/2", 2, 2, {"loss": 0.5}, "val acc 0.9", epoch))
        bar.message("photo.jpg: expected an image")
    lines = out.getvalue().splitlines()
    assert lines[0] == "epoch   1/2 2/2  loss 0.5000 | val acc 0.9"
    assert lines[1] == "error: photo.jpg: expected an image"  # problems show at once
    assert lines[2].startswith("epoch   2/2 2/2")  # a task's line when it has ended
    assert len(lines) == 3
