"""Predictor sets: which variables enter each conditional model.

* :func:`resolve` turns the ``predictors=`` argument of :func:`dmice.impute` (a
  dict of lists or a predictor matrix, as mice's ``predictorMatrix``) into the
  predictor variables of every target, and :func:`xcols` into its columns of the
  encoded design.
* :func:`quickpred` builds a predictor matrix from distributed pairwise
  statistics, following mice's ``quickpred`` rule.
* :func:`screen` finds constant and (near-)collinear predictors of a model from
  its Gram matrix (mice's ``remove.lindep``).

Only :func:`quickpred` reaches the cluster, through :mod:`dmice.runtime`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from dmice.errors import InputError
from dmice.schema import CONTINUOUS, NOMINAL, ORDINAL, UNSUPPORTED, Variable, to_codes

# ---------------------------------------------------------------------------
# predictor sets


def _unusable_reason(v: Variable) -> str | None:
    if v.width:
        return None
    if v.kind == UNSUPPORTED:
        return "its type is not supported"
    return "it is incomplete and not imputed"


def as_json(predictors: Any) -> dict[str, list[str]] | None:
    """``predictors`` as ``{target: [predictor, ...]}`` (for the manifest and configuration hashes)."""
    if predictors is None:
        return None
    if isinstance(predictors, pd.DataFrame):
        return {str(r): [str(c) for c in predictors.columns if predictors.loc[r, c] == 1]
                for r in predictors.index}
    if isinstance(predictors, dict):
        return {str(k): [str(x) for x in v] if isinstance(v, (list, tuple)) else v
                for k, v in predictors.items()}
    return predictors  # invalid: resolve() names the problem


def resolve(predictors: Any, variables: list[Variable], exclude: Iterable[int] = ()
            ) -> tuple[dict[int, list[int]], list[dict[str, Any]]]:
    """Predictor variables of every imputed variable.

    Parameters
    ----------
    predictors : dict, pandas.DataFrame or None
        ``{target: [predictor, ...]}`` for some targets, or a predictor matrix whose
        row ``target`` holds 1 in the column of each of its predictors (0 otherwise).
        Targets not mentioned keep the default: every other usable variable.
    variables : list of Variable
        The schema's variables, with methods and layout assigned.
    exclude : iterable of int
        Variables never used as predictors (the ``by=`` grouping variable).

    Returns
    -------
    sets : dict
        Imputed variable index -> sorted predictor variable indices.
    events : list of dict
        Logged events for requested predictors that cannot be used.
    """
    names = [v.name for v in variables]
    pos = {n: i for i, n in enumerate(names)}
    exclude = set(exclude)
    events: list[dict[str, Any]] = []
    given: dict[int, set[int]] = {}
    if predictors is None:
        pass
    elif isinstance(predictors, pd.DataFrame):
        bad_rows = [str(r) for r in predictors.index if str(r) not in pos]
        bad_cols = [str(c) for c in predictors.columns if str(c) not in pos]
        if bad_rows or bad_cols:
            raise InputError(f"predictors matrix names unknown columns: {sorted(set(bad_rows + bad_cols))}; "
                             f"columns are {names}")
        if predictors.index.has_duplicates or predictors.columns.has_duplicates:
            raise InputError("predictors matrix has duplicated row or column labels")
        vals = predictors.to_numpy()
        try:
            num = vals.astype(np.float64)
        except (TypeError, ValueError):
            raise InputError("predictors matrix must hold 0 and 1 only") from None
        if not np.all((num == 0) | (num == 1)):
            raise InputError("predictors matrix must hold 0 and 1 only")
        cols = [pos[str(c)] for c in predictors.columns]
        for r, row in zip(predictors.index, num):
            j = pos[str(r)]
            given[j] = {k for k, x in zip(cols, row) if x == 1 and k != j}  # diagonal ignored, as mice
    elif isinstance(predictors, dict):
        for key, lst in predictors.items():
            if str(key) not in pos:
                raise InputError(f"predictors names unknown column {key!r} as a target; columns are {names}")
            if isinstance(lst, str) or not isinstance(lst, Iterable):
                raise InputError(f"predictors[{key!r}] must be a list of column names, got "
                                 f"{type(lst).__name__}")
            lst = list(lst)
            unknown = [p for p in lst if str(p) not in pos]
            if unknown:
                raise InputError(f"predictors[{key!r}] names unknown columns {unknown}; columns are {names}")
            if str(key) in map(str, lst):
                raise InputError(f"predictors[{key!r}] lists {key!r} itself; a variable cannot predict itself")
            given[pos[str(key)]] = {pos[str(p)] for p in lst}
    else:
        raise InputError("predictors must be a dict of column -> list of columns or a pandas DataFrame "
                         f"(predictor matrix), got {type(predictors).__name__}")
    sets = {}
    for j, v in enumerate(variables):
        if not v.imputed:
            continue
        if j in given:
            chosen = set()
            for k in sorted(given[j]):
                why = _unusable_reason(variables[k])
                if k in exclude:
                    continue
                if why:
                    events.append({"variable": v.name, "event": f"predictor {variables[k].name!r} not used: "
                                   f"{why}"})
                    continue
                chosen.add(k)
        else:
            chosen = {k for k, w in enumerate(variables) if k != j and w.width and k not in exclude}
        sets[j] = sorted(chosen)
    return sets, events


def xcols(variables: list[Variable], preds: list[int]) -> np.ndarray:
    """Encoded design columns of a predictor set: the intercept (column 0), then each predictor's."""
    cols = [0]
    for k in preds:
        cols.extend(range(*variables[k].cols))
    return np.array(sorted(cols), dtype=np.int64)


