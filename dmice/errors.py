"""Exceptions raised by dmice.

Messages name columns, parameters and counts, never data values.
"""

from __future__ import annotations

import numbers
from typing import Any


class DmiceError(Exception):
    """Base class of dmice's own errors."""


class InputError(DmiceError, ValueError):
    """The data or an argument is not what dmice expects."""


class OutputError(DmiceError, FileExistsError):
    """An output location cannot be written, or is not a complete dmice output."""


def check_int(name: str, value: Any, lo: int) -> int:
    """``value`` as an int when it is an integer (not a bool) of at least ``lo``; else an
    :class:`InputError` naming the parameter ``name`` (arguments are the user's, not data)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)
