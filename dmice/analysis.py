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

:func:`fit_glm` is the lower-level entry point with a user-supplied design
function instead of a formula.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from dask import delayed
from scipy import special
from scipy.special import expit, ndtr, ndtri

from dmice.errors import InputError

Design = Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]

FAMILIES = {"gaussian": ("identity",), "binomial": ("logit", "probit", "cloglog"), "poisson": ("log",)}
COV_TYPES = ("nonrobust", "HC0", "HC1")
_SQRT_2PI = math.sqrt(2 * math.pi)


# ------------------------------------------------------------------------------------------
# families and links
# ------------------------------------------------------------------------------------------
def _inverse_link(link: str, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mu``, ``dmu/deta`` and ``d2mu/deta2`` of a link at ``eta``."""
    if link == "identity":
        return eta, np.ones_like(eta), np.zeros_like(eta)
    if link == "log":
        mu = np.exp(eta)
        return mu, mu, mu
    if link == "logit":
        mu = expit(eta)
        d1 = mu * (1.0 - mu)
        return mu, d1, d1 * (1.0 - 2.0 * mu)
    if link == "probit":
        mu = ndtr(eta)
        d1 = np.exp(-0.5 * eta**2) / _SQRT_2PI
        return mu, d1, -eta * d1
    if link == "cloglog":
        ee = np.exp(eta)
        mu = -np.expm1(-ee)
        d1 = np.exp(eta - ee)
        return mu, d1, d1 * (1.0 - ee)
    raise AssertionError(link)


def _link(link: str, mu: np.ndarray) -> np.ndarray:
    """The link function ``eta = g(mu)``."""
    if link == "identity":
        return mu
    if link == "log":
        return np.log(mu)
    if link == "logit":
        return np.log(mu / (1.0 - mu))
    if link == "probit":
        return ndtri(mu)
    if link == "cloglog":
        return np.log(-np.log1p(-mu))
    raise AssertionError(link)


def _starting_mu(family: str, y: np.ndarray) -> np.ndarray:
    """Starting means of the first IRLS pass, as statsmodels' ``family.starting_mu``.

    For poisson the mean of ``y`` is the partition's (at least 0.1), so the start, not
    the estimates, depends on the partitioning.
    """
    if family == "gaussian":
        return y
    if family == "binomial":
        return (y + 0.5) / 2.0
    ybar = max(float(y.mean()), 0.1) if len(y) else 1.0
    return (y + ybar) / 2.0


def _variance(family: str, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variance function ``V(mu)`` and its derivative ``V'(mu)``."""
    if family == "gaussian":
        return np.ones_like(mu), np.zeros_like(mu)
    if family == "poisson":
        return mu, np.ones_like(mu)
    return mu * (1.0 - mu), 1.0 - 2.0 * mu


def _deviance(family: str, y: np.ndarray, mu: np.ndarray, w: np.ndarray) -> float:
    if family == "gaussian":
        return float(np.sum(w * (y - mu) ** 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        if family == "poisson":
            t = np.where(y > 0, y * np.log(y / mu), 0.0) - (y - mu)
        else:
            t = (np.where(y > 0, y * np.log(y / mu), 0.0)
                 + np.where(y < 1, (1 - y) * np.log((1 - y) / (1 - mu)), 0.0))
    return float(2.0 * np.sum(w * t))


def _check_family(family: str, link: str | None) -> str:
    if family not in FAMILIES:
        raise InputError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    links = FAMILIES[family]
    if link is None:
        return links[0]
    if link not in links:
        raise InputError(f"link for family {family!r} must be one of {list(links)}, got {link!r}")
    return link


# ------------------------------------------------------------------------------------------
# per-partition statistics
# ------------------------------------------------------------------------------------------
def _check_outcome(family: str, y: np.ndarray) -> None:
    if family == "binomial" and np.any((y < 0) | (y > 1)):
        raise InputError("a binomial outcome must be 0/1 or a proportion in [0, 1]")
    if family == "poisson" and np.any(y < 0):
        raise InputError("a poisson outcome must be a count >= 0")


def _loglik_kernel(family: str, y: np.ndarray, mu: np.ndarray, w: np.ndarray) -> float:
    """Binomial (without the binomial coefficient) or poisson log-likelihood; 0 for gaussian."""
    if family == "gaussian":
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        if family == "poisson":
            t = np.where(y > 0, y * np.log(mu), 0.0) - mu - special.gammaln(y + 1.0)
        else:
            t = np.where(y > 0, y * np.log(mu), 0.0) + np.where(y < 1, (1 - y) * np.log1p(-mu), 0.0)
    return float(np.sum(w * t))


def _array_stats(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, off: np.ndarray | None,
                 family: str, link: str, beta: np.ndarray | None, robust: bool = True) -> dict[str, Any]:
    """Statistics of one block of rows at ``beta``, summed over its rows.

    Returns the expected information ``XtWX``, the score ``g`` (both without the
    dispersion), the observed information ``Hobs``, the meat of the sandwich ``meat``
    (sum of the outer products of the per-row scores; zeros unless ``robust``), the
    Pearson chi-square, the deviance, the log-likelihood kernel ``loglik`` (binomial
    and poisson), ``sum(log w)``, the sums ``sw = sum(w)``, ``swy = sum(w y)``,
    ``swe``, ``swe2`` (of ``w eta0`` and ``w eta0**2`` with ``eta0 = X beta``, used for
    R-squared) and the row count.  With ``beta=None`` (the first IRLS pass) the
    statistics are taken at the starting means instead, and ``g`` is
    ``X'W(z - offset)`` with the working response ``z``, so that ``solve(XtWX, g)`` is
    the first estimate.
    """
    n = len(y)
    w = np.ones(n) if w is None else w
    off = np.zeros(n) if off is None else off
    if beta is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            eta = _link(link, _starting_mu(family, y))
        eta0 = eta - off
    else:
        eta0 = X @ beta
        eta = eta0 + off
    mu, d1, d2 = _inverse_link(link, eta)
    V, dV = _variance(family, mu)
    with np.errstate(divide="ignore", invalid="ignore"):
        wexp = w * d1**2 / V  # IRLS weights (expected information)
        u = w * (y - mu) * d1 / V  # per-row score factor: score_i = u_i x_i
        pearson = float(np.sum(w * (y - mu) ** 2 / V))
    Xe = X * wexp[:, None]
    XtWX = X.T @ Xe
    if link in ("logit", "log", "identity"):  # canonical links: observed == expected, exactly
        Hobs = XtWX
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            # observed information: -d(score)/d(eta) = wexp - w (y - mu) d/deta(d1 / V)
            ddeta = (d2 * V - d1**2 * dV) / V**2
            wobs = wexp - w * (y - mu) * ddeta
        Hobs = X.T @ (X * wobs[:, None])
    if robust:
        Xu = X * u[:, None]
        meat = Xu.T @ Xu
    else:
        meat = np.zeros_like(XtWX)
    if beta is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            g = Xe.T @ (eta - off + (y - mu) / d1)
    else:
        g = X.T @ u
    with np.errstate(divide="ignore"):
        sumlogw = float(np.sum(np.log(w[w > 0])))
    return {
        "XtWX": XtWX,
        "g": g,
        "Hobs": Hobs,
        "meat": meat,
        "pearson": np.array(pearson),
        "deviance": np.array(_deviance(family, y, mu, w)),
        "loglik": np.array(_loglik_kernel(family, y, mu, w)),
        "sumlogw": np.array(sumlogw),
        "sw": np.array(float(np.sum(w))),
        "swy": np.array(float(np.sum(w * y))),
        "swe": np.array(float(np.sum(w * eta0))),
        "swe2": np.array(float(np.sum(w * eta0**2))),
        "n": np.array(float(n)),
    }


def _partition_stats(df: pd.DataFrame, design: Callable[[pd.DataFrame], tuple], family: str,
                     link: str, beta: np.ndarray | None) -> dict[str, Any]:
    """:func:`_array_stats` of the design ``(X, y, w, offset)`` of one pandas partition."""
    X, y, w, off = _arrays(design(design.prepare(df)) if hasattr(design, "prepare") else design(df))
    _check_outcome(family, y)
    return _array_stats(X, y, w, off, family, link, beta)


def _arrays(d: tuple) -> tuple:
    X, y, w, off = d
    return (np.asarray(X, dtype=float), np.asarray(y, dtype=float),
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
def _rows_differ(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the rows where any column of ``a`` differs from ``b`` (same length)."""
    mask = np.zeros(len(a), dtype=bool)
    for c in a.columns:
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


@dataclass
class _Group:
    """Design arrays of one partition in every imputation of the group.

    The first imputation's arrays are complete; every other imputation keeps only the
    rows where its analysis columns differ from the first (``rows``), or all its rows
    (``rows is None``) when the partitions are not the same length.
    """

    ks: list[int]
    base: tuple
    diffs: list[tuple[np.ndarray | None, tuple] | None]

    def arrays(self, j: int) -> tuple:
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
            full = full.copy()
            full[rows] = part
            out.append(full)
        return tuple(out)


def _load_group(design: Any, family: str, ks: list[int], *parts: pd.DataFrame) -> _Group:
    """Build the design of one partition for the imputations ``ks`` (one pandas frame each).

    The formula is evaluated once on the first imputation's partition and, for every
    other imputation, only on the rows whose analysis columns differ from it (the
    imputed cells): completed data sets share their observed values.
    """
    prepare = getattr(design, "prepare", lambda d: d)
    frames = [prepare(p) for p in parts]
    base = _arrays(design(frames[0]))
    _check_outcome(family, base[1])
    diffs: list[tuple[np.ndarray | None, tuple] | None] = [None]
    for df in frames[1:]:
        if len(df) != len(frames[0]):
            arr = _arrays(design(df))
            _check_outcome(family, arr[1])
            diffs.append((None, arr))
            continue
        rows = np.flatnonzero(_rows_differ(df, frames[0]))
        if not len(rows):
            diffs.append(None)
            continue
        arr = _arrays(design(df.iloc[rows]))
        _check_outcome(family, arr[1])
        diffs.append((rows, arr))
    return _Group(list(ks), base, diffs)


def _group_stats(group: _Group, betas: dict[int, np.ndarray | None], family: str, link: str,
                 robust: bool) -> dict[int, dict[str, Any]]:
    """Statistics of every imputation of a group at its own ``betas[k]``."""
    out = {}
    for j, k in enumerate(group.ks):
        X, y, w, off = group.arrays(j)
        out[k] = _array_stats(X, y, w, off, family, link, betas[k], robust)
    return out


def _groups(frames: list[Any]) -> list[tuple[list[int], list[Any]]]:
    """Partition groups: all m versions of partition i together when the m frames have the
    same number of partitions, else one group per (imputation, partition)."""
    parts = [f.to_delayed() for f in frames]
    if any(len(pk) == 0 for pk in parts):
        raise InputError("every completed data set needs at least one partition")
    m = len(frames)
    if all(len(pk) == len(parts[0]) for pk in parts):
        return [(list(range(m)), [parts[k][i] for k in range(m)]) for i in range(len(parts[0]))]
    return [([k], [p]) for k in range(m) for p in parts[k]]


def _reduce_groups(outs: list[dict[int, dict[str, Any]]], m: int) -> list[dict[str, Any]]:
    return [_sum([o[k] for o in outs if k in o]) for k in range(m)]


def _fixed_pass(frames: list[Any], design: Any, family: str, link: str, betas: np.ndarray,
                client: Any = None) -> list[dict[str, Any]]:
    """One pass over the data at fixed estimates ``betas[k]`` for imputation k."""
    groups = _groups(frames)
    design_d = delayed(design, pure=True, traverse=False)
    tasks = [delayed(_group_stats)(delayed(_load_group)(design_d, family, ks, *pts),
                                   {k: betas[k] for k in ks}, family, link, False)
             for ks, pts in groups]
    return _reduce_groups(list(_compute(client, *tasks)), len(frames))


def _default_client() -> Any:
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


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
         client: Any = None) -> _Fits:
    """Fisher scoring on all m frames at once.

    The design of every partition group (the m versions of a partition) is built once,
    kept in the workers' memory (with a distributed client) and reused by every pass;
    each pass is one task per group computing the statistics of all m imputations.
    """
    import dask

    m = len(frames)
    groups = _groups(frames)
    design_d = delayed(design, pure=True, traverse=False)
    loads = [delayed(_load_group)(design_d, family, ks, *pts) for ks, pts in groups]
    robust = cov_type != "nonrobust"
    client = client if client is not None else _default_client()
    if client is not None:
        held = client.compute(loads)

        def one_pass(beta: np.ndarray | None) -> list[dict[str, Any]]:
            futs = [client.submit(_group_stats, g, {k: None if beta is None else beta[k] for k in ks},
                                  family, link, robust, pure=False)
                    for g, (ks, _) in zip(held, groups)]
            return _reduce_groups(client.gather(futs), m)
    else:
        held = list(dask.compute(*loads))

        def one_pass(beta: np.ndarray | None) -> list[dict[str, Any]]:
            outs = [_group_stats(g, {k: None if beta is None else beta[k] for k in ks}, family, link,
                                 robust) for g, (ks, _) in zip(held, groups)]
            return _reduce_groups(outs, m)

    try:
        beta, res, it = _iterate(one_pass, m, p, link, tol, max_iter)
    finally:
        if client is not None:
            client.cancel(held)
        del held
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


def _iterate(one_pass: Callable, m: int, p: int, link: str, tol: float,
             max_iter: int) -> tuple[np.ndarray, list[dict[str, Any]], int]:
    beta: np.ndarray | None = None
    it = 0
    while True:
        res = one_pass(beta)
        it += 1
        n = int(res[0]["n"])
        if n == 0:
            raise InputError("the analysis data have no rows")
        if any(int(r["n"]) != n for r in res):
            raise InputError("the completed data sets have different numbers of rows")
        step = np.empty((m, p))
        for k, r in enumerate(res):
            if not np.all(np.isfinite(r["XtWX"])) or not np.all(np.isfinite(r["g"])):
                raise InputError("the model's statistics are not finite: check the outcome's range "
                                 "for the family and the transformations in the formula")
            # Fisher scoring (IRLS); for non-canonical links, Newton's method (observed
            # information) from the third pass on, while that information is positive
            # definite: quadratic instead of linear convergence.
            info = r["XtWX"]
            if beta is not None and it >= 3 and link not in ("logit", "log", "identity"):
                try:
                    np.linalg.cholesky(r["Hobs"])
                    info = r["Hobs"]
                except np.linalg.LinAlgError:
                    pass
            try:
                step[k] = np.linalg.solve(info, r["g"])
            except np.linalg.LinAlgError:
                raise InputError("the model matrix is singular (collinear terms or an empty "
                                 "category level)") from None
        if beta is None:  # first pass: the solution is the first estimate, not a step
            beta, converged = step, False
        else:
            converged = bool(np.all(np.abs(step) <= tol * (1.0 + np.abs(beta))))
            beta = beta + step
        if converged:
            break
        if it >= max_iter:
            warnings.warn(f"the model did not converge in max_iter={max_iter} passes",
                          RuntimeWarning, stacklevel=4)
            break
    return beta, res, it


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
    link = _check_family(family, None)
    fits = _fit(list(frames), _XYDesign(design), len(terms), family=family, link=link, tol=tol,
                max_iter=max_iter, client=client)
    return GLMFit(list(terms), fits.params, fits.cov, fits.nobs, fits.nobs - len(terms), family,
                  fits.iterations)


# ------------------------------------------------------------------------------------------
# analyze: formulas
# ------------------------------------------------------------------------------------------
class _FormulaDesign:
    """Replays one formulaic model spec on a pandas partition.

    String columns are cast to Categorical with the global levels first, so every
    partition yields the same columns.
    """

    def __init__(self, spec: Any, columns: list[str], levels: dict[str, list[Any]],
                 weights: str | None, offset: str | None):
        self.spec = spec
        self.columns = columns
        self.levels = levels
        self.weights = weights
        self.offset = offset

    def prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df[self.columns]
        missing = [c for c in self.columns if df[c].isna().any()]
        if missing:
            raise InputError(f"the analysis columns {missing} have missing values")
        if self.levels:
            df = df.assign(**{c: pd.Categorical(df[c], categories=lv) for c, lv in self.levels.items()})
        return df

    def __call__(self, df: pd.DataFrame) -> tuple:
        """Design arrays ``(X, y, w, offset)`` of a frame returned by :meth:`prepare`."""
        mm = self.spec.get_model_matrix(df)
        X = np.asarray(mm.rhs, dtype=float)
        y = np.asarray(mm.lhs, dtype=float)[:, 0]
        if len(y) != len(df):
            raise InputError("the formula's terms have missing values after evaluation")
        w = df[self.weights].to_numpy(dtype=float) if self.weights else None
        off = df[self.offset].to_numpy(dtype=float) if self.offset else None
        return X, y, w, off


def _as_frames(data: Any) -> list[Any]:
    import dask.dataframe as dd

    from dmice.result import MultipleImputation

    if isinstance(data, str):
        from dmice.api import open as _open

        data = _open(data)
    if isinstance(data, MultipleImputation):
        return [data.complete(k) for k in range(1, data.m + 1)]
    if isinstance(data, (list, tuple)) and data:
        out = []
        for i, f in enumerate(data):
            if isinstance(f, pd.DataFrame):
                out.append(dd.from_pandas(f, npartitions=max(1, math.ceil(len(f) / 500_000)),
                                          sort=False))
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

    def __repr__(self) -> str:
        head = (f"<dmice.AnalysisResult {self.formula}  family={self.family} link={self.link} "
                f"cov_type={self.cov_type} m={self.m} nobs={self.nobs:,} dfcom={self.dfcom:g}>")
        table = self.summary().to_string(index=False, float_format=lambda v: f"{v:.4g}")
        return f"{head}\n{table}"


def _compute(client: Any, *objs: Any) -> tuple:
    import dask

    if client is not None:
        return tuple(client.gather(client.compute(list(objs))))
    return dask.compute(*objs)


def _sorted_levels(values: set) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types in an object column
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def _formula_error(e: Exception) -> str:
    """formulaic's message without the wrapped exception's text (which could quote data)."""
    msg = str(e).strip().splitlines()[0].split(" [", 1)[0].strip() if str(e).strip() else type(e).__name__
    cause = e.__cause__ or e.__context__
    return f"{msg} ({type(cause).__name__})" if cause is not None else msg


def _build_spec(formula: str, frames: list[Any], weights: str | None,
                offset: str | None, client: Any = None) -> tuple[Any, list[str], _FormulaDesign]:
    from formulaic import Formula
    from formulaic.errors import FormulaicError

    if not isinstance(formula, str) or "~" not in formula:
        raise InputError(f"formula must be a string 'outcome ~ terms', got {formula!r}")
    try:
        f = Formula(formula)
    except FormulaicError as e:
        raise InputError(f"cannot parse formula {formula!r}: {_formula_error(e)}") from None
    if not hasattr(f, "lhs") or not hasattr(f, "rhs"):
        raise InputError(f"formula {formula!r} must have an outcome and terms: 'outcome ~ terms'")
    meta = frames[0]._meta
    names = [str(c) for c in meta.columns]
    needed = sorted(str(v) for v in f.required_variables)
    unknown = [v for v in needed if v not in names]
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
        uniq = _compute(client, *[fr[c].dropna().unique() for fr in frames for c in strings])
        for i, c in enumerate(strings):
            vals = set()
            for k in range(len(frames)):
                vals.update(pd.Series(uniq[k * len(strings) + i]).tolist())
            levels[c] = _sorted_levels(vals)
    probe = _FormulaDesign(None, columns, levels, weights, offset)
    (first,) = _compute(client, frames[0].get_partition(0))
    try:
        spec = f.get_model_matrix(probe.prepare(first)).model_spec
    except FormulaicError as e:
        raise InputError(f"cannot evaluate formula {formula!r}: {_formula_error(e)}") from None
    lhs_cols = list(spec.lhs.column_names)
    if len(lhs_cols) != 1:
        raise InputError(f"the outcome of formula {formula!r} must be one numeric column, "
                         f"got {len(lhs_cols)} columns")
    terms = [str(t) for t in spec.rhs.column_names]
    return spec, terms, _FormulaDesign(spec, columns, levels, weights, offset)


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
    The model spec is built once, on the first partition of the first imputation
    (with global categorical levels), and replayed on every partition, so all
    partitions and imputations share the same columns.  Each Fisher-scoring pass is
    one graph over all m imputations and all partitions; only ``p x p`` statistics
    reach the client.

    Examples
    --------
    >>> res = dmice.analyze(imp, "y ~ x + C(g)", family="binomial")   # doctest: +SKIP
    >>> res.summary(exponentiate=True)                                 # doctest: +SKIP
    """
    from dmice.pooling import pool

    link = _check_family(family, link)
    if cov_type not in COV_TYPES:
        raise InputError(f"cov_type must be one of {list(COV_TYPES)}, got {cov_type!r}")
    frames = _as_frames(data)
    spec, terms, design = _build_spec(formula, frames, weights, offset, client)
    p = len(terms)
    fits = _fit(frames, design, p, family=family, link=link, cov_type=cov_type, tol=tol,
                max_iter=max_iter, client=client)
    n = fits.nobs
    dfc = float(dfcom) if dfcom is not None else float(max(n - p, 1))
    pooled = pool(fits.params, fits.cov, dfcom=dfc, terms=terms)
    per = [ImputationFit(pd.Series(fits.params[k], index=terms),
                         pd.DataFrame(fits.cov[k], index=terms, columns=terms),
                         float(fits.scale[k]), float(fits.deviance[k])) for k in range(len(frames))]
    return AnalysisResult(formula=formula, family=family, link=link, cov_type=cov_type, terms=terms,
                          fits=per, nobs=n, dfcom=dfc, iterations=fits.iterations, pooled_result=pooled)