def column_labels(variables: list[Variable], n_cols: int) -> list[str]:
    """Name of every encoded column: ``"(Intercept)"``, ``"x"``, or ``"x[k]"`` for the dummy of level number k.

    Level numbers (from 1, in the order of the variable's levels) rather than level
    labels keep data values out of logged events.
    """
    labels = ["(Intercept)"] * n_cols
    for v in variables:
        a, b = v.cols
        for c in range(a, b):
            if v.kind in (NOMINAL, ORDINAL):
                labels[c] = f"{v.name}[{c - a + 2}]"
            else:
                labels[c] = v.name
    return labels


# ---------------------------------------------------------------------------
# constant and collinear predictors

#: variance below which a predictor counts as constant, and the eigenvalue ratio of collinearity (mice)
LINDEP_EPS = 1e-4
#: a predictor correlated above this with the target is dropped (mice's maxcor)
MAXCOR = 0.99


def screen(A: np.ndarray, keep: np.ndarray, y: np.ndarray | None = None, eps: float = LINDEP_EPS,
           maxcor: float = MAXCOR) -> tuple[list[int], list[str]]:
    """Predictors to drop from a model, found from a (weighted) Gram matrix, as mice's ``remove.lindep``.

    Parameters
    ----------
    A : ndarray (q, q)
        ``X' W X`` of the model's design over its fitting rows (weights ``W >= 0``);
        column 0 is the intercept.
    keep : ndarray of bool (q,)
        Columns still in the model; column 0 is always kept.
    y : ndarray (q + 1,), optional
        ``[X' W y, y' W y]`` of a continuous target, for the ``maxcor`` rule.

    Returns
    -------
    drop : list of int
        Positions (in ``A``) to drop, in the order found.
    why : list of str
        The reason of each: ``"constant"``, ``"collinear"``, ``"correlated with the target"``
        or ``"not finite"`` (statistics that overflowed).
    """
    n = A[0, 0]
    drop: list[int] = []
    why: list[str] = []
    if n <= 0:
        return drop, why
    mu = A[0] / n
    with np.errstate(invalid="ignore", over="ignore"):
        cov = A / n - np.outer(mu, mu)
    var = np.diag(cov).copy()
    if y is not None:
        my = y[0] / n
        vy = y[-1] / n - my * my
        if vy < eps:  # constant target: mice keeps every predictor
            return drop, why
    idx = [i for i in range(1, len(A)) if keep[i]]
    while idx:  # overflowed statistics (the schema standardises columns, so not expected)
        sub = ~np.isfinite(cov[np.ix_(idx, idx)])
        if not sub.any():
            break
        i = idx[int(np.argmax(sub.sum(axis=0)))]
        drop.append(i)
        why.append("not finite")
        idx.remove(i)
    for i in list(idx):
        if var[i] < eps:
            drop.append(i)
            why.append("constant")
            idx.remove(i)
    if y is not None:
        cxy = y[:-1] / n - mu * my
        for i in list(idx):
            if cxy[i] / np.sqrt(var[i] * vy) > maxcor:
                drop.append(i)
                why.append("correlated with the target")
                idx.remove(i)
    while len(idx) > 1:
        sd = np.sqrt(var[idx])
        R = cov[np.ix_(idx, idx)] / np.outer(sd, sd)
        w, V = np.linalg.eigh(R)
        if w[0] / w[-1] >= eps:
            break
        i = idx[int(np.argmax(np.abs(V[:, 0])))]
        drop.append(i)
        why.append("collinear")
        idx.remove(i)
    return drop, why


