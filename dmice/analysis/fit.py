"""Fitting the m GLMs of an analysis together: passes over the partition groups held on the
workers (:class:`dmice.runtime.passes.Held`), the solver of :mod:`dmice.glm.solve`, and
:func:`fit_glm`, the entry point with a user-supplied design function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from dask import delayed

from dmice import store
from dmice.analysis.groups import (
    _group_stats,
    _groups,
    _load_group,
    _prefetch,
    _reduce_active,
    _reduce_groups,
)
from dmice.errors import InputError
from dmice.glm.links import check_family
from dmice.glm.solve import iterate
from dmice.runtime import cluster as _cluster
from dmice.runtime import passes as _passes

Design = Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]


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
