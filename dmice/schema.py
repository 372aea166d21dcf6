"""Variable kinds, default methods and the encoding layout.

The schema is inferred from one distributed pass of per-partition summaries
(:func:`summarize_partition`, combined with :func:`combine_summaries`) and then
fixed for the whole run: levels of categorical variables are pinned, continuous
variables get the centring and scaling used inside the models, and every usable
variable gets its columns in the encoded design matrix.

Nothing here touches dask; the engine calls these functions inside tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dmice.errors import InputError

#: kinds of variables
CONTINUOUS = "continuous"
BINARY = "binary"
NOMINAL = "nominal"
ORDINAL = "ordinal"
UNSUPPORTED = "unsupported"

#: methods that each kind accepts (the first is the default)
METHODS_FOR_KIND: dict[str, tuple[str, ...]] = {
    CONTINUOUS: ("pmm", "norm", "poisson", "sample", ""),
    BINARY: ("logreg", "logreg.firth", "pmm", "polyreg", "sample", ""),
    NOMINAL: ("polyreg", "sample", ""),
    ORDINAL: ("polr", "polyreg", "sample", ""),
    UNSUPPORTED: ("",),
}
ALL_METHODS = ("norm", "pmm", "poisson", "logreg", "logreg.firth", "polyreg", "polr", "sample", "")

#: default of ``min_level_count``: predictor levels observed fewer times than this share one column.
#: Ten follows the usual events-per-parameter rule for logistic models: a dummy with fewer rows has a
#: standard error of the order of its effect and often separates a binary or categorical target.
MIN_LEVEL_COUNT = 10

#: a string/object column with more distinct values than this is not treated as categorical
MAX_LEVELS = 200


@dataclass
class Variable:
    """One column of the input and how dmice treats it."""

    name: str
    dtype: str
    kind: str
    n_missing: int
    n_observed: int
    levels: list[Any] | None = None  # binary and categorical: the values, code = position
    ordered: bool = False
    center: float = 0.0  # continuous: mean of observed values
    scale: float = 1.0  # continuous: standard deviation of observed values
    integer: bool = False  # numeric column holding integers only
    method: str = ""
    cols: tuple[int, int] = (0, 0)  # [start, stop) in the encoded design matrix
    counts: list[int] | None = None  # categorical: observed rows per level
    minimum: float | None = None  # numeric: smallest observed value
    groups: list[int] | None = None  # categorical predictor: encoded group of each level (0 = reference)
    collapse: dict[str, str] | None = None  # merged levels -> their shared group label
    value_counts: list[int] | None = None  # two-valued numeric column: observed rows per value

    @property
    def incomplete(self) -> bool:
        return self.n_missing > 0

    @property
    def imputed(self) -> bool:
        return self.incomplete and self.method != ""

    @property
    def width(self) -> int:
        return self.cols[1] - self.cols[0]

    @property
    def n_levels(self) -> int:
        return len(self.levels) if self.levels is not None else 0

    def to_dict(self) -> dict[str, Any]:
        levels = None if self.levels is None else [_jsonable(v) for v in self.levels]
        return {
            "name": self.name,
            "dtype": self.dtype,
            "kind": self.kind,
            "method": self.method,
            "n_missing": self.n_missing,
            "n_observed": self.n_observed,
            "levels": levels,
            "ordered": self.ordered,
            **({"collapse": self.collapse} if self.collapse else {}),
        }


@dataclass
class Schema:
    """All variables, in column order, and the layout of the encoded design."""

    variables: list[Variable]
    n_rows: int
    n_cols_encoded: int  # intercept + encoded predictors
    partition_rows: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, name: str) -> Variable:
        for v in self.variables:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variables]

    @property
    def imputed(self) -> list[Variable]:
        return [v for v in self.variables if v.imputed]

    def index(self, name: str) -> int:
        return self.names.index(name)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


# ---------------------------------------------------------------------------
# per-partition summaries


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype)


def _is_bool(s: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(s.dtype):
        return True
    if s.dtype == object:
        obs = s.dropna()
        return len(obs) > 0 and all(isinstance(v, (bool, np.bool_)) for v in obs)
    return False


def summarize_partition(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Small per-column summary of one partition: counts, moments, a few distinct values."""
    out: dict[str, dict[str, Any]] = {}
    for name in df.columns:
        s = df[name]
        miss = s.isna()
        n_miss = int(miss.sum())
        info: dict[str, Any] = {"n": len(s), "n_missing": n_miss}
        if isinstance(s.dtype, pd.CategoricalDtype):
            info["family"] = "category"
            # the partition's own categories: a dask dtype may hold only a placeholder
            info["categories"] = list(s.cat.categories)
            info["ordered"] = bool(s.cat.ordered)
            info["counts"] = np.bincount(s.cat.codes.to_numpy()[~miss.to_numpy()],
                                         minlength=len(s.cat.categories)).tolist()
        elif _is_bool(s):
            info["family"] = "bool"
        elif _is_numeric(s):
            info["family"] = "numeric"
            x = s[~miss].to_numpy(dtype=np.float64, na_value=np.nan)
            finite = np.isfinite(x)
            info["n_inf"] = int((~finite).sum())
            x = x[finite]
            info["sum"] = float(x.sum())
            # sum of squares about a per-partition shift, combined exactly later
            shift = float(x[0]) if len(x) else 0.0
            info["shift"] = shift
            info["ss"] = float(((x - shift) ** 2).sum())
            info["integer"] = bool(np.all(x == np.round(x)))
            info["min"] = float(x.min()) if len(x) else None
            uniq = np.unique(x[: 100_000]) if len(x) else np.array([])
            if len(uniq) <= 2:
                uniq, cnt = np.unique(x, return_counts=True)
                if len(uniq) <= 2:
                    info["distinct_counts"] = cnt.tolist()  # for the small-cell rule (dmice.disclosure)
            info["distinct"] = uniq[:3].tolist()
        elif pd.api.types.is_string_dtype(s.dtype) or s.dtype == object:
            info["family"] = "string"
            vc = s[~miss].astype(str).value_counts()
            if len(vc) <= MAX_LEVELS:
                info["counts"] = {str(k): int(c) for k, c in vc.items()}
            info["distinct"] = sorted(map(str, vc.index[: MAX_LEVELS + 1]))
        else:
            info["family"] = "other"
        out[name] = info
    return out


