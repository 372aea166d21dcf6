"""Analysis models fitted on every imputation from distributed sufficient statistics.

:func:`analyze` fits a generalized linear model given by a formula on each of the
m completed data sets and pools the fits with Rubin's rules
(:func:`dmice.pooling.pool`).  The model matrix is built by formulaic: its model
spec is fitted once (with the global levels of every categorical variable) and
replayed on every partition, so every partition and every imputation has the
same columns.  The fits use Fisher scoring (IRLS): each pass over the data is one
graph covering all m imputations and all partitions, and only small statistics
(``X'WX``, ``X'W(z - eta)``, the sandwich's meat, the Pearson chi-square) reach the
client.  Estimates and covariances equal those of statsmodels' ``GLM`` on the same
data.

:meth:`AnalysisResult.compare` (or :func:`compare`) tests nested models with D1, D2
or D3 as R's mice/mitml; :meth:`AnalysisResult.r_squared` pools R-squared of
gaussian models; :meth:`AnalysisResult.table` (shown by ``repr``) adds the
Monte-Carlo errors and the recommended number of imputations to the pooled table.

:func:`fit_glm` is the lower-level entry point with a user-supplied design
function instead of a formula.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from dask import delayed

from dmice import config as _config
from dmice import formulas as _formulas
from dmice import store
from dmice._gc import frozen
from dmice.errors import InputError
from dmice.glm import irls as _irls
from dmice.glm.irls import PatchedX, array_stats
from dmice.glm.links import COV_TYPES, check_family, check_outcome, outcome_constants
from dmice.glm.solve import iterate
from dmice.runtime import cluster as _cluster
from dmice.runtime import passes as _passes

Design = Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]


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


def _fixed_pass(frames: list[Any], design: Any, family: str, link: str, betas: np.ndarray,
                client: Any = None, files: list[list[Any]] | None = None, spread: bool = False
                ) -> list[dict[str, Any]]:
    """One pass over the data at fixed estimates ``betas[k]`` for imputation k (with
    ``spread``, partition i preferably on worker i modulo their number, see :func:`_spread`)."""
    groups = _groups(frames, getattr(design, "columns", None), files)
    design_d = delayed(design, pure=True, traverse=False)
    tasks = [delayed(_group_stats)(delayed(_load_group)(design_d, family, ks, *pts),
                                   {k: betas[k] for k in ks}, family, link, False)
             for ks, pts in groups]
    client = client if client is not None else _cluster.default_client()
    return _reduce_groups(_passes.compute_spread(client, tasks, spread), len(frames))


def _unplaced(data: Any, frames: list[Any]) -> bool:
    """Whether none of the data is held on the cluster yet (not a result of ``impute`` held
    there, no persisted frame): their designs are then placed on the workers in turn."""
    from dmice.result import MultipleImputation

    if isinstance(data, MultipleImputation) and data._engine is not None:
        return False
    return not _passes.on_cluster(frames)


@dataclass
class _Fits:
    params: np.ndarray  # (m, p)
    cov: np.ndarray  # (m, p, p)
    scale: np.ndarray  # (m,)
    deviance: np.ndarray  # (m,)
    nobs: int
    iterations: int
    stats: list[dict[str, Any]]  # statistics of the last pass, per imputation


def _fit(frames: list[Any], design: Callable[[pd.DataFrame], tuple], p: int, *, family: str,
         link: str, cov_type: str = "nonrobust", tol: float = 1e-10, max_iter: int = 50,
         client: Any = None, files: list[list[Any]] | None = None, spread: bool = False) -> _Fits:
    """Fisher scoring on all m frames at once.

    The design of every partition group (the m versions of a partition) is built once,
    kept in the workers' memory (with a distributed client) and reused by every pass;
    each pass is one task per group computing the statistics of the imputations still
    iterating (see :func:`iterate` for the warm start of imputations 2..m).
    """
    m = len(frames)
    groups = _groups(frames, getattr(design, "columns", None), files)
    design_d = delayed(design, pure=True, traverse=False)
    robust = cov_type != "nonrobust"
    client = client if client is not None else _cluster.default_client()
    # imputations 2..m of written files are read by low-priority tasks after the first pass
    # is on its way (see below), not before it
    defer = client is not None and files is not None and m > 1 and isinstance(files[0][0], store.StoredPart)
    loads = [delayed(_load_group)(design_d, family, ks, *pts, defer=defer) for ks, pts in groups]
    if client is not None:
        _cluster.tune_workers(client)  # numpy temporaries off mmap in the workers, as for impute
    # each group's design is kept where it is built, and each pass runs there
    held = _passes.Held(client, loads, spread)
    queued = False

    def one_pass(betas: dict[int, np.ndarray | None], grad: frozenset[int] = frozenset(),
                 lean: frozenset[int] = frozenset()) -> dict[int, dict[str, Any]]:
        nonlocal queued
        outs = held.map(_group_stats, [({k: betas[k] for k in ks if k in betas}, family, link, robust,
                                         grad, lean) if any(k in betas for k in ks) else None
                                        for ks, _ in groups])
        if defer and not queued:
            # Reading imputations 2..m: tasks queued behind this pass (lower priority), on the
            # worker holding the group, so that they run in its idle time between imputation
            # 1's passes, while the client takes its Newton steps.  A pass that needs an
            # imputation not read yet reads it itself (_Group.load).
            held.queue(_prefetch, [(i, (j,)) for i, (ks, _) in enumerate(groups) for j in range(1, len(ks))])
            queued = True
        return _reduce_active(outs, betas)

    try:
        beta, res, it = iterate(one_pass, m, p, link, tol, max_iter)
    finally:
        held.release()  # the designs held on the workers
    n = int(res[0]["n"])
    # covariance from the last pass (its step was below tol, so the change is negligible)
    df_resid = n - p
    covs, scales = np.empty((m, p, p)), np.empty(m)
    for k, r in enumerate(res):
        scale = float(r["pearson"]) / df_resid if family == "gaussian" else 1.0
        scales[k] = scale
        if cov_type == "nonrobust":
            covs[k] = scale * np.linalg.inv(r["XtWX"])
        else:
            bread = np.linalg.inv(r["Hobs"])
            c = bread @ r["meat"] @ bread
            if cov_type == "HC1":
                c = c * n / (n - p)
            covs[k] = (c + c.T) / 2
    return _Fits(beta, covs, scales, np.array([float(r["deviance"]) for r in res]), n, it, res)



# ------------------------------------------------------------------------------------------
# fit_glm: design callable
# ------------------------------------------------------------------------------------------
@dataclass
class GLMFit:
    """One fitted model per imputation (the result of :func:`fit_glm`).

    Attributes
    ----------
    terms : list of str
        Names of the columns of X.
    params : numpy.ndarray of shape (m, p)
        Estimates, one row per imputation.
    cov : numpy.ndarray of shape (m, p, p)
        Model-based covariance matrices.
    nobs : int
        Rows per completed data set.
    df_resid : int
        ``nobs - p``.
    family : str
        ``"gaussian"`` or ``"binomial"``.
    iterations : int
        Passes over the data.
    """

    terms: list[str]
    params: np.ndarray  # (m, p)
    cov: np.ndarray  # (m, p, p)
    nobs: int
    df_resid: int
    family: str
    iterations: int


class _XYDesign:
    """Adapts a ``df -> (X, y)`` design to ``df -> (X, y, None, None)``."""

    def __init__(self, design: Design):
        self.design = design

    def __call__(self, df: pd.DataFrame) -> tuple:
        X, y = self.design(df)
        return X, y, None, None


def fit_glm(frames: list[Any], design: Design, terms: list[str], *, family: str = "binomial",
            tol: float = 1e-10, max_iter: int = 50, client: Any = None) -> GLMFit:
    """Fit the same GLM on each of m completed dask DataFrames.

    Parameters
    ----------
    frames : list of dask.dataframe.DataFrame
        The m completed data sets.
    design : callable
        Maps a pandas partition to ``(X, y)`` numpy arrays (X with its intercept column).
    terms : list of str
        Names of X's columns.
    family : {"binomial", "gaussian"}
        Logistic regression or linear regression.
    tol : float, default 1e-10
        Convergence tolerance on the relative change of the estimates.
    max_iter : int, default 50
        Maximum passes over the data.
    client : distributed.Client, optional
        Client to compute on (default: dask's current scheduler).

    Returns
    -------
    GLMFit
    """
    if family not in ("binomial", "gaussian"):
        raise InputError(f"family must be 'binomial' or 'gaussian', got {family!r}")
    link = check_family(family, None)
    fits = _fit(list(frames), _XYDesign(design), len(terms), family=family, link=link, tol=tol,
                max_iter=max_iter, client=client)
    return GLMFit(list(terms), fits.params, fits.cov, fits.nobs, fits.nobs - len(terms), family,
                  fits.iterations)


# ------------------------------------------------------------------------------------------
# analyze: formulas
# ------------------------------------------------------------------------------------------
#: one factor of a model-matrix column: (source column, factor expression, level code or None
#: for the column's values)
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


def _as_frames(data: Any) -> list[Any]:
    import dask.dataframe as dd

    from dmice.result import MultipleImputation

    if isinstance(data, MultipleImputation):
        return [data.complete(k) for k in range(1, data.m + 1)]
    if isinstance(data, (list, tuple)) and data:
        out = []
        for i, f in enumerate(data):
            if isinstance(f, pd.DataFrame):
                out.append(_passes.from_pandas(f))
            elif isinstance(f, dd.DataFrame):
                out.append(f)
            else:
                raise InputError(f"data[{i}] must be a pandas or dask DataFrame, got {type(f).__name__}")
        cols = [list(map(str, f.columns)) for f in out]
        if any(c != cols[0] for c in cols[1:]):
            raise InputError("the completed data sets must have the same columns")
        return out
    raise InputError("data must be a MultipleImputation, a path written by dmice, or a non-empty "
                     f"list of pandas or dask DataFrames, got {type(data).__name__}")


def _is_stringlike(dtype: Any) -> bool:
    return (not isinstance(dtype, pd.CategoricalDtype)
            and (pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)))


@dataclass
class ImputationFit:
    """The model fitted on one completed data set.

    Attributes
    ----------
    params : pandas.Series
        Estimates, indexed by term.
    cov : pandas.DataFrame
        Their covariance matrix (model-based or sandwich, as asked).
    scale : float
        Dispersion (Pearson chi-square / (n - p) for gaussian, 1 otherwise).
    deviance : float
        Deviance at the estimates.
    """

    params: pd.Series
    cov: pd.DataFrame
    scale: float
    deviance: float

    @property
    def bse(self) -> pd.Series:
        """Standard errors."""
        return pd.Series(np.sqrt(np.diag(self.cov.to_numpy())), index=self.params.index)


@dataclass(repr=False)
class AnalysisResult:
    """The result of :func:`analyze`: one fit per imputation and their pooled estimates.

    Attributes
    ----------
    formula : str
        The model formula.
    family, link, cov_type : str
        The model and the kind of covariance.
    terms : list of str
        Column names of the model matrix.
    fits : list of ImputationFit
        Estimates and covariance of each imputation (``fits[k - 1]`` for imputation k).
    nobs : int
        Rows per completed data set.
    dfcom : float
        Complete-data degrees of freedom used in pooling.
    iterations : int
        Passes over the data.
    pooled_result : dmice.pooling.PooledResult
        The full result of :func:`dmice.pooling.pool`.
    outcome : str
        Left-hand side of the formula.
    weights, offset : str or None
        Columns of prior weights and offset.
    loglik : numpy.ndarray of shape (m,)
        Log-likelihood of each fit (gaussian: at the maximum-likelihood variance
        ``rss / n``; binomial without the binomial coefficient).
    """

    formula: str
    family: str
    link: str
    cov_type: str
    terms: list[str]
    fits: list[ImputationFit]
    nobs: int
    dfcom: float
    iterations: int
    pooled_result: Any = field(repr=False)
    outcome: str = ""
    weights: str | None = None
    offset: str | None = None
    loglik: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    _stats: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _frames: list[Any] = field(default_factory=list, repr=False)
    _files: list[list[Any]] | None = field(default=None, repr=False)
    _data: Any = field(default=None, repr=False)  # what analyze() was given (a path opened)
    _design: Any = field(default=None, repr=False)
    _client: Any = field(default=None, repr=False)

    @property
    def m(self) -> int:
        """Number of imputations."""
        return len(self.fits)

    @property
    def pooled(self) -> pd.DataFrame:
        """Rubin's rules table (``term, m, estimate, ubar, b, t, dfcom, df, riv, lambda, fmi``)."""
        return self.pooled_result.pooled

    def summary(self, conf_int: bool = True, exponentiate: bool = False,
                conf_level: float | None = None) -> pd.DataFrame:
        """Pooled estimates, standard errors, tests and confidence intervals.

        Parameters
        ----------
        conf_int : bool, default True
            Add ``conf_low`` and ``conf_high``.
        exponentiate : bool, default False
            Report ``exp(estimate)`` and exponentiated bounds (odds or rate ratios).
        conf_level : float, optional
            Confidence level (default 0.95).

        Returns
        -------
        pandas.DataFrame
            As :meth:`dmice.pooling.PooledResult.summary`.
        """
        return self.pooled_result.summary(conf_int=conf_int, exponentiate=exponentiate,
                                          conf_level=conf_level)

    @property
    def df_resid(self) -> int:
        """Residual degrees of freedom of each fit, ``nobs - p``."""
        return self.nobs - len(self.terms)

    def mc_error(self, target_cv: float = 0.05) -> pd.DataFrame:
        """Monte-Carlo errors of the pooled results and the recommended m.

        See :meth:`dmice.pooling.PooledResult.mc_error` (jackknife over the
        imputations, as Stata's ``mi estimate, mcerror``; ``recommended_m`` from von
        Hippel's quadratic rule for a standard error whose coefficient of variation
        over repeated imputation is ``target_cv``).

        Parameters
        ----------
        target_cv : float, default 0.05
            Coefficient of variation of the standard error that the recommended m aims at.
        """
        return self.pooled_result.mc_error(target_cv=target_cv)

    def table(self, exponentiate: bool = False, target_cv: float = 0.05) -> pd.DataFrame:
        """The printed table: :meth:`summary` with ``fmi``, the Monte-Carlo errors of the
        estimate, standard error and p-value, and the recommended m of each term.

        Parameters
        ----------
        exponentiate : bool, default False
            Show ``exp(estimate)`` and exponentiated bounds (odds or rate ratios).
        target_cv : float, default 0.05
            As in :meth:`mc_error`.
        """
        out = self.summary(conf_int=True, exponentiate=exponentiate)
        mc = self.mc_error(target_cv=target_cv)
        for c in ("fmi", "mc_se_estimate", "mc_se_std_error", "mc_se_p_value", "recommended_m"):
            out[c] = mc[c].to_numpy()
        if exponentiate:  # MC error of exp(estimate) by the delta method
            out["mc_se_estimate"] = out["mc_se_estimate"] * out["estimate"]
        return out

    def r_squared(self, adjusted: bool = False) -> pd.DataFrame:
        """Pooled R-squared of a gaussian model, as ``mice::pool.r.squared``.

        Each fit's R-squared is R's ``summary.lm`` one: ``mss / (mss + rss)`` with the
        (weighted) sum of squares of the fitted values without offset about their mean
        (about 0 without an intercept) and the residual sum of squares; the adjusted
        value is ``1 - (1 - R^2) (n - i) / (n - p)`` with ``i = 1`` for an intercept.
        They are pooled by :func:`dmice.pooling.pool_r_squared` (Fisher z).

        Parameters
        ----------
        adjusted : bool, default False
            Pool the adjusted R-squared.

        Returns
        -------
        pandas.DataFrame
            One row (``"R^2"`` or ``"adj R^2"``) with columns ``est, lo_95, hi_95, fmi``.

        Raises
        ------
        dmice.errors.InputError
            For a non-gaussian model.
        """
        from dmice.pooling import pool_r_squared

        return pool_r_squared(self.r_squared_values(adjusted), self.nobs, adjusted=adjusted)

    def r_squared_values(self, adjusted: bool = False) -> np.ndarray:
        """R-squared (or adjusted R-squared) of each imputation's fit (see :meth:`r_squared`).

        Parameters
        ----------
        adjusted : bool, default False
            The adjusted R-squared, ``1 - (1 - R^2)(n - 1) / (n - p)`` (``n - 1`` becomes ``n``
            without an intercept).
        """
        if self.family != "gaussian":
            raise InputError(f"R-squared is defined for gaussian models, this one is {self.family!r}")
        n, p = self.nobs, len(self.terms)
        icpt = "Intercept" in self.terms
        out = np.empty(self.m)
        for k, s in enumerate(self._stats):
            sw, swe, swe2 = float(s["sw"]), float(s["swe"]), float(s["swe2"])
            mss = swe2 - swe**2 / sw if icpt else swe2
            r2 = mss / (mss + float(s["pearson"]))
            out[k] = 1 - (1 - r2) * (n - int(icpt)) / (n - p) if adjusted else r2
        return out

    def _loglik_at(self, params: np.ndarray) -> np.ndarray:
        """Log-likelihood of each imputation's data at ``params`` (one pass over the data);
        gaussian models use the average of the m maximum-likelihood variances."""
        if self._design is None:
            raise InputError("this result holds no data to evaluate likelihoods on")
        betas = np.tile(np.asarray(params, dtype=float), (self.m, 1))
        stats = _fixed_pass(self._frames, self._design, self.family, self.link, betas, self._client,
                            self._files, spread=_unplaced(self._data, self._frames))
        if self.family != "gaussian":
            return np.array([float(s["loglik"]) for s in stats])
        n = self.nobs
        s2 = float(np.mean([float(s["pearson"]) / n for s in self._stats]))
        return np.array([-0.5 * n * math.log(2 * math.pi * s2) + 0.5 * float(s["sumlogw"])
                         - float(s["pearson"]) / (2 * s2) for s in stats])

    def compare(self, reduced: AnalysisResult | None = None, *, method: str = "D1",
                dfcom: float | None = None, ariv: str = "default") -> ModelComparison:
        """Test this model against a nested one with multiply imputed data (mice's D1/D2/D3).

        Parameters
        ----------
        reduced : AnalysisResult, optional
            The nested model, fitted by :func:`analyze` on the same data with the same
            outcome, family, link, weights and offset and a subset of this model's
            terms.  Default: the intercept-only model (D1 and D2 then test every
            coefficient but the intercept, as mice's ``D1(fit1)``).
        method : {"D1", "D2", "D3"}, default "D1"
            ``"D1"``: multivariate Wald test (:func:`dmice.pooling.wald_d1`, mice's
            ``D1(fit1, fit0)``) with ``dfcom``; ``"D2"``: pooled Wald chi-squares
            (:func:`dmice.pooling.chi2_d2`, mice's ``D2(fit1, fit0)``); ``"D3"``:
            Meng--Rubin likelihood-ratio test (:func:`dmice.pooling.lr_d3`, mitml's
            ``testModels(method = "D3")``), which takes one more pass over the data
            per model to evaluate each imputation's log-likelihood at the pooled
            estimates.
        dfcom : float, optional
            Complete-data df for D1; default this model's :attr:`dfcom` (the residual
            df unless given to :func:`analyze`), as mice.  Ignored by D2 and D3.
        ariv : {"default", "positive"}, default "default"
            D3 only: ``"positive"`` truncates a negative ``riv`` at 0.

        Returns
        -------
        ModelComparison

        Raises
        ------
        dmice.errors.InputError
            When the models are not nested, differ in m, rows, outcome, family, link,
            weights or offset, were fitted on different data, or ``method`` is unknown.

        Notes
        -----
        D3 evaluates the log-likelihood of imputation i's data at the estimates
        averaged over the m imputations; for gaussian models the variance is the
        average of the m maximum-likelihood variances ``rss / n``, as mitml does for
        ``lm``.  mice's ``D3()`` instead refits the intercept (and the variance) at the
        pooled slopes, so its statistic can differ slightly from mitml's and dmice's.
        Binomial and poisson log-likelihoods leave out the terms that depend only on
        the outcome where they cancel in the ratio (the binomial coefficient).

        Examples
        --------
        >>> full = dmice.analyze(imp, "y ~ x + C(g)")               # doctest: +SKIP
        >>> full.compare(dmice.analyze(imp, "y ~ x"), method="D3")  # doctest: +SKIP
        """
        from dmice.pooling import chi2_d2, lr_d3, wald_chi2, wald_d1

        if method not in ("D1", "D2", "D3"):
            raise InputError(f"method must be 'D1', 'D2' or 'D3', got {method!r}")
        if reduced is None:
            if method == "D3":
                reduced = analyze(self._data if self._data is not None else self._frames,
                                  f"{self.outcome} ~ 1", family=self.family,
                                  link=self.link, weights=self.weights, offset=self.offset,
                                  client=self._client)
                tested = [t for t in self.terms if t not in reduced.terms]
            else:
                tested = [t for t in self.terms if t != "Intercept"]
            if not tested:
                raise InputError("the model has no terms besides the intercept to test")
        else:
            tested = self._check_nested(reduced)
        rformula = reduced.formula if reduced is not None else "intercept only"
        if method in ("D1", "D2"):
            est = pd.DataFrame([f.params for f in self.fits], columns=self.terms)
            covs = [f.cov for f in self.fits]
            if method == "D1":
                dfc = self.dfcom if dfcom is None else dfcom
                row = wald_d1(est, covs, tested, dfcom=dfc)
            else:
                row = chi2_d2(wald_chi2(est, covs, tested), len(tested))
        else:
            assert reduced is not None
            ll1p = self._loglik_at(self.pooled["estimate"].to_numpy())
            ll0p = reduced._loglik_at(reduced.pooled["estimate"].to_numpy())
            row = lr_d3(self.loglik, reduced.loglik, ll1p, ll0p, len(tested), ariv=ariv)
        r = row.iloc[0]
        return ModelComparison(method=method, full=self.formula, reduced=rformula,
                               tested=list(tested), statistic=float(r["statistic"]),
                               df1=int(r["df1"]), df2=float(r["df2"]), dfcom=float(r["dfcom"]),
                               p_value=float(r["p_value"]), riv=float(r["riv"]), m=self.m)

    def _check_nested(self, reduced: Any) -> list[str]:
        if not isinstance(reduced, AnalysisResult):
            raise InputError(f"reduced must be an AnalysisResult from dmice.analyze, got "
                             f"{type(reduced).__name__}")
        if reduced.m != self.m:
            raise InputError(f"the models have different numbers of imputations (m={self.m} and "
                             f"m={reduced.m}); fit both on the same imputations")
        for name in ("nobs", "outcome", "family", "link", "weights", "offset"):
            a, b = getattr(self, name), getattr(reduced, name)
            if a != b:
                raise InputError(f"the models differ in {name} ({a!r} and {b!r}); nested models "
                                 "need the same data and model family")
        extra = [t for t in reduced.terms if t not in self.terms]
        if extra:
            hint = (" (the first model is the smaller one: call reduced.compare(full))"
                    if all(t in reduced.terms for t in self.terms) else "")
            raise InputError(f"the models are not nested: terms {extra} of the reduced model "
                             f"{reduced.formula!r} are not in {self.formula!r}{hint}")
        tested = [t for t in self.terms if t not in reduced.terms]
        if not tested:
            raise InputError(f"the models are not nested: {self.formula!r} has no terms that "
                             f"{reduced.formula!r} lacks")
        for s1, s0 in zip(self._stats, reduced._stats):
            if not np.isclose(float(s1["swy"]), float(s0["swy"]), rtol=1e-9, atol=1e-12):
                raise InputError("the models were fitted on different data (the outcome sums "
                                 "differ between them)")
        return tested

    def __repr__(self) -> str:
        head = (f"<dmice.AnalysisResult {self.formula}  family={self.family} link={self.link} "
                f"cov_type={self.cov_type} m={self.m} nobs={self.nobs:,} dfcom={self.dfcom:g}>")
        tab = self.table()
        text = tab.to_string(index=False, float_format=lambda v: f"{v:.4g}")
        lines = [head, text]
        if self.m >= 3:
            rec = tab["recommended_m"].dropna()
            lines.append("mc_se_*: Monte-Carlo error over the m imputations (jackknife, as Stata's "
                         "mcerror); recommended_m: imputations for a standard error with a 5% "
                         "Monte-Carlo coefficient of variation (von Hippel 2020)"
                         + (f"; largest {int(rec.max())}" if len(rec) else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class ModelComparison:
    """Result of :meth:`AnalysisResult.compare`: a pooled test of nested models.

    Attributes
    ----------
    method : str
        ``"D1"``, ``"D2"`` or ``"D3"``.
    full, reduced : str
        Formulas of the two models.
    tested : list of str
        Terms of the full model absent from the reduced one.
    statistic : float
        F statistic.
    df1, df2 : float
        Numerator and denominator degrees of freedom.
    dfcom : float
        Complete-data df used (D1), NaN otherwise.
    p_value : float
        ``P(F(df1, df2) > statistic)``.
    riv : float
        Average relative increase in variance due to nonresponse.
    m : int
        Number of imputations.
    """

    method: str
    full: str
    reduced: str
    tested: list[str]
    statistic: float
    df1: int
    df2: float
    dfcom: float
    p_value: float
    riv: float
    m: int

    @property
    def table(self) -> pd.DataFrame:
        """One-row table ``test, statistic, df1, df2, dfcom, p_value, riv`` (mice's
        ``summary(D1(...))$comparisons`` in snake case)."""
        return pd.DataFrame([{"test": self.method, "statistic": self.statistic, "df1": self.df1,
                              "df2": self.df2, "dfcom": self.dfcom, "p_value": self.p_value,
                              "riv": self.riv}])

    def __repr__(self) -> str:
        return (f"<dmice.ModelComparison {self.method}: {self.full!r} vs {self.reduced!r}, m={self.m}>\n"
                f"  tested: {', '.join(self.tested)}\n"
                f"  F = {self.statistic:.4g} on {self.df1} and {self.df2:.4g} df, p = {self.p_value:.4g}, "
                f"riv = {self.riv:.4g}")


def compare(full: AnalysisResult, reduced: AnalysisResult | None = None, *, method: str = "D1",
            dfcom: float | None = None, ariv: str = "default") -> ModelComparison:
    """Pooled test of nested models: ``full.compare(reduced, method=...)``.

    Parameters
    ----------
    full : AnalysisResult
        The larger model, from :func:`analyze`.
    reduced : AnalysisResult, optional
        The nested model (default: the intercept-only model).
    method : {"D1", "D2", "D3"}, default "D1"
        Multivariate Wald test (D1), pooled Wald chi-squares (D2) or the Meng--Rubin
        likelihood-ratio test (D3).
    dfcom : float, optional
        Complete-data df for D1 (default: ``full``'s).
    ariv : {"default", "positive"}, default "default"
        D3 only: ``"positive"`` truncates a negative ``riv`` at 0.

    See :meth:`AnalysisResult.compare` for the details.
    """
    if not isinstance(full, AnalysisResult):
        raise InputError(f"full must be an AnalysisResult from dmice.analyze, got {type(full).__name__}")
    return full.compare(reduced, method=method, dfcom=dfcom, ariv=ariv)


def _compute(client: Any, *objs: Any) -> tuple:
    return _passes.compute(client, *objs)


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
        per_part = _compute(client, *[delayed(_distinct)(pt, strings)
                                      for fr in frames for pt in fr[strings].to_delayed()])
        for c in strings:
            vals: set = set()
            for d in per_part:
                vals.update(d[c])
            levels[c] = _sorted_levels(vals)
    probe = _FormulaDesign(None, columns, levels, weights, offset)
    # only the analysis columns of the partition travel to the client
    (first,) = _compute(client, frames[0][columns].get_partition(0))
    try:
        first = probe.prepare(first)
        spec = _formulas.model_matrix(f, first).model_spec
        if _has_state(spec) and frames[0].npartitions > 1:
            # stateful transforms (center, scale, poly, bs, ...): fit them on a sample of
            # every partition of imputation 1 instead of the first partition alone
            per_part = math.ceil(_config.get("analysis.spec-sample-rows") / frames[0].npartitions)
            parts = frames[0].to_delayed()
            samples = _compute(client, *[delayed(_spec_sample)(p, probe, per_part) for p in parts])
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


@frozen
def analyze(data: Any, formula: str, *, family: str = "gaussian", link: str | None = None,
            weights: str | None = None, offset: str | None = None, cov_type: str = "nonrobust",
            dfcom: float | None = None, client: Any = None, tol: float = 1e-10,
            max_iter: int = 50) -> AnalysisResult:
    """Fit a GLM on every imputation and pool the fits with Rubin's rules.

    Parameters
    ----------
    data : MultipleImputation, str or list of DataFrame
        The completed data sets: a result of :func:`dmice.impute` or :func:`dmice.open`,
        the path of a written output (opened with :func:`dmice.open`), or a list of m
        pandas or dask DataFrames.
    formula : str
        Wilkinson formula as understood by formulaic, e.g.
        ``"y ~ x + C(group, contr.treatment('b')) + x:z + I(x**2)"``.  Categorical
        levels are global: a Categorical column's categories, or the distinct values of
        a string column over all partitions of all imputations (sorted).  Boolean
        columns enter as 0/1 numbers.
    family : {"gaussian", "binomial", "poisson"}, default "gaussian"
        Distribution of the outcome.  Binomial outcomes are 0/1 (or proportions).
    link : str, optional
        ``"identity"`` (gaussian), ``"logit"`` (default), ``"probit"`` or ``"cloglog"``
        (binomial), ``"log"`` (poisson).  Default: the canonical link.
    weights : str, optional
        Column of prior weights with statsmodels' ``var_weights`` semantics (R glm's
        ``weights``): each row's variance is divided by its weight; ``nobs`` stays the
        row count.
    offset : str, optional
        Column added to the linear predictor with a coefficient fixed at 1.
    cov_type : {"nonrobust", "HC0", "HC1"}, default "nonrobust"
        Model-based covariance (gaussian dispersion estimated as Pearson chi-square /
        (n - p)), as statsmodels' ``GLM(...).fit()``, or the sandwich estimator
        ``H^-1 (sum s_i s_i') H^-1`` (observed information ``H``, per-row scores
        ``s_i``) as ``GLM(...).fit(cov_type="HC0")``.  ``"HC1"`` is HC0 times
        ``n / (n - p)`` (as OLS's HC1 and R sandwich's ``vcovHC(type="HC1")``);
        statsmodels' GLM applies no correction for ``"HC1"`` (its HC1 equals its HC0).
    dfcom : float, optional
        Complete-data degrees of freedom for pooling; default ``nobs - p``.
    client : distributed.Client, optional
        Client to compute on (default: dask's current scheduler).
    tol : float, default 1e-10
        Convergence tolerance on the relative change of the estimates.
    max_iter : int, default 50
        Maximum passes over the data.

    Returns
    -------
    AnalysisResult
        Per-imputation fits (``.fits``), the pooled table (``.pooled``) and
        ``.summary()``.

    Raises
    ------
    dmice.errors.InputError
        For a bad formula, unknown columns, missing values in the analysis columns, a
        bad family, link or covariance type, or a singular model matrix.

    Notes
    -----
    The model spec is built once and replayed on every partition, so all partitions
    and imputations share the same columns.  Categorical levels are global (see
    ``formula``).  Stateful transforms (``center``, ``scale``, ``poly``, ``bs``, ...)
    are fitted on imputation 1 only: on its first partition when it has one, else on
    a sample of about 100,000 rows spread over all its partitions (every r-th row
    plus each partition's minimum and maximum of every numeric column, so spline
    boundary knots cover the data).  Their centres, scales and knots can therefore
    differ slightly from those of a single-machine fit on the whole data set; the
    fitted model is the same up to reparametrisation, but coefficients of such terms
    are not exactly comparable with R's.

    The design of each partition is built once for all m imputations: the formula is
    evaluated on imputation 1's partition and, for the other imputations, only on the
    rows whose analysis columns differ from it (the imputed cells; on the whole
    partition when more than half of its rows differ).  A formula made of plain
    numeric columns and treatment-coded categorical columns (``x``, ``g``, ``C(g)``,
    ``C(g, contr.treatment('b'))`` and their interactions) is built directly from the
    columns, after checking on a sample of imputation 1's first partition that the
    result is identical to formulaic's; other formulas are evaluated by formulaic.
    With such a direct design, imputations 2..m keep only the model columns that read
    a column they change, used with imputation 1's other columns instead of a matrix
    of their own.  For an output written by dmice (a path,
    or a result from :func:`dmice.open`), the task that designs a partition reads its
    m files itself, and the columns no imputation changes only from imputation 1's
    file (of a ``cells`` output: the input file and each variable's cells once for all
    m imputations).  The designs stay
    in the workers' memory for the whole fit, and each Fisher-scoring pass is one
    task per partition computing the statistics of the fits still iterating; only
    ``p x p`` statistics reach the client.  Imputation 1 iterates from the starting
    means exactly as a fit on its data alone; with a non-identity link, imputations
    2..m start from imputation 1's estimate once its relative step is at most 0.1
    (their estimates differ only through the imputed values, so they need fewer
    passes), with a logit or log link by chords (passes computing their score alone,
    see :func:`iterate`), and every fit stops at its own convergence on a full pass
    (the same criterion, ``tol``).  ``iterations`` counts the passes over the data.

    Examples
    --------
    >>> res = dmice.analyze(imp, "y ~ x + C(g)", family="binomial")   # doctest: +SKIP
    >>> res.summary(exponentiate=True)                                 # doctest: +SKIP
    """
    from dmice.pooling import pool

    link = check_family(family, link)
    if cov_type not in COV_TYPES:
        raise InputError(f"cov_type must be one of {list(COV_TYPES)}, got {cov_type!r}")
    if isinstance(data, str):  # a written output, opened as dmice.open does
        from dmice import store
        from dmice.result import from_manifest

        data = from_manifest(data, store.read_manifest(data, None), None)
    frames = _as_frames(data)
    files = _stored_files(data)
    spec, terms, design = _build_spec(formula, frames, weights, offset, client)
    p = len(terms)
    fits = _fit(frames, design, p, family=family, link=link, cov_type=cov_type, tol=tol,
                max_iter=max_iter, client=client, files=files, spread=_unplaced(data, frames))
    n = fits.nobs
    dfc = float(dfcom) if dfcom is not None else float(max(n - p, 1))
    pooled = pool(fits.params, fits.cov, dfcom=dfc, terms=terms)
    per = [ImputationFit(pd.Series(fits.params[k], index=terms),
                         pd.DataFrame(fits.cov[k], index=terms, columns=terms),
                         float(fits.scale[k]), float(fits.deviance[k])) for k in range(len(frames))]
    if family == "gaussian":
        ll = np.array([-0.5 * n * (math.log(2 * math.pi * float(s["pearson"]) / n) + 1.0)
                       + 0.5 * float(s["sumlogw"]) for s in fits.stats])
    else:
        ll = np.array([float(s["loglik"]) for s in fits.stats])
    return AnalysisResult(formula=formula, family=family, link=link, cov_type=cov_type, terms=terms,
                          fits=per, nobs=n, dfcom=dfc, iterations=fits.iterations, pooled_result=pooled,
                          outcome=formula.split("~", 1)[0].strip(), weights=weights, offset=offset,
                          loglik=ll, _stats=fits.stats, _frames=frames, _files=files, _data=data,
                          _design=design, _client=client)
