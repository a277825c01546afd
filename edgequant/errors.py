"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class EdgequantError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def check_number(option: str, value: float | None, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None) -> None:
    """A one-line error unless ``value`` (None: not given) lies in the range; ``option`` names it as
    the user typed it (``--eval-tokens``)."""
    if value is None:
        return
    bounds = []
    if above is not None and not value > above:
        bounds.append(f"> {above:g}")
    if at_least is not None and not value >= at_least:
        bounds.append(f">= {at_least:g}")
    if at_most is not None and not value <= at_most:
        bounds.append(f"<= {at_most:g}")
    if bounds:
        raise EdgequantError(f"{option} must be {' and '.join(bounds)}, got {value:g}")


def disk_is_full(error: OSError, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means its disk is full. numpy's
    short writes ("Not enough free space to write ...") carry no errno, so they are told by the
    free space left."""
    return error.errno == errno.ENOSPC or (error.errno is None and shutil.disk_usage(folder).free < 64 << 20)


@contextmanager
def disk_full_as_error(folder: Path, doing: str) -> Iterator[None]:
    """A full disk while writing into ``folder`` as one line (``doing`` says what, e.g. "to keep
    the rounded model in")."""
    try:
        yield
    except OSError as e:
        if disk_is_full(e, folder):
            free = shutil.disk_usage(folder).free
            raise EdgequantError(f"no space left {doing} {folder} ({free / 1e6:.0f} MB free)") from None
        raise
