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
    #: categorical dtype: every category of the column in any partition (observed or not), in the
    #: dtype's order; each partition is read, imputed and written with exactly these
    categories: list[Any] | None = None
    why: str = ""  # unsupported: why the column cannot be imputed (names no value)

    @property
    def dtype_of(self) -> Any:
        """The column's dtype in every partition: a categorical dtype with the union of the
        partitions' categories, else None (each partition keeps its own)."""
        if self.categories is None:
            return None
        return pd.CategoricalDtype(self.categories, ordered=self.ordered)

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


def _object_types(s: pd.Series) -> list[str]:
    """Names of the Python types of the observed values of an object column (str, int, ...)."""
    obs = s.dropna()
    return sorted({"str" if isinstance(v, str) else type(v).__name__ for v in obs})


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
        elif pd.api.types.is_complex_dtype(s.dtype):
            info["family"] = "other"
        elif _is_numeric(s):
            info["family"] = "numeric"
            x = s[~miss].to_numpy(dtype=np.float64, na_value=np.nan)
            finite = np.isfinite(x)
            info["n_inf"] = int((~finite).sum())
            x = x[finite]
            # sum, and sum of squares about a per-partition shift (combined exactly later), in
            # units of powers of two so that values near the float range do not overflow
            absmax = float(np.abs(x).max()) if len(x) else 0.0
            e = int(np.frexp(absmax)[1])
            info["sum_exp"] = e
            info["sum_s"] = float(np.ldexp(x, -e).sum())
            shift = float(x[0]) if len(x) else 0.0
            info["shift"] = shift
            dev = np.ldexp(x, -e) - np.ldexp(shift, -e)
            e2 = int(np.frexp(np.abs(dev).max())[1]) + e if len(x) else 0
            info["ss_exp"] = e2
            info["ss"] = float((np.ldexp(dev, e - e2) ** 2).sum())
            # every float beyond 2**53 is a whole number: such columns do not count as integers
            info["integer"] = bool(np.all(x == np.round(x))) and absmax < 2.0 ** 53
            info["min"] = float(x.min()) if len(x) else None
            uniq = np.unique(x[: 100_000]) if len(x) else np.array([])
            if len(uniq) <= 2:
                uniq, cnt = np.unique(x, return_counts=True)
                if len(uniq) <= 2:
                    info["distinct_counts"] = cnt.tolist()  # for the small-cell rule (dmice.disclosure)
            info["distinct"] = uniq[:3].tolist()
        elif pd.api.types.is_string_dtype(s.dtype) or s.dtype == object:
            types = _object_types(s) if s.dtype == object else ["str"]
            if any(t != "str" for t in types):
                # numbers, dates, ... in an object column: its values would come back as text
                info["family"] = "mixed"
                info["types"] = types
            else:
                info["family"] = "string"
                vc = s[~miss].astype(str).value_counts()
                if len(vc) <= MAX_LEVELS:
                    info["counts"] = {str(k): int(c) for k, c in vc.items()}
                info["distinct"] = sorted(map(str, vc.index[: MAX_LEVELS + 1]))
        else:
            info["family"] = "other"
        out[name] = info
    return out


def union_order(orders: list[list[Any]], name: str) -> list[Any]:
    """One order of the categories of an ordered categorical column that agrees with the order
    of every partition (``orders``, each a list of categories in its partition's order).

    Raises InputError naming the column when two partitions order two categories differently,
    or when the partitions do not say how two categories compare (e.g. ``[a, b]`` and ``[a, c]``).
    """
    cats: list[Any] = []
    for o in orders:
        for c in o:
            if c not in cats:
                cats.append(c)
    pos = {c: i for i, c in enumerate(cats)}
    after: dict[int, set[int]] = {i: set() for i in range(len(cats))}
    for o in orders:
        for a, b in zip(o, o[1:]):
            after[pos[a]].add(pos[b])
    indeg = {i: 0 for i in after}
    for nxt in after.values():
        for k in nxt:
            indeg[k] += 1
    out: list[Any] = []
    ready = [i for i in after if indeg[i] == 0]
    while ready:
        if len(ready) > 1:
            raise InputError(f"ordered categorical column {name!r}: the partitions (input files) have "
                             f"categories whose order no partition gives ({len(cats)} categories in all); "
                             "give the column one ordered dtype with every category before imputing")
        i = ready.pop()
        out.append(cats[i])
        for k in after[i]:
            indeg[k] -= 1
            if indeg[k] == 0:
                ready.append(k)
    if len(out) < len(cats):
        raise InputError(f"ordered categorical column {name!r}: the partitions (input files) order its "
                         "categories differently; give the column one ordered dtype before imputing")
    return out


