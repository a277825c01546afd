"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


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
