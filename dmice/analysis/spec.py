"""The model spec of an analysis formula: built once with formulaic (the global levels of every
categorical variable, stateful transforms fitted on a sample), replayed on every partition;
simple designs (numeric columns, treatment-coded categories, products) are built directly
from the columns.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import numpy as np
import pandas as pd
from dask import delayed

from dmice import config as _config
from dmice import formulas as _formulas
from dmice.errors import InputError
from dmice.runtime import passes as _passes

_Factor = tuple[str, str, "int | None"]
_C_TREATMENT = re.compile(r"^C\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:,\s*contr\.treatment\([^()]*\))?\s*\)$")


def _column_recipes(spec: Any, columns: list[str]) -> tuple[str, list[list[_Factor]]] | None:
    """The outcome column and, per model-matrix column, its factors, when every term of
    ``spec`` is a product of plain numeric columns and treatment-coded categorical columns
    (``x``, ``g``, ``C(g)``, ``C(g, contr.treatment(...))`` and their interactions); else
    ``None``.  Such a model matrix can be built directly from the columns (see
    :meth:`_FormulaDesign.__call__`), without formulaic's general machinery."""
    from formulaic.parser.types import Factor
    from formulaic.transforms.contrasts import TreatmentContrasts

    def source(evaluated: Any, state: dict[str, Any]) -> tuple[str, list[Any] | None] | None:
        factor = evaluated.factor  # formulaic's EvaluatedFactor wraps the parsed Factor
        kind, st = state.get(factor.expr, (None, None))
        kind = getattr(kind, "value", kind)
        if factor.eval_method == Factor.EvalMethod.LOOKUP and factor.expr in columns:
            col = factor.expr
        elif factor.eval_method == Factor.EvalMethod.PYTHON and kind == "categorical":
            match = _C_TREATMENT.match(factor.expr)
            if match is None or match.group(1) not in columns:
                return None
            col = match.group(1)
        else:
            return None
        if kind == "numerical":
            return col, None
        if kind == "categorical" and isinstance(getattr(st.get("contrasts"), "contrasts", None),
                                                TreatmentContrasts):
            return col, list(st["categories"])
        return None

    lhs = spec.lhs.structure
    if len(lhs) != 1 or len(lhs[0].scoped_terms) != 1:
        return None
    (yf,) = lhs[0].scoped_terms[0].factors or (None,)
    ysrc = None if yf is None else source(yf.factor, spec.lhs.encoder_state)
    if ysrc is None or ysrc[1] is not None:
        return None
    state = spec.rhs.encoder_state
    names: list[str] = []
    recipes: list[list[_Factor]] = []
    for st in spec.rhs.structure:
        made: list[str] = []
        for scoped in st.scoped_terms:
            if getattr(scoped, "scale", 1) != 1:
                return None
            options: list[list[tuple[str, _Factor]]] = []
            for sf in scoped.factors:
                src = source(sf.factor, state)
                if src is None:
                    return None
                col, cats = src
                expr = sf.factor.expr
                if cats is None:
                    options.append([(expr, (col, expr, None))])
                    continue
                base = state[expr][1]["contrasts"].contrasts.base
                base = cats[0] if getattr(base, "name", None) == "UNSET" else base
                if sf.reduced:
                    options.append([(f"{expr}[T.{lv}]", (col, expr, i))
                                    for i, lv in enumerate(cats) if lv != base])
                else:
                    options.append([(f"{expr}[{lv}]", (col, expr, i)) for i, lv in enumerate(cats)])
            # formulaic's order: the first factor varies fastest
            for combo in itertools.product(*reversed(options)):
                combo = combo[::-1]
                made.append(":".join(n for n, _ in combo) if combo else "Intercept")
                recipes.append([f for _, f in combo])
        if made != list(st.columns):
            return None
        names += made
    if names != list(spec.rhs.column_names):
        return None
    return ysrc[0], recipes


