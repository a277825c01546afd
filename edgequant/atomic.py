"""Write files and folders so that a reader sees the old version or the new one, never half."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; it replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class InterruptedAfterSwap(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) arrived while a finished folder was being swapped in: the swap was
    completed first, so the new folder is in place and whole."""

    def __init__(self, final: Path):
        super().__init__(str(final))
        self.final = final


def _swap_in(new: Path, final: Path) -> None:
    """Put folder ``new`` at ``final`` with two renames, so an interrupt leaves either the
    previous folder or the new one in place, never neither. Ctrl-C and SIGTERM are held off
    until the renames and the removal of the previous folder are done; one that came meanwhile
    is then raised as :class:`InterruptedAfterSwap`."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left over from a machine that went down mid-swap
    with _signals_held() as held:
        if final.exists():
            os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    if held:
        raise InterruptedAfterSwap(final)


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of acting on them while the block runs; yields the list of
    the signals that came. (Outside the main thread, where handlers cannot be set, they are
    blocked at the thread level and act when the block ends.)"""
    held: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {s: signal.signal(s, lambda number, _frame: held.append(number)) for s in signals}
    except ValueError:  # not the main thread
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
        try:
            yield held
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