def combine_summaries(parts: list[dict[str, dict[str, Any]]], dtypes: pd.Series) -> list[Variable]:
    """Combine per-partition summaries into variables (kinds, levels, moments)."""
    variables = []
    for name in dtypes.index:
        infos = [p[name] for p in parts]
        n = sum(i["n"] for i in infos)
        n_miss = sum(i["n_missing"] for i in infos)
        dtype = dtypes[name]
        family = infos[0]["family"] if infos else "other"
        var = Variable(name=str(name), dtype=str(dtype), kind=UNSUPPORTED, n_missing=n_miss,
                       n_observed=n - n_miss)
        if family == "numeric":
            n_inf = sum(i["n_inf"] for i in infos)
            if n_inf:
                raise InputError(f"column {name!r} has {n_inf} infinite values; dmice needs finite "
                                 "numbers or missing values (NaN/NA/None)")
            distinct = sorted(set().union(*[set(i["distinct"]) for i in infos]))
            var.integer = all(i["integer"] for i in infos)
            mins = [i["min"] for i in infos if i.get("min") is not None]
            var.minimum = min(mins) if mins else None
            if len(distinct) == 2:
                var.kind = BINARY
                var.levels = [int(v) if var.integer else float(v) for v in distinct]
                if all("distinct_counts" in i for i in infos):
                    var.value_counts = [sum(c for i in infos for d, c in zip(i["distinct"], i["distinct_counts"])
                                            if d == v) for v in distinct]
            else:
                var.kind = CONTINUOUS
                nobs = var.n_observed
                if nobs:
                    mean = sum(i["sum"] for i in infos) / nobs
                    # exact combination of sums of squares about per-partition shifts
                    ss = 0.0
                    for i in infos:
                        k = i["n"] - i["n_missing"]
                        if k:
                            d = i["shift"] - mean
                            ss += i["ss"] + 2 * d * (i["sum"] - k * i["shift"]) + k * d * d
                    sd = math.sqrt(max(ss, 0.0) / max(nobs - 1, 1))
                    var.center = mean
                    var.scale = sd if sd > 0 else 1.0
        elif family == "bool":
            var.kind = BINARY
            var.levels = [False, True]
        elif family == "category":
            counts: dict[Any, int] = {}
            for i in infos:
                for c, k in zip(i["categories"], i["counts"]):
                    counts[c] = counts.get(c, 0) + k
            # categories never observed are kept in the dtype but not modelled (never imputed)
            var.levels = [c for c, k in counts.items() if k > 0]
            var.counts = [counts[c] for c in var.levels]
            var.ordered = bool(infos[0]["ordered"])
            if len(var.levels) == 2:
                var.kind = BINARY
            elif len(var.levels) > 2:
                var.kind = ORDINAL if var.ordered else NOMINAL
        elif family == "string":
            levels = sorted(set().union(*[set(i["distinct"]) for i in infos]))
            if len(levels) > MAX_LEVELS:
                var.kind = UNSUPPORTED
            else:
                var.levels = levels
                if all("counts" in i for i in infos):
                    var.counts = [sum(i["counts"].get(lev, 0) for i in infos) for lev in levels]
                var.kind = BINARY if len(levels) == 2 else NOMINAL
        variables.append(var)
    return variables