class _FormulaDesign:
    """Replays one formulaic model spec on a pandas partition.

    String columns are cast to Categorical with the global levels first, so every
    partition yields the same columns.  When every term is a product of plain numeric
    and treatment-coded categorical columns (see :func:`_column_recipes`) and the
    direct construction was checked equal to formulaic's on a sample (``recipes``),
    the model matrix is built column by column from the data instead (several times
    faster than formulaic's general evaluation).
    """

    def __init__(self, spec: Any, columns: list[str], levels: dict[str, list[Any]],
                 weights: str | None, offset: str | None,
                 recipes: tuple[str, list[list[_Factor]]] | None = None):
        self.spec = spec
        self.columns = columns
        self.levels = levels
        self.weights = weights
        self.offset = offset
        self.recipes = recipes

    def prepare(self, df: pd.DataFrame, only: Any = None) -> pd.DataFrame:
        """The analysis columns of ``df``, checked for missing values and with string columns
        cast to Categorical with the global levels; with ``only``, the other columns are
        taken as already prepared (those of imputation 1, see :meth:`_Group.load`)."""
        df = df[self.columns]
        todo = self.columns if only is None else [c for c in self.columns if c in only]
        missing = [c for c in todo if df[c].isna().any()]
        if missing:
            raise InputError(f"the analysis columns {missing} have missing values")
        cast = {c: pd.Categorical(df[c], categories=lv) for c, lv in self.levels.items() if c in todo}
        return df.assign(**cast) if cast else df

    def __call__(self, df: pd.DataFrame) -> tuple:
        """Design arrays ``(X, y, w, offset)`` of a frame returned by :meth:`prepare`."""
        if self.recipes is not None:
            X, y = self._direct(df)
        else:
            mm = _formulas.replay(self.spec, df)
            X = _float_columns(mm.rhs)
            y = mm.lhs.iloc[:, 0].to_numpy(dtype=float)
            if len(y) != len(df):
                raise InputError("the formula's terms have missing values after evaluation")
        w = df[self.weights].to_numpy(dtype=float) if self.weights else None
        off = df[self.offset].to_numpy(dtype=float) if self.offset else None
        return X, y, w, off

    def formulaic(self) -> _FormulaDesign:
        """The same design evaluated by formulaic on every partition."""
        return _FormulaDesign(self.spec, self.columns, self.levels, self.weights, self.offset)

    def sources(self, df: pd.DataFrame, columns: Any = None) -> tuple[dict, dict]:
        """The values (floats) and level codes of the ``columns`` (default: all) that the
        :attr:`recipes` read from ``df``."""
        values: dict[str, np.ndarray] = {}
        codes: dict[str, np.ndarray] = {}
        for factors in self.recipes[1]:
            for col, expr, level in factors:
                if columns is not None and col not in columns:
                    continue
                if level is None and col not in values:
                    values[col] = df[col].to_numpy(dtype=float)
                elif level is not None and expr not in codes:
                    codes[expr] = _codes(df[col], self.spec.rhs.encoder_state[expr][1]["categories"])
        return values, codes

    def _direct(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``X`` (column-major) and ``y`` built from the columns by :attr:`recipes`."""
        ycol, recipes = self.recipes
        values, codes = self.sources(df)
        X = np.empty((len(df), len(recipes)), order="F")
        for j, factors in enumerate(recipes):
            _fill_column(X[:, j], factors, values, codes)
        return X, df[ycol].to_numpy(dtype=float)


def _fill_column(out: np.ndarray, factors: list[_Factor], values: dict[str, np.ndarray],
                 codes: dict[str, np.ndarray]) -> None:
    """Write the model-matrix column made of ``factors`` into ``out``."""
    if not factors:
        out.fill(1.0)
        return
    for i, (col, expr, level) in enumerate(factors):
        v = values[col] if level is None else codes[expr] == level
        if i == 0:
            out[:] = v
        else:
            out *= v


def _float_columns(df: pd.DataFrame) -> np.ndarray:
    """The columns of a frame as one float array in column-major order (the order of the
    passes' X, see :func:`_arrays`), filled column by column instead of through pandas'
    row-major interleave of mixed dtypes and a transposing copy."""
    X = np.empty(df.shape, order="F")
    for j, (_, col) in enumerate(df.items()):
        X[:, j] = col.to_numpy(dtype=float)
    return X


def _is_stringlike(dtype: Any) -> bool:
    return (not isinstance(dtype, pd.CategoricalDtype)
            and (pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)))


def _distinct(df: pd.DataFrame, columns: list[str]) -> dict[str, list[Any]]:
    return {c: df[c].dropna().unique().tolist() for c in columns}


def _sorted_levels(values: set) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types in an object column
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


_formula_error = _formulas.error_text


#: rows sampled over all partitions of imputation 1 to fit a formula's stateful transforms: dask
#: config ``dmice.analysis.spec-sample-rows`` (100,000)


#: rows of imputation 1's first partition on which a direct design is checked against formulaic


DIRECT_CHECK_ROWS = 20_000


def _codes(col: pd.Series, categories: list[Any]) -> np.ndarray:
    """Codes of ``col`` in ``categories`` (-1 elsewhere)."""
    categories = list(categories)
    if isinstance(col.dtype, pd.CategoricalDtype) and list(col.cat.categories) == categories:
        return col.cat.codes.to_numpy()
    return pd.Categorical(col, categories=categories).codes


def _same_design(direct: _FormulaDesign, general: _FormulaDesign, df: pd.DataFrame) -> bool:
    """Whether the direct construction gives exactly formulaic's arrays on ``df``."""
    try:
        a, b = direct(df), general(df)
    except Exception:  # noqa: BLE001  (any failure: keep formulaic)
        return False
    return all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
                                             and np.array_equal(x, y)) for x, y in zip(a, b))


