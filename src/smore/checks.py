"""Value checks shared by every config and argument parser: each raises :class:`~smore.errors.UserError` naming the
field, so a bad value is reported the same way wherever it is read."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from smore.errors import UserError


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python, never a size or a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, low: int = 1) -> None:
    if not is_int(value) or value < low:
        raise UserError(f"{name}={value!r} must be an integer >= {low}.")


def check_number(name: str, value: Any, *, low: float, high: float | None = None, open_low: bool = False) -> None:
    ok = is_number(value) and (value > low if open_low else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"> {low}" if open_low else f">= {low}"
        raise UserError(f"{name}={value!r} must be a number {bound}" + (f" and < {high}." if high else "."))


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise UserError(f"{name}={value!r} is not supported; choose one of {choices}.")
