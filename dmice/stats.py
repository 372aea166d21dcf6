"""Sufficient-statistic kernels on plain numpy arrays (no dask).

Each kernel turns the rows of one partition (one chain's design) into small
statistics whose sums over partitions are the statistics of the whole data:
gradients and information matrices for the Newton steps of the logistic and
multinomial imputation models.  (Gram matrices of the linear models are built
in :mod:`dmice.block`, which reuses the part that never changes.)
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit


def logistic(X: np.ndarray, y: np.ndarray, beta: np.ndarray) -> dict[str, np.ndarray]:
    """Gradient, information and log-likelihood of a logistic model at ``beta``.

    Returns ``g = X'(y - mu)``, ``H = X' diag(mu (1 - mu)) X`` and ``ll``, each a sum
    over the rows given.
    """
    eta = X @ beta
    mu = expit(eta)
    w = mu * (1.0 - mu)
    r = y - mu
    ll = y * eta + log_expit(-eta)  # y log(mu) + (1 - y) log(1 - mu)
    Xs = X * np.sqrt(w)[:, None]
    return {"g": X.T @ r, "H": Xs.T @ Xs, "ll": np.array(ll.sum())}


def softmax0(eta: np.ndarray) -> np.ndarray:
    """Probabilities of K levels from the K-1 linear predictors against level 0 (last axis)."""
    full = np.concatenate([np.zeros(eta.shape[:-1] + (1,)), eta], axis=-1)
    full -= full.max(axis=-1, keepdims=True)
    np.exp(full, out=full)
    full /= full.sum(axis=-1, keepdims=True)
    return full


def multinomial(X: np.ndarray, codes: np.ndarray, B: np.ndarray) -> dict[str, np.ndarray]:
    """Gradient, information and log-likelihood of a multinomial logit at ``B``.

    ``B`` is ``(q, K-1)``: the coefficients of levels 1..K-1 against level 0.
    Parameters are stacked level by level (``vec`` of ``B`` in column order):
    ``g`` is ``(K-1)q`` and ``H`` is ``((K-1)q, (K-1)q)`` with blocks
    ``H_ab = X' diag(p_a (delta_ab - p_b)) X``, computed as ``blockdiag(X' A_a) - A'A``
    with ``A_a = diag(p_a) X`` (one rank-k update for all blocks).
    """
    n, q = X.shape
    km1 = B.shape[1]
    P = softmax0(X @ B)
    c = codes.astype(np.int64)
    ll = np.log(np.clip(P[np.arange(n), c], 1e-300, None)).sum()
    P = P[:, 1:]
    Y = np.zeros((n, km1))
    has = c > 0
    Y[np.nonzero(has)[0], c[has] - 1] = 1.0
    g = ((Y - P).T @ X).reshape(-1)  # level-major
    A = (P[:, :, None] * X[:, None, :]).reshape(n, km1 * q)
    H = -(A.T @ A)
    XA = X.T @ A
    for a in range(km1):
        H[a * q:(a + 1) * q, a * q:(a + 1) * q] += XA[:, a * q:(a + 1) * q]
    return {"g": g, "H": H, "ll": np.array(ll)}