def _has_state(spec: Any) -> bool:
    return any(bool(getattr(s, "transform_state", None)) for s in (spec.lhs, spec.rhs))


def _spec_sample(df: pd.DataFrame, probe: _FormulaDesign, rows: int) -> pd.DataFrame:
    """Every r-th row of a partition (about ``rows`` rows) plus the rows holding the minimum
    and maximum of each numeric column, so that fitted bounds (spline boundary knots) cover
    the partition."""
    df = probe.prepare(df)
    step = max(1, len(df) // max(rows, 1))
    take = set(range(0, len(df), step))
    for c in df.columns:
        if pd.api.types.is_numeric_dtype(df[c].dtype) and not pd.api.types.is_bool_dtype(df[c].dtype) \
                and len(df):
            v = df[c].to_numpy(dtype=float)
            take.update((int(np.argmin(v)), int(np.argmax(v))))
    return df.iloc[sorted(take)]


def _build_spec(formula: str, frames: list[Any], weights: str | None,
                offset: str | None, client: Any = None) -> tuple[Any, list[str], _FormulaDesign]:
    from formulaic.errors import FormulaicError

    if not isinstance(formula, str) or "~" not in formula:
        raise InputError(f"formula must be a string 'outcome ~ terms', got {formula!r}")
    meta = frames[0]._meta
    names = [str(c) for c in meta.columns]
    # formulaic parses; every term is checked against the formula rules (nothing is evaluated)
    checked = _formulas.check(formula, names, label="formula")
    f = checked.formula
    if not hasattr(f, "lhs") or not hasattr(f, "rhs"):
        raise InputError(f"formula {formula!r} must have an outcome and terms: 'outcome ~ terms'")
    needed = sorted(checked.columns)
    unknown = sorted(checked.unknown)
    for arg, col in (("weights", weights), ("offset", offset)):
        if col is not None and col not in names:
            raise InputError(f"{arg} column {col!r} is not a column of the data")
    if unknown:
        raise InputError(f"formula {formula!r} uses unknown columns {unknown}")
    columns = [c for c in names if c in needed or c in (weights, offset)]
    strings = [c for c in needed if _is_stringlike(meta.dtypes[c])]
    levels: dict[str, list[Any]] = {}
    if strings:
        # global levels: distinct values over all partitions of all imputations
        # (one small task per partition, no shuffle)
        per_part = _passes.compute(client, *[delayed(_distinct)(pt, strings)
                                      for fr in frames for pt in fr[strings].to_delayed()])
        for c in strings:
            vals: set = set()
            for d in per_part:
                vals.update(d[c])
            levels[c] = _sorted_levels(vals)
    probe = _FormulaDesign(None, columns, levels, weights, offset)
    # only the analysis columns of the partition travel to the client
    (first,) = _passes.compute(client, frames[0][columns].get_partition(0))
    try:
        first = probe.prepare(first)
        spec = _formulas.model_matrix(f, first).model_spec
        if _has_state(spec) and frames[0].npartitions > 1:
            # stateful transforms (center, scale, poly, bs, ...): fit them on a sample of
            # every partition of imputation 1 instead of the first partition alone
            per_part = math.ceil(_config.get("analysis.spec-sample-rows") / frames[0].npartitions)
            parts = frames[0].to_delayed()
            samples = _passes.compute(client, *[delayed(_spec_sample)(p, probe, per_part) for p in parts])
            spec = _formulas.model_matrix(f, pd.concat(samples, ignore_index=True)).model_spec
    except InputError:
        raise
    except (FormulaicError, ValueError, TypeError) as e:  # formulaic's encoding raises ValueError too
        raise InputError(f"cannot evaluate formula {formula!r}: {_formula_error(e)}") from None
    lhs_cols = list(spec.lhs.column_names)
    if len(lhs_cols) != 1:
        raise InputError(f"the outcome of formula {formula!r} must be one numeric column, "
                         f"got {len(lhs_cols)} columns")
    terms = [str(t) for t in spec.rhs.column_names]
    design = _FormulaDesign(spec, columns, levels, weights, offset)
    recipes = _column_recipes(spec, columns)
    if recipes is not None:
        direct = _FormulaDesign(spec, columns, levels, weights, offset, recipes)
        sample = first.iloc[::max(1, len(first) // DIRECT_CHECK_ROWS)]
        if _same_design(direct, design, sample):
            design = direct
    return spec, terms, design