def _union_categories(name: str, infos: list[dict[str, Any]]) -> tuple[list[Any], bool]:
    """Every category of a categorical column over all partitions, and whether it is ordered."""
    flags = {bool(i["ordered"]) for i in infos}
    if len(flags) > 1:
        raise InputError(f"categorical column {name!r} is ordered in some partitions (input files) "
                         "and unordered in others; give it one dtype before imputing")
    ordered = flags.pop() if flags else False
    orders = [list(i["categories"]) for i in infos]
    if ordered:
        return union_order([o for o in orders if o], name), True
    cats: list[Any] = []
    seen: set[Any] = set()
    for o in orders:
        for c in o:
            if c not in seen:
                seen.add(c)
                cats.append(c)
    return cats, False


def _family(name: str, infos: list[dict[str, Any]]) -> str:
    """The family of a column from the partitions that hold observed values of it."""
    fams = {i["family"] for i in infos if i["n"] > i["n_missing"]} or {i["family"] for i in infos}
    if len(fams) > 1 and "mixed" not in fams:
        if fams <= {"string", "bool"}:  # an object column of text in some files, True/False in others
            return "mixed"
        raise InputError(f"column {name!r} has values of different kinds in different partitions "
                         f"(input files): {sorted(fams)}; give it one dtype before imputing")
    return "mixed" if "mixed" in fams else (fams.pop() if fams else "other")


def combine_summaries(parts: list[dict[str, dict[str, Any]]], dtypes: pd.Series) -> list[Variable]:
    """Combine per-partition summaries into variables (kinds, levels, moments).

    Categorical columns get the union of every partition's categories (``Variable.categories``;
    an ordered column an order that agrees with every partition's, else InputError), so that all
    partitions are imputed and written with one dtype.
    """
    variables = []
    for name in dtypes.index:
        infos = [p[name] for p in parts]
        n = sum(i["n"] for i in infos)
        n_miss = sum(i["n_missing"] for i in infos)
        dtype = dtypes[name]
        family = _family(str(name), infos) if infos else "other"
        var = Variable(name=str(name), dtype=str(dtype), kind=UNSUPPORTED, n_missing=n_miss,
                       n_observed=n - n_miss)
        if family == "numeric":
            infos = [i for i in infos if i["family"] == "numeric"]
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
                    var.center, var.scale = _moments(str(name), infos, nobs)
        elif family == "bool":
            var.kind = BINARY
            var.levels = [False, True]
        elif family == "category":
            cats, var.ordered = _union_categories(str(name), infos)
            var.categories = cats
            counts: dict[Any, int] = dict.fromkeys(cats, 0)
            for i in infos:
                for c, k in zip(i["categories"], i["counts"]):
                    counts[c] += k
            # categories never observed are kept in the dtype but not modelled (never imputed)
            var.levels = [c for c in cats if counts[c] > 0]
            var.counts = [counts[c] for c in var.levels]
            if len(var.levels) == 2:
                var.kind = BINARY
            elif len(var.levels) > 2 or len(var.levels) == 1:
                var.kind = ORDINAL if var.ordered and len(var.levels) > 2 else NOMINAL
        elif family == "string":
            levels = sorted(set().union(*[set(i["distinct"]) for i in infos]))
            if len(levels) > MAX_LEVELS:
                var.kind = UNSUPPORTED
                var.why = (f"more than {MAX_LEVELS} distinct values, too many for a categorical "
                           "variable")
            else:
                var.levels = levels
                if all("counts" in i for i in infos):
                    var.counts = [sum(i["counts"].get(lev, 0) for i in infos) for lev in levels]
                var.kind = BINARY if len(levels) == 2 else NOMINAL
        elif family == "mixed":
            types = sorted(set().union(*[set(i.get("types", ["str"])) for i in infos
                                         if i["family"] in ("mixed", "string")]))
            var.why = (f"it holds values of several Python types ({', '.join(types)}) in an object "
                       "column; convert it to one type (numbers, strings or a categorical) first")
        else:
            var.why = f"dtype {dtype} is not supported"
        variables.append(var)
    return variables


