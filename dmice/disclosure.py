"""The small-cell rule: what dmice writes *about* the data names no rare value.

The completed data keep every value.  Everything written beside them (the manifest, the
chain statistics, the plots, the report, the logs) follows one rule with one threshold,
``min_cell_count`` (default :data:`MIN_CELL_COUNT`), set once by :func:`dmice.impute` and
recorded in the manifest:

* a level (of a categorical, string or two-valued numeric column) observed fewer than
  ``min_cell_count`` times is never named: it is counted in a group labelled
  ``"other (k levels)"``;
* every count written (histogram bins, level counts; observed cells and the imputed cells of
  each imputation) is 0 or at least ``min_cell_count``: smaller cells are merged with a
  neighbour, and a row whose total is itself below the threshold is not written at all;
* histogram edges never lie at a value of the data: they lie on a grid of round numbers
  spanning the ``min_cell_count``-th smallest to the ``min_cell_count``-th largest observed
  value, rounded outward, and the first and last bins are open-ended.

``min_cell_count=1`` switches the rule off.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dmice.errors import InputError

#: default threshold of the small-cell rule (counts below it are merged or not written)
MIN_CELL_COUNT = 10


def check(min_cell_count: Any) -> int:
    if isinstance(min_cell_count, bool) or not isinstance(min_cell_count, (int, np.integer)) \
            or min_cell_count < 1:
        raise InputError(f"min_cell_count must be an integer >= 1 (1 switches the small-cell rule off), "
                         f"got {min_cell_count!r}")
    return int(min_cell_count)


def other_label(k: int) -> str:
    """The neutral label of ``k`` levels that are not named."""
    return f"other ({k} level{'' if k == 1 else 's'})"


# ---------------------------------------------------------------------------
# levels


def observed_counts(v: Any) -> list[int] | None:
    """Observed rows per level of a schema variable, when known (categorical and string columns,
    two-valued numeric columns); None for booleans (whose levels are not data) and others."""
    if v.levels is None:
        return None
    if v.counts is not None:
        return list(v.counts)
    vc = getattr(v, "value_counts", None)
    return list(vc) if vc is not None else None


def named(v: Any, min_cell_count: int) -> list[bool] | None:
    """Whether each level of ``v`` may be named (observed at least ``min_cell_count`` times)."""
    if v.levels is None:
        return None
    counts = observed_counts(v)
    if counts is None:
        # booleans: False/True are not values of the data; anything else unknown is not named
        return [isinstance(lev, (bool, np.bool_)) for lev in v.levels]
    return [c >= min_cell_count for c in counts]


def public_labels(v: Any, min_cell_count: int, label: Any = str) -> dict[str, str]:
    """``label(level) -> public label`` for every level of ``v``: its own label when it may be
    named, else the shared ``"other (k levels)"``."""
    ok = named(v, min_cell_count)
    if ok is None:
        return {}
    k = sum(1 for x in ok if not x)
    return {label(lev): (label(lev) if good else other_label(k)) for lev, good in zip(v.levels, ok)}


def public_variable(v: Any, min_cell_count: int) -> dict[str, Any]:
    """The manifest's entry of a variable: :meth:`Variable.to_dict` with only the levels that may
    be named (``other_levels``: how many are not) and without rare levels in ``collapse``."""
    d = v.to_dict()
    ok = named(v, min_cell_count)
    if ok is not None:
        d["levels"] = [lev for lev, good in zip(d["levels"], ok) if good]
        if not all(ok):
            d["other_levels"] = sum(1 for x in ok if not x)
    if "collapse" in d:
        c = public_collapse(v, min_cell_count)
        if c:
            d["collapse"] = c
        else:
            d.pop("collapse")
    return d


def public_collapse(v: Any, min_cell_count: int) -> dict[str, str]:
    """``Variable.collapse`` without the levels that may not be named (the rare levels merged by
    ``min_level_count`` are counted in the variable's ``other_levels`` instead)."""
    if not v.collapse:
        return {}
    ok = named(v, min_cell_count) or []
    good = {str(lev) for lev, g in zip(v.levels or [], ok) if g}
    return {k: g for k, g in v.collapse.items() if k in good}


def public_mapping(mapping: Any, variables: list[Any], min_cell_count: int) -> Any:
    """A ``{column: {level: ...}}`` argument (``collapse=``) without keys that are rare levels."""
    if not isinstance(mapping, dict):
        return mapping
    by = {v.name: v for v in variables}
    out = {}
    for col, m in mapping.items():
        v = by.get(col)
        if v is None or not isinstance(m, dict):
            out[col] = m
            continue
        ok = named(v, min_cell_count) or []
        good = {str(lev) for lev, g in zip(v.levels or [], ok) if g}
        out[col] = {str(k): g for k, g in m.items() if str(k) in good}
    return out


# ---------------------------------------------------------------------------
# cells


def active_rows(rows: np.ndarray, min_cell_count: int) -> np.ndarray:
    """Rows (observed, imputed 1..m) whose total is 0 or at least ``min_cell_count``: the others
    cannot be written at all (any cell of theirs, even all merged, is small)."""
    tot = rows.sum(axis=1)
    return (tot == 0) | (tot >= min_cell_count)


def _ok(acc: np.ndarray, t: int) -> bool:
    return bool(np.all((acc == 0) | (acc >= t)))


def merge_runs(rows: np.ndarray, min_cell_count: int) -> list[tuple[int, int]]:
    """Consecutive cells ``[start, stop)`` such that every group's count in every row of ``rows``
    (rows x cells, rows whose totals are 0 or >= the threshold) is 0 or >= ``min_cell_count``.

    Greedy from the left: a group closes as soon as it satisfies the rule; a last group that does
    not is merged with the groups before it until it does."""
    t = min_cell_count
    ncell = rows.shape[1]
    groups: list[tuple[int, int]] = []
    start = 0
    acc = np.zeros(rows.shape[0], dtype=np.int64)
    for i in range(ncell):
        acc = acc + rows[:, i]
        if _ok(acc, t):
            groups.append((start, i + 1))
            start, acc = i + 1, np.zeros_like(acc)
    if start < ncell:
        while not _ok(acc, t) and groups:
            a, _ = groups.pop()
            acc = acc + rows[:, a:start].sum(axis=1)
            start = a
        groups.append((start, ncell))
    return groups


def merge_levels(labels: list[str], rows: np.ndarray, min_cell_count: int, ordered: bool,
                 rare: list[bool]) -> tuple[list[str], list[list[int]]]:
    """Groups of levels whose counts follow the rule: ``(group labels, member positions)``.

    ``rare``: levels that may not be named whatever their counts.  Ordered levels are merged
    with their neighbours (a merged group is labelled ``"levels i-j"`` by position); unordered
    ones join one ``"other (k levels)"`` group, which, when itself small, takes in the named
    level with the fewest observed cells."""
    t = min_cell_count
    n = len(labels)
    if ordered:
        # a rare level is observed fewer than t times (but at least once): a small cell, merged
        members = [list(range(a, b)) for a, b in merge_runs(rows, t)]
        names = [labels[g[0]] if len(g) == 1 and not rare[g[0]] else f"levels {g[0] + 1}-{g[-1] + 1}"
                 for g in members]
        return names, members
    keep = [i for i in range(n) if not rare[i]]
    other = [i for i in range(n) if rare[i]]
    while True:
        small = [i for i in keep if not _ok(rows[:, i], t)]
        if other and not _ok(rows[:, other].sum(axis=1), t) and keep:
            small = small or [min(keep, key=lambda i: (rows[0, i], i))]
        if not small:
            break
        keep = [i for i in keep if i not in small]
        other = sorted(other + small)
        if not keep:
            break
    names = [labels[i] for i in keep]
    members = [[i] for i in keep]
    if other:
        names.append(other_label(len(other)))
        members.append(other)
    return names, members


# ---------------------------------------------------------------------------
# histogram grids: computed in tasks, so that only the rounded grid reaches the client


def extremes(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The ``k`` smallest and ``k`` largest finite values of ``x`` (sorted) and their count."""
    x = x[np.isfinite(x)]
    n = len(x)
    if n > k:
        lo = np.sort(np.partition(x, k - 1)[:k])
        hi = np.sort(np.partition(x, n - k)[n - k:])
    else:
        lo = hi = np.sort(x)
    return lo, hi, n


def merge_extremes(a: tuple[np.ndarray, np.ndarray, int], b: tuple[np.ndarray, np.ndarray, int],
                   k: int) -> tuple[np.ndarray, np.ndarray, int]:
    lo = np.sort(np.concatenate([a[0], b[0]]))[:k]
    hi = np.sort(np.concatenate([a[1], b[1]]))
    return lo, hi[max(0, len(hi) - k):], a[2] + b[2]


def nice(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``x`` (> 0)."""
    p = 10.0 ** math.floor(math.log10(x))
    for f in (1.0, 2.0, 2.5, 5.0, 10.0):
        if f * p >= x * (1 - 1e-12):
            return f * p
    return 10.0 * p  # pragma: no cover - rounding


def grid(ext: tuple[np.ndarray, np.ndarray, int], k: int, bins: int, integer: bool) -> dict[str, Any]:
    """A grid of at most about ``bins`` equal bins of a round width whose outer edges are
    rounded outward from the ``k``-th smallest and ``k``-th largest value (never a value's own).

    Integer-valued variables: edges at half-integers, a whole number of values per bin."""
    lo, hi, n = ext
    if n == 0:
        a = b = 0.0
    else:
        a, b = float(lo[min(k, n) - 1]), float(hi[-min(k, n)])
        a, b = min(a, b), max(a, b)
    try:
        if integer:
            w = float(max(1, int(nice(max(1.0, math.ceil((b - a + 1) / bins))))))
            start = math.floor(a / w) * w - 0.5
        else:
            base = (b - a) if b > a else (abs(a) if a != 0 else 1.0)
            w = nice(base / bins)
            start = math.floor(a / w) * w
        cells = int(math.floor((b - start) / w)) + 1
    except (OverflowError, ValueError):  # a span beyond the float range: every value in the tails
        return {"start": 0.0, "width": 1.0, "bins": 1, "integer": bool(integer)}
    return {"start": start, "width": w, "bins": cells, "integer": bool(integer)}


def inner_edges(g: dict[str, Any]) -> np.ndarray:
    """The finite edges of a grid (bins + 1), rounded to the grid's own precision."""
    w = g["width"]
    e = g["start"] + w * np.arange(g["bins"] + 1)
    digits = max(0, 2 - math.floor(math.log10(w))) if w > 0 else 0
    return np.round(e, min(digits, 15))


def bin_counts(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``x`` in the open-ended bins ``(-inf, e0), [e0, e1), ..., [eK, inf)``."""
    x = x[np.isfinite(x)]
    return np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
