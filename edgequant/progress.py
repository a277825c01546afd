"""Progress of long steps: rich bars on stderr, or nothing (``--quiet``, ``--json``, tests)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Progress:
    """Silent progress: the interface the pipeline talks to."""

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        yield lambda *_: None


class RichProgress(Progress):
    """One bar per step, with ETA, written to stderr."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn
        from rich.progress import TimeRemainingColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if total:
            columns.append(TimeRemainingColumn())
        with Bars(*columns, console=self.console, transient=False) as bars:
            task = bars.add_task(description, total=total)
            yield lambda *_: bars.advance(task)
            if total is None:
                bars.update(task, total=1, completed=1)