def _moments(name: str, infos: list[dict[str, Any]], nobs: int) -> tuple[float, float]:
    """Mean and standard deviation of a numeric column from its partitions' summaries: sums of
    squares about per-partition shifts combined exactly, in units of a power of two of the
    largest value, so that values near the float range (1e160 and beyond) do not overflow.
    Scaling by powers of two is exact, so ordinary columns get the same figures as unscaled."""
    keep = [i for i in infos if i["n"] > i["n_missing"]]
    E = max(i["sum_exp"] for i in keep)

    def scaled(x: float, e: int) -> float:  # x * 2**e, inf past the float range
        with np.errstate(over="ignore"):
            return float(np.ldexp(x, e))

    mean_s = sum(scaled(i["sum_s"], i["sum_exp"] - E) for i in keep) / nobs
    ss = 0.0  # in units of 4**E
    for i in keep:
        k = i["n"] - i["n_missing"]
        shift = scaled(i["shift"], -E)
        d = shift - mean_s
        sumdev = scaled(i["sum_s"], i["sum_exp"] - E) - k * shift
        ss += scaled(i["ss"], 2 * (i["ss_exp"] - E)) + 2 * d * sumdev + k * d * d
    mean = scaled(mean_s, E)
    sd = scaled(math.sqrt(max(ss, 0.0) / max(nobs - 1, 1)), E)
    if not (math.isfinite(mean) and math.isfinite(sd)):
        raise InputError(f"column {name!r} has values too large for dmice's models (their spread "
                         "exceeds the range of floating point numbers); rescale the column first")
    return mean, (sd if sd > 0 else 1.0)


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
        if v.kind != UNSUPPORTED and v.levels is not None and len(v.levels) == 1:
            allowed = ("sample", "")  # one observed level: its missing cells can only take it
        if v.kind == UNSUPPORTED and v.incomplete and method.get(v.name, None) != "":
            raise InputError(f"column {v.name!r} cannot be imputed: {v.why or 'unsupported dtype'} "
                             f"(dtype {v.dtype}, {v.n_missing} missing); pass method={{{v.name!r}: ''}} "
                             "to keep its missing values as they are")
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
        if v.incomplete and v.method and len(allowed) == 2 and v.levels is not None \
                and len(v.levels) == 1:
            events.append({"variable": v.name, "event": "one observed level: its missing values "
                           "take that level (method 'sample')"})
        if v.kind == UNSUPPORTED:
            why = v.why or f"dtype {v.dtype} is not supported"
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


def conform(df: pd.DataFrame, variables: Any) -> pd.DataFrame:
    """Partition ``df`` with the dataset-wide dtype of each categorical column (the union of every
    partition's categories, :attr:`Variable.dtype_of`); other columns are left as they are.

    A partition read from Parquet carries only its own file's categories, and dask's metadata
    often says "unknown categories": imputing or writing with the partition's own dtype would
    turn an imputed category that this partition lacks into a missing value.
    """
    out = None
    for v in variables:
        dt = v.dtype_of
        if dt is None or v.name not in df.columns:
            continue
        col = df[v.name]
        if isinstance(col.dtype, pd.CategoricalDtype) and col.dtype == dt:
            continue
        if out is None:
            out = df.copy(deep=False)
        out[v.name] = col.astype(dt)
    return df if out is None else out
