"""Exceptions raised by dmice.

Messages name columns, parameters and counts, never data values.
"""

from __future__ import annotations


class DmiceError(Exception):
    """Base class of dmice's own errors."""


class InputError(DmiceError, ValueError):
    """The data or an argument is not what dmice expects."""


class OutputError(DmiceError, FileExistsError):
    """An output location cannot be written, or is not a complete dmice output."""
