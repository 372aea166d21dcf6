"""Analysis models fitted on every imputation from distributed sufficient statistics.

:func:`fit_glm` fits a gaussian (identity) or binomial (logit) GLM on each of m
completed dask DataFrames by Newton's method; each Newton step is one pass over
the data for all m fits together, and only gradients and Hessians reach the
client.  The estimates and model-based covariances equal statsmodels' GLM on the
same data; :func:`dmice.pooling.pool` combines them with Rubin's rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from dask import delayed

from dmice import stats
from dmice.errors import InputError

Design = Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]


@dataclass
class GLMFit:
    """One fitted model per imputation."""

    terms: list[str]
    params: np.ndarray  # (m, p)
    cov: np.ndarray  # (m, p, p)
    nobs: int
    df_resid: int
    family: str
    iterations: int


def _partition_stats(df: pd.DataFrame, design: Design, family: str, beta: np.ndarray) -> dict[str, Any]:
    X, y = design(df)
    if family == "binomial":
        return {**stats.logistic(X, y, beta), "n": np.array(float(len(y)))}
    G = stats.gram(X, y)
    return {"G": G, "n": np.array(float(len(y)))}


def _sum(items: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(items[0])
    for it in items[1:]:
        out = {k: out[k] + it[k] for k in out}
    return out


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
    """
    if family not in ("binomial", "gaussian"):
        raise InputError(f"family must be 'binomial' or 'gaussian', got {family!r}")
    import dask

    compute = client.compute if client is not None else None
    m, p = len(frames), len(terms)
    parts = [f.to_delayed() for f in frames]
    beta = np.zeros((m, p))

    def one_pass(beta: np.ndarray) -> list[dict[str, Any]]:
        tasks = [delayed(_sum)([delayed(_partition_stats)(pt, design, family, beta[k]) for pt in parts[k]])
                 for k in range(m)]
        if compute is not None:
            return client.gather(compute(tasks))
        return list(dask.compute(*tasks))

    it = 0
    while True:
        res = one_pass(beta)
        it += 1
        n = int(res[0]["n"])
        if family == "gaussian":
            covs, new = [], []
            for r in res:
                G = r["G"]
                XtX, Xty, yty = G[:p, :p], G[:p, p], G[p, p]
                b = np.linalg.solve(XtX, Xty)
                sigma2 = (yty - 2 * b @ Xty + b @ XtX @ b) / (n - p)
                new.append(b)
                covs.append(sigma2 * np.linalg.inv(XtX))
            return GLMFit(terms, np.array(new), np.array(covs), n, n - p, family, it)
        covs = np.array([np.linalg.inv(r["H"]) for r in res])
        step = np.einsum("kij,kj->ki", covs, np.array([r["g"] for r in res]))
        beta = beta + step
        if np.max(np.abs(step)) < tol or it >= max_iter:
            # covariance at the converged estimates
            res = one_pass(beta)
            covs = np.array([np.linalg.inv(r["H"]) for r in res])
            return GLMFit(terms, beta, covs, n, n - p, family, it)
