"""Partition groups: the m completed versions of one partition, designed once and kept where
they are designed; their statistics at given estimates (one task per group and pass).

The design of every imputation but the first is imputation 1's, patched where its analysis
columns differ (the imputed cells): completed data sets share their observed values.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dmice import store
from dmice.analysis.spec import _fill_column
from dmice.errors import InputError
from dmice.glm import irls as _irls
from dmice.glm.irls import PatchedX, array_stats
from dmice.glm.links import check_outcome, outcome_constants


def _partition_stats(df: pd.DataFrame, design: Callable[[pd.DataFrame], tuple], family: str,
                     link: str, beta: np.ndarray | None) -> dict[str, Any]:
    """:func:`array_stats` of the design ``(X, y, w, offset)`` of one pandas partition."""
    X, y, w, off = _arrays(design(design.prepare(df)) if hasattr(design, "prepare") else design(df))
    check_outcome(family, y)
    return array_stats(X, y, w, off, family, link, beta)


def _arrays(d: tuple) -> tuple:
    """The design as float arrays, X in column-major order (the passes' products with X are
    faster on it)."""
    X, y, w, off = d
    return (np.asarray(X, dtype=float, order="F"), np.asarray(y, dtype=float),
            None if w is None else np.asarray(w, dtype=float),
            None if off is None else np.asarray(off, dtype=float))


def _sum(items: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(items[0])
    for it in items[1:]:
        out = {k: out[k] + it[k] for k in out}
    return out


# ------------------------------------------------------------------------------------------
# partition groups: the m completed versions of one partition, designed once
# ------------------------------------------------------------------------------------------


def _rows_differ(a: pd.DataFrame, b: pd.DataFrame, columns: list[str] | None = None) -> np.ndarray:
    """Boolean mask of the rows where any of the ``columns`` (default: all) of ``a`` differs
    from ``b`` (same length)."""
    mask = np.zeros(len(a), dtype=bool)
    for c in (a.columns if columns is None else columns):
        x, y = a[c], b[c]
        if (isinstance(x.dtype, pd.CategoricalDtype) and isinstance(y.dtype, pd.CategoricalDtype)
                and list(x.cat.categories) == list(y.cat.categories)):
            mask |= x.cat.codes.to_numpy() != y.cat.codes.to_numpy()
        else:
            xa, ya = x.to_numpy(), y.to_numpy()
            try:
                mask |= np.asarray(xa != ya, dtype=bool)
            except (TypeError, ValueError):
                mask |= np.array([not (p == q) for p, q in zip(xa, ya)], dtype=bool)
    return mask


def _differs(a: pd.DataFrame, b: pd.DataFrame, column: str, head: int = 4096) -> bool:
    """Whether the ``column`` of ``a`` differs from ``b``'s in any row; its first ``head`` rows
    are compared first (an imputed column usually differs there)."""
    if _rows_differ(a.iloc[:head], b.iloc[:head], [column]).any():
        return True
    return len(a) > head and bool(_rows_differ(a, b, [column]).any())


@dataclass
class _Group:
    """Design arrays of one partition in every imputation of the group.

    The first imputation's arrays are complete; every other imputation keeps only the
    rows where its analysis columns differ from the first (``rows``), or all its rows
    (``rows is None``) when the partitions are not the same length or when more than
    half of its rows differ.  With a direct design, an imputation's X is a
    :class:`PatchedX` of the first's instead (``rows is None``).
    """

    ks: list[int]
    base: tuple
    diffs: list[tuple[np.ndarray | None, tuple] | None]
    consts: dict[int, dict[str, float]] = field(default_factory=dict)
    work: np.ndarray | None = None  # scratch space of the passes (see array_stats)
    #: imputations whose files are read when first needed (see :func:`_load_group`):
    #: position -> its :class:`dmice.store.StoredPart`, and what reading them needs
    later: dict[int, Any] = field(default_factory=dict)
    source: tuple | None = None  # (design, family, first's prepared frame, its file's path)
    lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # a lock does not travel
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    def __sizeof__(self) -> int:  # the arrays' bytes, for dask's memory and transfer costs
        arrays = [*self.base, self.work]
        for d in self.diffs:
            if d is not None:
                arrays += [d[0], *d[1]]
        return 1000 + sum(a.nbytes for a in arrays if isinstance(a, (np.ndarray, PatchedX)))

    def load(self, j: int) -> None:
        """Read and design imputation ``j``'s file if it was deferred (once, whichever task
        asks first: a pass that needs it or the prefetch that fills the worker's idle time)."""
        if j not in self.later:
            return
        with self.lock:
            part = self.later.get(j)
            if part is None:
                return
            design, family, first, path = self.source
            # this imputation's own columns laid onto imputation 1's prepared frame: only
            # they are checked and cast
            full, mine = part.onto(first, path)
            if hasattr(design, "prepare"):
                full = design.prepare(full, only=mine)
            self.diffs[j] = _design_diff(design, family, self.base, first, full, mine)
            del self.later[j]
            if not self.later:
                self.source = None

    def arrays(self, j: int) -> tuple:
        self.load(j)
        if j == 0 or self.diffs[j] is None:
            return self.base
        rows, arr = self.diffs[j]
        if rows is None:
            return arr
        out = []
        for full, part in zip(self.base, arr):
            if full is None:
                out.append(None)
                continue
            full = full.copy(order="K")  # X stays column-major
            full[rows] = part
            out.append(full)
        return tuple(out)


