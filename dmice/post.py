"""Post-processing of imputed values (mice's ``post``): bounds, rounding, delta shifts.

A post-processing function takes the new imputed values of one variable in one
chain and one partition (a 1-d float array, in the column's own units) and
returns an array of the same shape.  It runs on the workers right after each
visit, so it must be vectorised and pickleable; the callables made here are.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class squeeze:  # noqa: N801 - used like a function, as mice's squeeze()
    """Clip imputed values into ``[lower, upper]`` (mice's ``squeeze``).

    Parameters
    ----------
    lower, upper : float
        Bounds; either may be ``None`` (``-inf`` / ``inf``).

    Examples
    --------
    >>> dmice.impute(ddf, post={"sbp": dmice.squeeze(60, 250)})   # doctest: +SKIP
    """

    def __init__(self, lower: float | None = None, upper: float | None = None):
        lo = -np.inf if lower is None else float(lower)
        hi = np.inf if upper is None else float(upper)
        if not lo <= hi:
            raise ValueError(f"squeeze needs lower <= upper, got {lower!r} and {upper!r}")
        self.lower, self.upper = lo, hi

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lower, self.upper)

    def __repr__(self) -> str:
        return f"squeeze({self.lower}, {self.upper})"


class round_to:  # noqa: N801
    """Round imputed values to the nearest multiple of ``step`` (e.g. 0.5, 1, 5).

    Examples
    --------
    >>> dmice.impute(ddf, post={"bmi": dmice.round_to(0.5)})   # doctest: +SKIP
    """

    def __init__(self, step: float = 1.0):
        if not float(step) > 0:
            raise ValueError(f"round_to needs a step > 0, got {step!r}")
        self.step = float(step)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.round(x / self.step) * self.step

    def __repr__(self) -> str:
        return f"round_to({self.step})"


class shift:  # noqa: N801
    """Add ``delta`` to the imputed values (the delta adjustment of an MNAR sensitivity analysis)."""

    def __init__(self, delta: float):
        self.delta = float(delta)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x + self.delta

    def __repr__(self) -> str:
        return f"shift({self.delta})"


def apply(funcs: tuple[Any, ...], x: np.ndarray) -> np.ndarray:
    """Apply post-processing functions in order; checks that each keeps the shape."""
    for f in funcs:
        y = np.asarray(f(x), dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"post-processing function {f!r} changed the shape of the imputed values "
                             f"from {x.shape} to {y.shape}")
        x = y
    return x
