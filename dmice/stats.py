"""Sufficient-statistic kernels on plain numpy arrays (no dask).

Each kernel turns the rows of one partition into small statistics whose sums
over partitions are the statistics of the whole data: Gram matrices for linear
models, gradients and Hessians for the Newton steps of logistic and
multinomial models.  The same kernels serve the imputation models and the
analysis models.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit, logsumexp


def gram(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gram matrix of ``[X, y]``: holds X'X, X'y and y'y."""
    Z = np.empty((X.shape[0], X.shape[1] + 1))
    Z[:, :-1] = X
    Z[:, -1] = y
    return Z.T @ Z


def logistic(X: np.ndarray, y: np.ndarray, beta: np.ndarray,
             weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Gradient, information and log-likelihood of a logistic model at ``beta``.

    Returns ``g = X'(y - mu)``, ``H = X' diag(mu (1 - mu)) X`` and ``ll``, each a sum
    over the rows given.
    """
    eta = X @ beta
    mu = expit(eta)
    w = mu * (1.0 - mu)
    r = y - mu
    ll = y * log_expit(eta) + (1.0 - y) * log_expit(-eta)
    if weights is not None:
        w = w * weights
        r = r * weights
        ll = ll * weights
    return {"g": X.T @ r, "H": (X * w[:, None]).T @ X, "ll": np.array(ll.sum())}


def multinomial(X: np.ndarray, codes: np.ndarray, B: np.ndarray) -> dict[str, np.ndarray]:
    """Gradient, information and log-likelihood of a multinomial logit at ``B``.

    ``B`` is ``(q, K-1)``: the coefficients of levels 1..K-1 against level 0.
    Parameters are stacked level by level (``vec`` of ``B`` in column order):
    ``g`` is ``(K-1)q`` and ``H`` is ``((K-1)q, (K-1)q)``.
    """
    n, q = X.shape
    km1 = B.shape[1]
    eta = np.zeros((n, km1 + 1))
    eta[:, 1:] = X @ B
    lse = logsumexp(eta, axis=1)
    P = np.exp(eta - lse[:, None])[:, 1:]  # (n, K-1)
    Y = np.zeros((n, km1))
    c = codes.astype(np.int64)
    has = c > 0
    Y[np.nonzero(has)[0], c[has] - 1] = 1.0
    ll = eta[np.arange(n), c].sum() - lse.sum()
    g = (X.T @ (Y - P)).T.reshape(-1)  # level-major
    H = np.empty((km1 * q, km1 * q))
    for a in range(km1):
        for b in range(a, km1):
            w = P[:, a] * ((1.0 if a == b else 0.0) - P[:, b])
            blk = (X * w[:, None]).T @ X
            H[a * q:(a + 1) * q, b * q:(b + 1) * q] = blk
            if b != a:
                H[b * q:(b + 1) * q, a * q:(a + 1) * q] = blk
    return {"g": g, "H": H, "ll": np.array(ll)}
