"""Progress bars for `kd stage` on a terminal: rows/s, elapsed and ETA per long loop (kd_core.progress)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from kd_core import progress


class RateColumn(ProgressColumn):
    """Throughput in the bar's own unit: '48,213 rows/s'."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else f"– {unit}/s", style="cyan")


class RichReporter:
    """kd_core.progress.Reporter drawing one rich bar per loop (rows/s, elapsed, ETA) on stderr."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             console=console, refresh_per_second=8)

    def task(self, description: str, unit: str) -> progress.Progress:
        task_id = None

        def update(done: int, total: int) -> None:
            nonlocal task_id
            if task_id is None:  # rows resumed before the first call are not throughput
                task_id = self.bars.add_task(description, total=total, completed=done, unit=unit)
            else:
                self.bars.update(task_id, completed=done, total=total)

        return update


@contextmanager
def progress_bars(console: Console | None = None) -> Iterator[RichReporter | None]:
    """Bars while the block runs, on a terminal only: captured output (CI, `kd run`'s stage logs)
    stays clean. Under torch.distributed.run only rank 0 draws."""
    console = console or Console(stderr=True)
    if not console.is_terminal or os.environ.get("RANK", "0") != "0":
        yield None
        return
    reporter = RichReporter(console)
    with reporter.bars, progress.reporting(reporter):
        yield reporter