# ---------------------------------------------------------------------------
# methods and layout


def assign_methods(variables: list[Variable], method: dict[str, str] | None) -> list[dict[str, Any]]:
    """Choose each variable's method (defaults from its kind, overrides from ``method``).

    Returns logged events (dicts) for decisions the user should know about.
    """
    events: list[dict[str, Any]] = []
    method = dict(method or {})
    names = {v.name for v in variables}
    unknown = [k for k in method if k not in names]
    if unknown:
        raise InputError(f"method names unknown columns: {unknown}; columns are {sorted(names)}")
    for v in variables:
        if v.incomplete and v.n_observed == 0:
            raise InputError(f"column {v.name!r} has every value missing ({v.n_missing} rows); "
                             "drop it or supply observed values")
        allowed = METHODS_FOR_KIND[v.kind]
        if v.name in method:
            m = method[v.name]
            if m not in ALL_METHODS:
                raise InputError(f"method for column {v.name!r} must be one of "
                                 f"{list(ALL_METHODS)}, got {m!r}")
            if m not in allowed:
                raise InputError(f"method {m!r} does not fit column {v.name!r} of kind {v.kind} "
                                 f"(dtype {v.dtype}); allowed: {list(allowed)}")
            if m == "pmm" and v.kind == BINARY and v.levels is not None \
                    and not all(isinstance(x, (int, float)) for x in v.levels):
                raise InputError(f"method 'pmm' needs a numeric column; {v.name!r} has dtype {v.dtype}")
            if m == "poisson" and v.incomplete and not (v.integer and (v.minimum or 0.0) >= 0):
                raise InputError(f"method 'poisson' needs non-negative integer counts; column {v.name!r} "
                                 "has negative or non-integer values")
            v.method = m if v.incomplete else ""
        else:
            v.method = allowed[0] if v.incomplete else ""
        if v.kind == UNSUPPORTED:
            why = ("too many distinct values for a categorical variable"
                   if v.dtype in ("object", "str", "string") else f"dtype {v.dtype} is not supported")
            events.append({"variable": v.name, "event": f"not used: {why}; "
                           + ("its missing values stay missing" if v.incomplete else "kept as is")})
        elif v.incomplete and v.method == "":
            events.append({"variable": v.name, "event": "incomplete and not imputed: not used as a "
                           f"predictor ({v.n_missing} missing)"})
    return events


def collapse_levels(variables: list[Variable], min_level_count: int = MIN_LEVEL_COUNT,
                    collapse: dict[str, dict[Any, Any]] | None = None) -> list[dict[str, Any]]:
    """Merge rare or user-grouped levels of categorical predictors into shared design columns.

    Each level of a nominal or ordinal variable gets a group (``Variable.groups``); levels of
    one group share one dummy column in the encoded design of the *predictors*.  The variable
    itself keeps all its levels when it is imputed: collapsing changes how it predicts other
    variables, never the values it can take.

    Parameters
    ----------
    variables : list of Variable
    min_level_count : int
        Levels observed fewer times merge into one group ``"other"``; when that group is itself
        observed fewer times it joins the reference group (the group of the first level).
        ``0`` or ``1`` disables automatic merging.
    collapse : dict, optional
        ``{column: {level: group label}}``: explicit merges, applied before the automatic rule.

    Returns
    -------
    list of dict
        Logged events (column names and counts only); the mapping is kept in
        ``Variable.collapse`` (recorded in the manifest).
    """
    events: list[dict[str, Any]] = []
    collapse = dict(collapse or {})
    by_name = {v.name: v for v in variables}
    for name, mapping in collapse.items():
        if name not in by_name:
            raise InputError(f"collapse names unknown column {name!r}")
        v = by_name[name]
        if v.kind not in (NOMINAL, ORDINAL):
            raise InputError(f"collapse: column {name!r} is {v.kind}, not a categorical column with "
                             "more than two levels")
        if not isinstance(mapping, dict):
            raise InputError(f"collapse[{name!r}] must be a dict of level -> group label")
        known = {str(lev) for lev in v.levels or []}
        bad = [k for k in mapping if str(k) not in known]
        if bad:
            raise InputError(f"collapse[{name!r}] names {len(bad)} level(s) the column does not have")
    for v in variables:
        if v.kind not in (NOMINAL, ORDINAL) or not v.levels:
            continue
        label = [str(lev) for lev in v.levels]
        user = {str(k): str(g) for k, g in collapse.get(v.name, {}).items()}
        label = [user.get(lab, lab) for lab in label]
        n_user = sum(1 for lev in v.levels if str(lev) in user)
        counts = v.counts
        n_rare = 0
        if counts is not None and min_level_count > 1:
            tot: dict[str, int] = {}
            for lab, k in zip(label, counts):
                tot[lab] = tot.get(lab, 0) + k
            rare = {lab for lab, k in tot.items() if k < min_level_count}
            if len(rare) >= 1 and len(tot) > 2:
                other = "other" if "other" not in tot or "other" in rare else "other (merged)"
                n_rare = sum(1 for lab in label if lab in rare)
                label = [other if lab in rare else lab for lab in label]
                k_other = sum(k for lab, k in zip(label, counts) if lab == other)
                if k_other < min_level_count and label[0] != other:
                    label = [label[0] if lab == other else lab for lab in label]
        order: dict[str, int] = {}
        for lab in label:
            order.setdefault(lab, len(order))
        groups = [order[lab] for lab in label]
        if groups == list(range(len(groups))):
            continue
        v.groups = groups
        v.collapse = {str(lev): lab for lev, lab in zip(v.levels, label) if str(lev) != lab}
        msg = f"{len(v.levels)} levels encoded as {len(order)} groups"
        if n_rare:
            msg += f"; {n_rare} level(s) observed fewer than {min_level_count} times merged"
        if n_user:
            msg += f"; {n_user} level(s) merged as given in collapse"
        events.append({"variable": v.name, "event": f"predictor levels collapsed: {msg}"})
    return events


