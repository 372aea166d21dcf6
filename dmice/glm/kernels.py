"""Sufficient-statistic kernels on plain numpy arrays (no dask).

Each kernel turns the rows of one partition (one chain's design) into small
statistics whose sums over partitions are the statistics of the whole data:
gradients and information matrices for the Newton steps of the logistic,
Firth-logistic, multinomial, proportional-odds (polr) and Poisson imputation
models.  (Gram matrices of the linear models are built
in :mod:`dmice.block`, which reuses the part that never changes.)
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit


def logistic(X: np.ndarray, y: np.ndarray, beta: np.ndarray, loglik: bool = False
             ) -> dict[str, np.ndarray]:
    """Gradient and information (and with ``loglik`` the log-likelihood) of a logistic model at ``beta``.

    Returns ``g = X'(y - mu)``, ``H = X' diag(mu (1 - mu)) X`` and, when asked, ``ll``, each a
    sum over the rows given.  (Only Firth's fits use ``ll``; its logarithms cost as much as
    the rest of the kernel.)
    """
    eta = X @ beta
    mu = expit(eta)
    w = mu * (1.0 - mu)
    Xs = X * np.sqrt(w)[:, None]
    out = {"g": X.T @ (y - mu), "H": Xs.T @ Xs}
    if loglik:
        out["ll"] = np.array((y * eta + log_expit(-eta)).sum())  # y log(mu) + (1 - y) log(1 - mu)
    return out


def softmax0(eta: np.ndarray) -> np.ndarray:
    """Probabilities of K levels from the K-1 linear predictors against level 0 (last axis)."""
    full = np.concatenate([np.zeros(eta.shape[:-1] + (1,)), eta], axis=-1)
    full -= full.max(axis=-1, keepdims=True)
    np.exp(full, out=full)
    full /= full.sum(axis=-1, keepdims=True)
    return full


#: rows per block of the multinomial information (its weighted copies of X stay in the caches)
ROW_BLOCK = 8192

#: below this largest linear predictor the multinomial probabilities are computed without
#: shifting by the row maximum (exp cannot overflow; the shift costs a third of the kernel)
_SAFE_ETA = 300.0


def multinomial(X: np.ndarray, codes: np.ndarray, B: np.ndarray, loglik: bool = False
                ) -> dict[str, np.ndarray]:
    """Gradient and information (and with ``loglik`` the log-likelihood) of a multinomial logit at ``B``.

    ``B`` is ``(q, K-1)``: the coefficients of levels 1..K-1 against level 0.
    Parameters are stacked level by level (``vec`` of ``B`` in column order):
    ``g`` is ``(K-1)q`` and ``H`` is ``((K-1)q, (K-1)q)`` with blocks
    ``H_ab = X' diag(p_a (delta_ab - p_b)) X``.  Probabilities are kept level-major
    (``(K-1, n)``, contiguous rows), so every elementwise step runs on long vectors, and
    the distinct blocks of ``H`` come from one matrix product per block of rows.
    """
    n, q = X.shape
    km1 = B.shape[1]
    eta = np.dot(B.T, X.T)  # (K-1, n)
    if eta.size and eta.max() < _SAFE_ETA:
        top = None
        P = np.exp(eta)
        den = P.sum(axis=0)
        den += 1.0
    else:
        top = np.maximum(eta.max(axis=0), 0.0)  # level 0 has eta = 0
        P = np.exp(eta - top)
        den = P.sum(axis=0) + np.exp(-top)
    P /= den  # P(level a + 1), rows a = 0..K-2
    c = codes.astype(np.int64)
    rows = np.nonzero(c > 0)[0]
    at = (c[rows] - 1) * n + rows  # flat positions of the observed levels in (K-1, n)
    R = np.negative(P)
    R.reshape(-1)[at] += 1.0  # indicator of the observed level minus its probability
    out = {"g": (R @ X).reshape(-1)}  # level-major
    pairs = [(a, b) for a in range(km1) for b in range(a, km1)]
    W = np.stack([P[a] * (1.0 - P[a]) if a == b else np.negative(P[a] * P[b]) for a, b in pairs])
    # rows a block at a time: the weighted copies of a block of X stay in the CPU caches
    work = np.empty((min(n, ROW_BLOCK), len(pairs) * q), order="F")
    blocks = np.zeros((q, len(pairs) * q))
    for s in range(0, n, ROW_BLOCK):
        Xb = X[s:s + ROW_BLOCK]
        Wk = work[:len(Xb)]
        for i in range(len(pairs)):
            np.multiply(Xb, W[i, s:s + ROW_BLOCK, None], out=Wk[:, i * q:(i + 1) * q])
        blocks += Xb.T @ Wk
    H = np.empty((km1 * q, km1 * q))
    for i, (a, b) in enumerate(pairs):
        Hab = blocks[:, i * q:(i + 1) * q]
        H[a * q:(a + 1) * q, b * q:(b + 1) * q] = Hab
        if b != a:
            H[b * q:(b + 1) * q, a * q:(a + 1) * q] = Hab.T
    out["H"] = H
    if loglik:
        out["ll"] = np.array(eta.reshape(-1)[at].sum() - np.log(den).sum()
                             - (0.0 if top is None else top.sum()))
    return out


#: Firth fits with at most this many coefficients take exact Newton steps on the penalised
#: likelihood (the workers return a q x q^2 tensor); larger ones take logistf's I^-1 U* steps
FIRTH_EXACT_MAX_Q = 60


def logistic_firth(X: np.ndarray, y: np.ndarray, beta: np.ndarray,
                   inv_info: np.ndarray | None) -> dict[str, np.ndarray]:
    """Logistic statistics plus Firth's modified score at ``beta``.

    Returns the statistics of :func:`logistic` and ``gf = X'(y - mu + h (1/2 - mu))``, where
    the hat values ``h_i = w_i x_i' inv_info x_i`` use the broadcast inverse information
    ``inv_info`` (``gf`` equals ``g`` when it is None).  ``inv_info`` comes from the previous
    Newton round; at a fixed point of the iteration it is the inverse information at ``beta``,
    so the fixed point solves Firth's score equation exactly.
    """
    out = logistic(X, y, beta, loglik=True)
    if inv_info is None:
        out["gf"] = out["g"].copy()
        return out
    mu = expit(X @ beta)
    w = mu * (1.0 - mu)
    ht = np.einsum("ij,jk,ik->i", X, inv_info, X)  # x_i' I^-1 x_i
    h = w * ht
    out["gf"] = X.T @ (y - mu + h * (0.5 - mu))
    q = X.shape[1]
    if q <= FIRTH_EXACT_MAX_Q:
        # second derivatives of log|I(beta)| / 2 (exact Newton on the penalised likelihood):
        # A = X' diag(ht w (1 - 6w)) X and T[j] = X' diag(w (1 - 2 mu) x_j) X = dI/dbeta_j
        out["A"] = (X * (ht * w * (1 - 6 * w))[:, None]).T @ X
        a = w * (1 - 2 * mu)
        T = np.zeros((q, q * q))
        for s in range(0, X.shape[0], 4096):
            Xc = X[s:s + 4096]
            Z = (Xc[:, :, None] * Xc[:, None, :]).reshape(len(Xc), q * q)
            T += (Xc * a[s:s + 4096, None]).T @ Z
        out["T"] = T
    return out


def poisson(X: np.ndarray, y: np.ndarray, beta: np.ndarray) -> dict[str, np.ndarray]:
    """Gradient, information and log-likelihood (up to ``-sum log y!``) of a Poisson log-linear model.

    ``g = X'(y - mu)``, ``H = X' diag(mu) X`` with ``mu = exp(X beta)``, summed over the rows given.
    """
    eta = X @ beta
    mu = np.exp(np.minimum(eta, 700.0))
    Xs = X * np.sqrt(mu)[:, None]
    return {"g": X.T @ (y - mu), "H": Xs.T @ Xs, "ll": np.array(float((y * eta - mu).sum())),
            "sy": np.array(float(y.sum()))}


def polr(X: np.ndarray, codes: np.ndarray, cuts: np.ndarray, beta: np.ndarray) -> dict[str, np.ndarray]:
    """Gradient, observed information and log-likelihood of a proportional-odds logit.

    ``P(Y <= k | x) = expit(cuts[k] - x' beta)`` for ``k = 0..K-2`` (``X`` without an intercept).
    Parameters are stacked as ``[cuts (K-1), beta (q)]``.  With ``u = cuts[y] - eta``,
    ``l = cuts[y-1] - eta`` and ``p = F(u) - F(l)`` each row contributes ``log p``; its
    derivatives in ``(u, l)`` are combined with ``du/dtheta = (e_y, -x)`` and
    ``dl/dtheta = (e_{y-1}, -x)``.  The log-likelihood is concave (Pratt 1981), so ``H``
    (the negative Hessian) is positive semi-definite.  Also returns the level counts
    ``counts`` (for the starting cutpoints).
    """
    n = X.shape[0]
    km1 = len(cuts)
    c = codes.astype(np.int64)
    eta = X @ beta
    ext = np.concatenate([[-np.inf], cuts, [np.inf]])
    u = ext[c + 1] - eta
    lo = ext[c] - eta
    Fu, Fl = expit(u), expit(lo)
    # P(l < Y* <= u) computed on the side that keeps precision
    p = np.where(lo > 0, expit(-lo) - expit(-u), Fu - Fl)
    p = np.clip(p, 1e-300, None)
    fu, fl = Fu * (1 - Fu), Fl * (1 - Fl)
    gu, gl = fu / p, -fl / p
    huu = fu * (1 - 2 * Fu) / p - gu * gu
    hll = -fl * (1 - 2 * Fl) / p - gl * gl
    hul = -gu * gl  # f(u) f(l) / p^2
    DU = np.zeros((n, km1 + X.shape[1]))
    DL = np.zeros_like(DU)
    top = c < km1
    DU[np.nonzero(top)[0], c[top]] = 1.0
    bot = c > 0
    DL[np.nonzero(bot)[0], c[bot] - 1] = 1.0
    DU[:, km1:] = -X
    DL[:, km1:] = -X
    g = DU.T @ gu + DL.T @ gl
    H = (DU * huu[:, None]).T @ DU + (DL * hll[:, None]).T @ DL
    C = (DU * hul[:, None]).T @ DL
    H = -(H + C + C.T)
    ll = float(np.log(p).sum())
    counts = np.bincount(c, minlength=km1 + 1).astype(float)
    return {"g": g, "H": H, "ll": np.array(ll), "counts": counts}
