"""Formulas per imputed variable: interactions, transforms and splines in the imputation models.

``impute(..., formulas={"chol": "chol ~ age * smoker + bs(sbp, df=3) + event"})`` replaces
the default predictors of ``chol`` (every other column, linearly) by the design of the
formula, encoded by formulaic.  Terms that involve imputed variables are recomputed from
the current imputed values of each chain at every visit, so an interaction ``age:smoker``
with ``smoker`` partly imputed always uses the chain's latest ``smoker``.

The encoding (categorical levels, spline knots, centring) is fitted once, on a sample of
the rows of the data, and replayed unchanged on every partition, chain and iteration: the
design of a row never depends on which partition it is in.  Rows whose formula variables
are all observed have a fixed design; it is built once per partition and only the rows
with imputed cells are rebuilt for each chain.

Nothing here touches dask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dmice.errors import InputError
from dmice.schema import CONTINUOUS, Variable, to_codes

#: rows of the sample the formula encodings are fitted on
SAMPLE_ROWS = 20_000


@dataclass(frozen=True)
class FormulaModel:
    """The design of one imputed variable's model."""

    target: str
    rhs: str
    spec: Any  # formulaic ModelSpec, fitted once
    inputs: tuple[int, ...]  # indices of the variables the design needs
    columns: tuple[str, ...]  # design columns (intercept first when present)

    @property
    def width(self) -> int:
        return len(self.columns)


def parse(formulas: Any, columns: list[str]) -> dict[str, str]:
    """Validate ``impute(formulas=...)``: target column -> ``"target ~ terms"``; returns the terms."""
    if formulas is None:
        return {}
    if not isinstance(formulas, dict):
        raise InputError(f"formulas must be a dict of column -> formula, got {type(formulas).__name__}")
    from formulaic import Formula

    out = {}
    for target, text in formulas.items():
        if target not in columns:
            raise InputError(f"formulas names unknown column {target!r}")
        if not isinstance(text, str) or "~" not in text:
            raise InputError(f"formula for {target!r} must be a string 'target ~ terms', got {text!r}")
        lhs, rhs = text.split("~", 1)
        if lhs.strip() != target:
            raise InputError(f"formula for {target!r} must have {target!r} on the left of '~', "
                             f"got {lhs.strip()!r}")
        try:
            Formula(rhs)
        except Exception as e:  # noqa: BLE001 - formulaic raises several types
            raise InputError(f"formula for {target!r} is not valid: {type(e).__name__}: "
                             f"{str(e).splitlines()[0]}") from None
        out[target] = rhs.strip()
    return out


def as_column(v: Variable, internal: np.ndarray) -> Any:
    """A column as formulas see it, from internal values: numbers, or categoricals with every level."""
    if v.kind == CONTINUOUS:
        return internal
    levels = list(v.levels or [])
    codes = np.where(np.isnan(internal), -1, internal).astype(np.int64)
    if levels and all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
                      for x in levels) and len(levels) == 2 and not v.ordered and v.kind == "binary":
        return np.where(codes >= 0, np.asarray(levels, dtype=np.float64)[np.maximum(codes, 0)], np.nan)
    return pd.Categorical.from_codes(codes, categories=levels, ordered=v.ordered)


def sample_frame(df: pd.DataFrame, variables: list[Variable]) -> pd.DataFrame:
    """Columns of a raw partition in the representation of :func:`as_column`."""
    return pd.DataFrame({v.name: as_column(v, to_codes(df[v.name], v)) for v in variables
                         if v.kind in (CONTINUOUS, "binary", "nominal", "ordinal")})


def fit(rhs: dict[str, str], sample: pd.DataFrame, variables: list[Variable]) -> dict[int, FormulaModel]:
    """Fit the encoding of every formula on ``sample`` (rows with a missing formula variable are
    left out of the fit).  Returns the models by target index."""
    import formulaic

    names = [v.name for v in variables]
    out = {}
    for target, terms in rhs.items():
        try:
            mm = formulaic.model_matrix(terms, sample, na_action="drop")
        except Exception as e:  # noqa: BLE001
            raise InputError(f"formula for {target!r} cannot be evaluated: {type(e).__name__}: "
                             f"{str(e).splitlines()[0]}") from None
        spec = mm.model_spec
        need = sorted(spec.required_variables)
        unknown = [n for n in need if n not in names]
        if unknown:
            raise InputError(f"formula for {target!r} uses unknown or unusable column(s) {unknown}")
        if target in need:
            raise InputError(f"formula for {target!r} uses {target!r} on the right of '~'")
        if len(mm) == 0:
            raise InputError(f"formula for {target!r}: no sampled row has every variable it uses")
        out[names.index(target)] = FormulaModel(target, terms, spec, tuple(names.index(n) for n in need),
                                                tuple(map(str, mm.columns)))
    return out


def design(fm: FormulaModel, frame: pd.DataFrame) -> np.ndarray:
    """The formula's design of ``frame`` (its encoding replayed)."""
    X = fm.spec.get_model_matrix(frame, output="numpy", na_action="ignore")
    return np.asarray(X, dtype=np.float64)
