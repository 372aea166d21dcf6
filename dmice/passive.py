"""Passive variables: columns derived from others and kept in sync with their imputations.

``impute(..., passive={"bmi": "weight / (height / 100) ** 2"})`` makes ``bmi`` a function of
``weight`` and ``height`` (R mice's ``~ I(...)`` method, Stata's ``mi passive``):

* ``bmi`` is never imputed by a model of its own; wherever ``weight`` or ``height`` is
  missing it is recomputed from their current imputed values right after each visit that
  changes one of them (in the same task), so every completed data set is exactly
  consistent;
* where both inputs are observed, an observed ``bmi`` is kept and a missing one is computed;
  the column is created when the data do not have it;
* ``bmi`` is a predictor of the other variables but not of its own inputs: predicting
  ``weight`` from a function of ``weight`` would feed the old imputation back into the new
  one (mice's documentation warns of exactly this); the exclusion is a logged event.

Expressions are arithmetic on numeric columns: ``+ - * / ** %``, unary minus, numbers and
the functions in :data:`FUNCTIONS`.  They are checked when parsed; nothing else is evaluated.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dmice.errors import InputError

FUNCTIONS = {"log": np.log, "log10": np.log10, "log1p": np.log1p, "exp": np.exp, "sqrt": np.sqrt,
             "abs": np.abs, "minimum": np.minimum, "maximum": np.maximum, "round": np.round,
             "floor": np.floor, "ceil": np.ceil}
_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Mod, ast.FloorDiv, ast.USub, ast.UAdd)


@dataclass(frozen=True)
class Passive:
    name: str
    expression: str
    inputs: tuple[str, ...]

    @property
    def code(self) -> Any:
        return compile(ast.parse(self.expression, mode="eval"), f"<passive {self.name}>", "eval")

    def evaluate(self, values: dict[str, Any]) -> Any:
        """The expression on arrays (or pandas Series) of its inputs."""
        return eval(self.code, {"__builtins__": {}}, {**FUNCTIONS, **values})  # noqa: S307 - checked AST


def _names(name: str, expression: str, columns: list[str]) -> tuple[str, ...]:
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise InputError(f"passive expression for {name!r} is not valid: {e.msg}") from None
    used: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
                raise InputError(f"passive expression for {name!r} calls a function that is not "
                                 f"allowed; allowed: {sorted(FUNCTIONS)}")
        elif isinstance(node, ast.Name):
            if node.id in FUNCTIONS:
                continue
            if node.id not in columns:
                raise InputError(f"passive expression for {name!r} names unknown column {node.id!r}")
            if node.id == name:
                raise InputError(f"passive expression for {name!r} refers to {name!r} itself")
            if node.id not in used:
                used.append(node.id)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                raise InputError(f"passive expression for {name!r}: only numbers are allowed as "
                                 "constants")
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load) + _OPS):
            raise InputError(f"passive expression for {name!r} uses {type(node).__name__}, which is "
                             "not allowed (arithmetic, numbers, columns and "
                             f"{sorted(FUNCTIONS)} only)")
    if not used:
        raise InputError(f"passive expression for {name!r} uses no column")
    return tuple(used)


def parse(passive: Any, columns: list[str]) -> dict[str, Passive]:
    """Validate ``impute(passive=...)``: a dict of column -> expression over other columns."""
    if passive is None:
        return {}
    if not isinstance(passive, dict):
        raise InputError(f"passive must be a dict of column -> expression, got {type(passive).__name__}")
    out = {}
    for name, expr in passive.items():
        if not isinstance(name, str) or not isinstance(expr, str):
            raise InputError(f"passive must map column names to expression strings; got {name!r}")
        out[name] = Passive(name, expr, _names(name, expr, columns + [name]))
    for p in out.values():
        nested = [i for i in p.inputs if i in out]
        if nested:
            raise InputError(f"passive column {p.name!r} uses passive column(s) {nested}; write its "
                             "expression in terms of the original columns")
    return out


def prepare(ddf: Any, passive: dict[str, Passive]) -> Any:
    """The data with each passive column created, or completed where its inputs are observed.

    Where an input is missing the passive value becomes missing (it will be recomputed from
    the imputations); elsewhere an observed value is kept and a missing one computed.
    """
    if not passive:
        return ddf
    for p in passive.values():
        for i in p.inputs:
            if not pd.api.types.is_numeric_dtype(ddf[i].dtype):
                raise InputError(f"passive column {p.name!r} uses {i!r}, which is not numeric "
                                 f"(dtype {ddf[i].dtype})")
    cols = list(ddf.columns)

    def fix(df: Any) -> Any:
        df = df.copy()
        for p in passive.values():
            vals = {i: df[i].to_numpy(dtype=np.float64, na_value=np.nan) for i in p.inputs}
            with np.errstate(all="ignore"):
                computed = np.asarray(p.evaluate(vals), dtype=np.float64)
            inputs_ok = np.all([~np.isnan(v) for v in vals.values()], axis=0)
            if p.name in df.columns:
                cur = df[p.name].to_numpy(dtype=np.float64, na_value=np.nan)
                new = np.where(inputs_ok & ~np.isnan(cur), cur, np.where(inputs_ok, computed, np.nan))
            else:
                new = np.where(inputs_ok, computed, np.nan)
            df[p.name] = new
        return df

    meta = fix(ddf._meta)
    out = ddf.map_partitions(fix, meta=meta)
    return out[cols + [c for c in meta.columns if c not in cols]]