# ---------------------------------------------------------------------------
# quickpred


def _codes(df: pd.DataFrame, variables: list[Variable]) -> np.ndarray:
    """Numeric matrix of a partition as R's ``data.matrix`` (up to affine changes per column)."""
    X = np.full((len(df), len(variables)), np.nan)
    for i, v in enumerate(variables):
        if v.kind == UNSUPPORTED:
            continue
        x = to_codes(df[v.name], v)
        if v.kind == CONTINUOUS:
            x = (x - v.center) / v.scale
        X[:, i] = x
    return X


def quickpred_partition(df: pd.DataFrame, variables: list[Variable]) -> dict[str, np.ndarray]:
    """Pairwise sums of one partition for :func:`quickpred` (summed over the partitions)."""
    X = _codes(df, variables)
    R = (~np.isnan(X)).astype(np.float64)
    X = np.nan_to_num(X, nan=0.0)
    return {"n": np.array(float(len(df))), "N": R.T @ R, "S1": X.T @ R, "S2": (X * X).T @ R, "P": X.T @ X}


def _cor(n, sx, sy, sxx, syy, sxy):
    vx = n * sxx - sx * sx
    vy = n * syy - sy * sy
    tiny = 1e-10
    ok = (n > 1) & (vx > tiny * np.maximum(n * sxx, 1.0)) & (vy > tiny * np.maximum(n * syy, 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (n * sxy - sx * sy) / np.sqrt(vx * vy)
    return np.where(ok, np.abs(r), 0.0)


def quickpred_statistics(s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(v, u, puc)`` of mice's ``quickpred`` from summed pairwise sums (see :func:`quickpred_partition`).

    ``v[i, k] = |cor(x_i, x_k)|`` over rows where both are observed, ``u[i, k] =
    |cor(r_i, x_k)|`` over rows where ``x_k`` is observed (0 where undefined), and
    ``puc[i, k]`` the proportion of rows with ``x_i`` missing in which ``x_k`` is observed.
    """
    n, N, S1, S2, P = s["n"], s["N"], s["S1"], s["S2"], s["P"]
    nobs = np.diag(N)
    # v[i, k]: |cor(x_i, x_k)| over rows where both are observed
    v = _cor(N, S1, S1.T, S2, S2.T, P)
    # u[i, k]: |cor(r_i, x_k)| over rows where x_k is observed (r_i: x_i observed)
    nk = nobs[None, :]
    u = _cor(np.broadcast_to(nk, N.shape), N, np.broadcast_to(np.diag(S1)[None, :], N.shape), N,
             np.broadcast_to(np.diag(S2)[None, :], N.shape), S1.T)
    # proportion of usable cases: rows where the target is missing and the predictor observed
    mr = nk - N
    mm = n - nobs[:, None] - nk + N
    with np.errstate(invalid="ignore", divide="ignore"):
        puc = mr / (mr + mm)
    return v, u, puc


def quickpred_matrix(s: dict[str, np.ndarray], names: list[str], *, mincor: float = 0.1,
                     minpuc: float = 0.0, include: Iterable[str] = (), exclude: Iterable[str] = (),
                     usable: np.ndarray | None = None) -> pd.DataFrame:
    """mice's ``quickpred`` rule applied to summed pairwise statistics (see :func:`quickpred_partition`)."""
    v, u, puc = quickpred_statistics(s)
    nobs, n = np.diag(s["N"]), s["n"]
    pm = (np.maximum(v, u) > mincor).astype(np.int64)
    pm[np.nan_to_num(puc, nan=np.inf) < minpuc] = 0
    pos = {c: i for i, c in enumerate(names)}
    for name, val in ((exclude, 0), (include, 1)):
        for c in name:
            pm[:, pos[c]] = val
    np.fill_diagonal(pm, 0)
    pm[nobs == n, :] = 0
    if usable is not None:
        pm[:, ~usable] = 0
        pm[~usable, :] = 0
    return pd.DataFrame(pm, index=list(names), columns=list(names))


def _name_list(arg: Any, param: str, names: list[str]) -> list[str]:
    if arg is None:
        return []
    lst = [arg] if isinstance(arg, str) else list(arg)
    unknown = [c for c in lst if c not in names]
    if unknown:
        raise InputError(f"{param} names unknown columns {unknown}; columns are {names}")
    return lst
