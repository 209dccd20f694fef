"""The one progress bar of every long command (ingest, pretraining, finetune, sweeps): a label,
the bar, done/total, a line of live figures, elapsed and remaining time, on stderr. It imports
only rich, so the command line can draw it without loading torch. `show=False` draws nothing.

    with progress_bar("finetune", total=100, info="starting") as bar:
        bar.update(completed=10, info="loss 0.41")
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """One task of a drawn progress bar."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        self.progress.update(self.task, completed=completed, **({"info": info} if info is not None else {}))

    def advance(self, n: float = 1) -> None:
        self.progress.advance(self.task, n)


@contextmanager
def progress_bar(label: str, total: float | None, *, info: str = "", remaining: bool = True, show: bool = True,
                 console: Console | None = None) -> Iterator[Bar]:
    """A bar for `total` units of work (None: unknown); `remaining` adds the time left."""
    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(),
               *([TimeRemainingColumn()] if remaining else [])]
    with Progress(*columns, console=console or Console(stderr=True), disable=not show) as p:
        yield Bar(p, p.add_task(label, total=total, info=info))