def _stored_files(data: Any) -> list[list[Any]] | None:
    """The Parquet files of a result read from a written output, by imputation and
    partition (see :func:`dmice.store.stored_parts`; ``None`` for a result held on the
    cluster or frames)."""
    from dmice.result import MultipleImputation

    if not isinstance(data, MultipleImputation) or data._engine is not None or data.url is None:
        return None
    return store.stored_parts(data.url, data.manifest or {}, data._storage_options, data.m, data.columns,
                              set(data.imputed_columns), data.dtypes)


def _load_group(design: Any, family: str, ks: list[int], *parts: Any, defer: bool = False
                ) -> _Group:
    """Build the design of one partition for the imputations ``ks`` (one pandas frame or
    :class:`dmice.store.StoredPart` each).

    The formula is evaluated once on the first imputation's partition and, for every
    other imputation, only on the rows whose analysis columns differ from it (the
    imputed cells): completed data sets share their observed values.  When more than
    half of the rows differ, it is evaluated on the whole partition instead.

    With ``defer`` and stored parts, only the first imputation's file is read here; the
    others are read when first needed (:meth:`_Group.load`), so that their reading can
    fill the worker's idle time between the first imputation's passes (see :func:`_fit`).
    """
    prepare = getattr(design, "prepare", lambda d: d)
    if defer and len(parts) > 1 and isinstance(parts[0], store.StoredPart):
        dfs, _ = store.read_group(parts[:1], getattr(design, "columns", None))
        first = prepare(dfs[0])
        base = _arrays(design(first))
        check_outcome(family, base[1])
        return _Group(list(ks), base, [None] * len(parts),
                      later={j: p for j, p in enumerate(parts) if j},
                      source=(design, family, first, parts[0].path))
    dfs, own = store.read_group(parts, getattr(design, "columns", None))
    frames = [prepare(p) for p in dfs]
    base = _arrays(design(frames[0]))
    check_outcome(family, base[1])
    diffs: list[tuple[np.ndarray | None, tuple] | None] = [None]
    for df in frames[1:]:
        diffs.append(_design_diff(design, family, base, frames[0], df, own))
    return _Group(list(ks), base, diffs)


def _prefetch(group: _Group, j: int) -> None:
    """Task: read and design the group's imputation at position ``j`` now (see :func:`_fit`)."""
    group.load(j)


def _design_diff(design: Any, family: str, base: tuple, first: pd.DataFrame, df: pd.DataFrame,
                 own: list[str] | None) -> tuple[np.ndarray | None, tuple] | None:
    """The entry of :attr:`_Group.diffs` of the prepared frame ``df`` against the first
    imputation's ``first`` (arrays ``base``); ``own``: the columns that can differ (``None``:
    any)."""
    if len(df) != len(first):
        arr = _arrays(design(df))
        check_outcome(family, arr[1])
        return None, arr
    differ = None if own is None else [c for c in df.columns if c in own]
    if getattr(design, "recipes", None) is not None:
        return _patched(design, family, base, first, df, differ)
    rows = np.flatnonzero(_rows_differ(df, first, differ))
    if not len(rows):
        return None
    if 2 * len(rows) > len(df):
        # most rows differ: the whole partition's arrays (at most twice the memory of the
        # differing rows alone), so that a pass does not rebuild them
        arr = _arrays(design(df))
        check_outcome(family, arr[1])
        return None, arr
    arr = _arrays(design(df.iloc[rows]))
    check_outcome(family, arr[1])
    return rows, arr


