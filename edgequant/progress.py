"""Progress of long steps: rich bars on stderr, or nothing (``--quiet``, ``--json``, tests)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator


class Progress:
    """Silent progress: the interface the pipeline talks to."""

    @contextmanager
    def step(self, description: str, total: int | None = None, in_bytes: bool = False) -> Iterator[Callable[..., None]]:
        """A long step; the yielded ``tick(amount=1)`` advances it towards ``total`` (None: unknown),
        counted in bytes (shown as MB and MB/s) when ``in_bytes``."""
        yield lambda *_: None


class RichProgress(Progress):
    """One bar per step, with ETA, written to stderr."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextmanager
    def step(self, description: str, total: int | None = None, in_bytes: bool = False) -> Iterator[Callable[..., None]]:
        from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress as Bars, TextColumn
        from rich.progress import TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn

        counts = [DownloadColumn(), TransferSpeedColumn()] if in_bytes else [MofNCompleteColumn()]
        columns = [TextColumn("{task.description}"), BarColumn(), *counts, TimeElapsedColumn()]
        if total:
            columns.append(TimeRemainingColumn())
        with Bars(*columns, console=self.console, transient=False) as bars:
            task = bars.add_task(description, total=total)
            yield lambda amount=1: bars.advance(task, amount if isinstance(amount, int) else 1)
            if total is None:
                bars.update(task, total=1, completed=1)


def bars(show: bool) -> Progress:
    """Bars on stderr, or silence; either way transformers' own bars are off (ours replace them).
    transformers reads the setting when it is imported; it is not imported here, since commands
    that never load a model (deploy, bench, report...) should not pay for it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return RichProgress() if show else Progress()