def layout(variables: list[Variable]) -> int:
    """Assign each predictor its columns in the encoded design; column 0 is the intercept."""
    pos = 1
    for v in variables:
        usable = v.kind != UNSUPPORTED and (not v.incomplete or v.imputed)
        if not usable:
            v.cols = (pos, pos)
            continue
        if v.kind in (NOMINAL, ORDINAL):
            width = (max(v.groups) if v.groups is not None else v.n_levels - 1)
        else:
            width = 1
        v.cols = (pos, pos + width)
        pos += width
    return pos


# ---------------------------------------------------------------------------
# value <-> code conversion


def to_codes(s: pd.Series, var: Variable) -> np.ndarray:
    """Internal numeric representation of a column: raw float, or the level's position; NaN if missing."""
    if var.kind == CONTINUOUS:
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    if var.levels is None:
        return np.full(len(s), np.nan)
    miss = s.isna().to_numpy()
    out = np.full(len(s), np.nan)
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes = s.cat.codes.to_numpy()
        cats = list(s.cat.categories)
        if cats != list(var.levels):
            pos = {c: i for i, c in enumerate(var.levels)}
            mapping = np.array([pos.get(c, -1) for c in cats])
            codes = np.where(codes >= 0, mapping[np.maximum(codes, 0)], -1)
        out[~miss] = codes[~miss]
        return out
    if isinstance(var.levels[0], str):  # string column: levels are its sorted distinct values
        lookup = {lev: i for i, lev in enumerate(var.levels)}
        out[~miss] = s[~miss].astype(str).map(lookup).to_numpy(dtype=np.float64)
        return out
    # numeric or boolean two-level column
    x = s[~miss].to_numpy(dtype=np.float64)
    lo, hi = float(var.levels[0]), float(var.levels[1])
    out[~miss] = np.where(x == hi, 1.0, 0.0)
    if np.any((x != lo) & (x != hi)):
        raise InputError(f"column {var.name!r} has more than two values in a partition")
    return out


def from_codes(codes: np.ndarray, var: Variable, like: pd.Series) -> pd.Series:
    """Turn internal values back into the column's own dtype (for imputed cells)."""
    if var.kind == CONTINUOUS:
        vals = codes
        if var.integer and pd.api.types.is_integer_dtype(like.dtype):
            vals = np.round(vals)
        return pd.Series(vals).astype(like.dtype)
    levels = var.levels or []
    idx = codes.astype(np.int64)
    if isinstance(like.dtype, pd.CategoricalDtype):
        return pd.Series(pd.Categorical(np.asarray(levels, dtype=object)[idx], dtype=like.dtype))
    vals = np.asarray(levels, dtype=object)[idx]
    if pd.api.types.is_bool_dtype(like.dtype) or like.dtype == object:
        return pd.Series(list(vals), dtype=like.dtype)
    return pd.Series(list(vals)).astype(like.dtype)