def _patched(design: Any, family: str, base: tuple, first: pd.DataFrame, df: pd.DataFrame,
             differ: list[str] | None) -> tuple[None, tuple] | None:
    """The arrays of frame ``df`` as a :class:`PatchedX` of ``base`` (the arrays of
    ``first``): only the model columns reading a column that differs are recomputed, and
    the outcome, weights and offset are ``df``'s own where they differ (``None``: nothing
    differs)."""
    cols = df.columns if differ is None else differ
    changed = [c for c in cols if _differs(df, first, c)]
    if not changed:
        return None
    ycol, recipes = design.recipes
    js = [j for j, factors in enumerate(recipes) if any(f[0] in changed for f in factors)]
    needed = {f[0] for j in js for f in recipes[j]}
    X = base[0]
    if js:
        values, codes = design.sources(df, needed)
        columns = np.empty((len(df), len(js)), order="F")
        for i, j in enumerate(js):
            _fill_column(columns[:, i], recipes[j], values, codes)
        X = PatchedX(base[0], js, columns)
    own = []
    for arr, col in zip(base[1:], (ycol, design.weights, design.offset)):
        own.append(df[col].to_numpy(dtype=float) if col is not None and col in changed else arr)
    if ycol in changed:
        check_outcome(family, own[0])
    return None, (X, *own)


def _group_stats(group: _Group, betas: dict[int, np.ndarray | None], family: str, link: str,
                 robust: bool, grad: frozenset[int] = frozenset(),
                 lean: frozenset[int] = frozenset()) -> dict[int, dict[str, Any]]:
    """Statistics of the imputations ``k`` of a group that ``betas`` names, each at its own
    ``betas[k]`` (``None``: at the starting means); only the score for those in ``grad``,
    without what only a last pass needs for those in ``lean`` (see :func:`array_stats`)."""
    out = {}
    for j, k in enumerate(group.ks):
        if k not in betas:  # not iterated in this pass (converged, or not started yet)
            continue
        X, y, w, off = group.arrays(j)
        if k in grad:
            out[k] = array_stats(X, y, w, off, family, link, betas[k], grad_only=True)
            continue
        if j not in group.consts:  # kept with the group on the worker for the next passes
            # imputations that share imputation 1's outcome and weights share their constants
            same = j > 0 and 0 in group.consts and y is group.base[1] and w is group.base[2]
            group.consts[j] = group.consts[0] if same else outcome_constants(family, y, w)
        if group.work is None:
            group.work = np.empty((_irls.ROW_BLOCK, group.base[0].shape[1]), order="F")
        out[k] = array_stats(X, y, w, off, family, link, betas[k], robust, group.consts[j],
                              group.work, lean=k in lean)
    return out


def _groups(frames: list[Any], columns: list[str] | None = None,
            files: list[list[Any]] | None = None) -> list[tuple[list[int], list[Any]]]:
    """Partition groups: all m versions of partition i together when the m frames have the
    same number of partitions, else one group per (imputation, partition); only the
    ``columns`` (default: all) are read.  With ``files`` (see :func:`_stored_files`), the
    groups' parts are those files, read by the tasks that design them."""
    if files is not None:
        return [(list(range(len(files))), [f[i] for f in files]) for i in range(len(files[0]))]
    parts = [(f if columns is None else f[columns]).to_delayed() for f in frames]
    if any(len(pk) == 0 for pk in parts):
        raise InputError("every completed data set needs at least one partition")
    m = len(frames)
    if all(len(pk) == len(parts[0]) for pk in parts):
        return [(list(range(m)), [parts[k][i] for k in range(m)]) for i in range(len(parts[0]))]
    return [([k], [p]) for k in range(m) for p in parts[k]]


def _reduce_groups(outs: list[dict[int, dict[str, Any]]], m: int) -> list[dict[str, Any]]:
    return [_sum([o[k] for o in outs if k in o]) for k in range(m)]


def _reduce_active(outs: list[dict[int, dict[str, Any]]], ks: Any) -> dict[int, dict[str, Any]]:
    return {k: _sum([o[k] for o in outs if k in o]) for k in ks}
