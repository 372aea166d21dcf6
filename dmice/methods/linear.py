"""Bayesian linear regression from a Gram matrix (mice's ``norm`` draw).

Given ``G = [X y]'[X y]`` over the observed rows, the fit uses mice's tiny ridge
``V = (X'X + kappa * diag(X'X))^-1``, ``beta_hat = V X'y`` and draws
``sigma*^2 = RSS / chi2(n - q)`` and ``beta* = beta_hat + sigma* chol(V) z``
(Rubin 1987, p. 167).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LinearFit:
    coef: np.ndarray
    V: np.ndarray  # (X'X + penalty)^-1
    rss: float
    df: float
    n: float


def fit(G: np.ndarray, n: float, *, ridge: float = 1e-5, penalty: float = 0.0) -> LinearFit:
    """Ridge-stabilised least squares from the Gram matrix of ``[X, y]``.

    ``ridge`` multiplies the diagonal of X'X (mice's ``ridge``); ``penalty`` adds a
    fixed amount to the diagonal of every coefficient but the intercept (column 0),
    the stronger fallback used when there are too few observations.
    """
    q = G.shape[0] - 1
    xtx, xty, yty = G[:q, :q], G[:q, q], G[q, q]
    A = xtx + np.diag(np.diag(xtx) * ridge)
    if penalty:
        A[np.arange(1, q), np.arange(1, q)] += penalty
    L = np.linalg.cholesky(A)  # raises LinAlgError when X'X is singular
    Li = np.linalg.inv(L)
    V = Li.T @ Li
    coef = V @ xty
    rss = float(yty - 2 * coef @ xty + coef @ xtx @ coef)
    return LinearFit(coef=coef, V=V, rss=max(rss, 0.0), df=max(n - q, 1.0), n=n)


def draw(f: LinearFit, g: np.random.Generator) -> tuple[np.ndarray, float]:
    """Draw ``(beta*, sigma*)`` from the posterior of the linear model."""
    sigma = float(np.sqrt(f.rss / g.chisquare(f.df)))
    L = np.linalg.cholesky(f.V)
    beta = f.coef + sigma * (L @ g.standard_normal(len(f.coef)))
    return beta, sigma
