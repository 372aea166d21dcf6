"""IRLS statistics of a GLM on one block of rows: score, information, deviance, and what the
robust covariances and the pooled tests need, accumulated in blocks of rows.

Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmice.glm.links import (
    CANONICAL,
    apply_link,
    deviance_loglik,
    inverse_link,
    loglik_terms,
    mean,
    outcome_constants,
    starting_mu,
    variance,
)

#: rows per block of :func:`array_stats`: the temporaries of a block (a few vectors of
#: this length and one array of X's width) stay in the CPU caches
ROW_BLOCK = 16384


def array_stats(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, off: np.ndarray | None,
                 family: str, link: str, beta: np.ndarray | None, robust: bool = True,
                 consts: dict[str, float] | None = None,
                 work: np.ndarray | None = None, grad_only: bool = False,
                 lean: bool = False) -> dict[str, Any]:
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

    The rows are taken :data:`ROW_BLOCK` at a time, so that the per-row temporaries stay
    in the CPU caches; ``work``, an array of shape ``(ROW_BLOCK, p)``, is the scratch space
    of the weighted design (kept from pass to pass instead of allocated anew).

    With ``grad_only`` (a canonical link and a ``beta``), only the score ``g`` and the row
    count ``n`` are computed (see :func:`score`).  With ``lean``, what only a fit's last
    pass needs is left out: the log-likelihood and deviance (their logarithms cost a
    quarter of a pass) and the sandwich's meat.
    """
    n, p = X.shape
    if grad_only:
        return score(X, y, w, off, link, beta)
    c = outcome_constants(family, y, w) if consts is None else consts
    start = None
    if beta is None:  # the starting means depend on the whole block (poisson: its mean y)
        with np.errstate(divide="ignore", invalid="ignore"):
            start = apply_link(link, starting_mu(family, y))
    if work is None or work.shape != (ROW_BLOCK, p):
        work = np.empty((ROW_BLOCK, p), order="F")
    sums = {"XtWX": np.zeros((p, p)), "g": np.zeros(p), "Hobs": np.zeros((p, p)),
            "meat": np.zeros((p, p)), "pearson": 0.0, "kern": 0.0, "sw": 0.0, "swy": 0.0,
            "swe": 0.0, "swe2": 0.0}
    # a patched matrix's blocks are assembled in one buffer (see PatchedX.block)
    xbuf = np.empty((ROW_BLOCK, p), order="F") if isinstance(X, PatchedX) else None
    for s in range(0, n, ROW_BLOCK):
        rows = slice(s, s + ROW_BLOCK)
        Xb = X[rows] if xbuf is None else X.block(rows, xbuf[:min(ROW_BLOCK, n - s)])
        row_block_stats(sums, Xb, y[rows], None if w is None else w[rows],
                         None if off is None else off[rows], family, link, beta,
                         None if start is None else start[rows], robust and not lean,
                         c["binary"] > 0, work[:min(ROW_BLOCK, n - s)], lean)
    if CANONICAL.get(family) == link:  # observed == expected information, exactly
        sums["Hobs"] = sums["XtWX"]
    kern = sums.pop("kern")
    if lean:
        del sums["meat"]
    out = {k: (v if isinstance(v, np.ndarray) else np.array(v)) for k, v in sums.items()}
    if not lean:
        deviance, loglik = deviance_loglik(family, kern, c)
        out.update(deviance=np.array(deviance), loglik=np.array(loglik))
    out.update(sumlogw=np.array(c["sumlogw"]), n=np.array(float(n)))
    return out


def score(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, off: np.ndarray | None, link: str,
           beta: np.ndarray) -> dict[str, Any]:
    """The score ``X'W(y - mu)`` of a canonical link at ``beta`` (a chord pass of
    :func:`iterate`: a few products with X, no information matrix), and ``n``."""
    n = X.shape[0]
    g = np.zeros(X.shape[1])
    patched = isinstance(X, PatchedX)
    for s in range(0, n, ROW_BLOCK):
        rows = slice(s, s + ROW_BLOCK)
        if patched:  # this imputation's own columns, and imputation 1's where they apply
            parts = [(X.own(rows), X.cols)] + [(X.base[rows, c], c) for c in X.keep]
        else:
            parts = [(X[rows], slice(None))]
        eta = None
        for A, c in parts:
            # a product with a single column as a vector's (numpy's matrix product is slow
            # on an (n, 1) view)
            t = A[:, 0] * beta[c][0] if A.shape[1] == 1 else A @ beta[c]
            eta = t if eta is None else np.add(eta, t, out=eta)
        if off is not None:
            eta += off[rows]
        u = np.subtract(y[rows], mean(link, eta), out=eta)
        if w is not None:
            u *= w[rows]
        for A, c in parts:
            g[c] += A.T @ u
    return {"g": g, "n": np.array(float(n))}


def row_block_stats(sums: dict[str, Any], X: np.ndarray, y: np.ndarray, w: np.ndarray | None,
                     off: np.ndarray | None, family: str, link: str, beta: np.ndarray | None,
                     start: np.ndarray | None, robust: bool, binary: bool,
                     work: np.ndarray, lean: bool = False) -> None:
    """Add the statistics of the rows ``X, y, w, off`` to ``sums`` (see :func:`array_stats`;
    ``start``: the linear predictor at the starting means when ``beta`` is None)."""
    canonical = CANONICAL.get(family) == link
    if beta is None:
        eta = start
        eta0 = eta if off is None else eta - off
    else:
        eta0 = X @ beta
        eta = eta0 if off is None else eta0 + off
    mu, d1, d2 = inverse_link(link, eta, second=not canonical)
    resid = y - mu
    with np.errstate(divide="ignore", invalid="ignore"):
        if canonical:  # d1 == V: the IRLS weights are d1, the score factor y - mu
            V = d1
            wexp = d1 if w is None else w * d1
            u = resid if w is None else w * resid
        else:
            V, dV = variance(family, mu)
            wexp = d1**2 / V if w is None else w * d1**2 / V  # IRLS weights (expected information)
            u = resid * d1 / V if w is None else w * resid * d1 / V  # score_i = u_i x_i
        r2v = resid**2 / V
        sums["pearson"] += float(np.sum(r2v if w is None else w * r2v))
    Xe = np.multiply(X, wexp[:, None], out=work)
    sums["XtWX"] += X.T @ Xe
    if beta is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            sums["g"] += Xe.T @ (eta0 + resid / d1)
    else:
        sums["g"] += X.T @ u
    if not canonical:
        with np.errstate(divide="ignore", invalid="ignore"):
            # observed information: -d(score)/d(eta) = wexp - w (y - mu) d/deta(d1 / V)
            ddeta = (d2 * V - d1**2 * dV) / V**2
            wobs = wexp - (resid * ddeta if w is None else w * resid * ddeta)
        sums["Hobs"] += X.T @ np.multiply(X, wobs[:, None], out=work)
    if robust:
        Xu = np.multiply(X, u[:, None], out=work)
        sums["meat"] += Xu.T @ Xu
    if not lean:
        t = loglik_terms(family, y, mu, binary)
        sums["kern"] += float(np.sum(t) if w is None else np.dot(w, t))
    sums["sw"] += float(len(y) if w is None else np.sum(w))
    sums["swy"] += float(np.sum(y) if w is None else np.dot(w, y))
    sums["swe"] += float(np.sum(eta0) if w is None else np.dot(w, eta0))
    sums["swe2"] += float(np.dot(eta0, eta0) if w is None else np.dot(w * eta0, eta0))


class PatchedX:
    """The model matrix of an imputation whose analysis columns differ from imputation 1's
    in some columns only (a direct design, see :func:`_column_recipes`): imputation 1's
    matrix ``base`` with the model columns ``cols`` replaced by this imputation's ``own``
    (rows by ``len(cols)``, column-major), so that its full matrix is never stored.
    ``keep``: the runs of ``base``'s other columns, as slices (their products with a
    block are views of ``base``, not copies)."""

    def __init__(self, base: np.ndarray, cols: list[int], own: np.ndarray):
        self.base = base
        self.cols = cols
        self._own = own
        self.shape = base.shape
        mine = set(cols)
        self.keep = [slice(a, b) for a, b in runs([j for j in range(base.shape[1]) if j not in mine])]
        # the runs of cols: (columns of the matrix, columns of own)
        self.own_runs, i = [], 0
        for a, b in runs(cols):
            self.own_runs.append((slice(a, b), slice(i, i + b - a)))
            i += b - a

    @property
    def nbytes(self) -> int:  # its own array (the base is imputation 1's)
        return self._own.nbytes

    def __getitem__(self, rows: slice) -> np.ndarray:
        n = len(range(*rows.indices(self.shape[0])))
        return self.block(rows, np.empty((n, self.shape[1]), order="F"))

    def block(self, rows: slice, out: np.ndarray) -> np.ndarray:
        """The block ``rows`` of the matrix, written into ``out`` (one copy of each column)."""
        for c in self.keep:
            out[:, c] = self.base[rows, c]
        for c, o in self.own_runs:
            out[:, c] = self._own[rows, o]
        return out

    def own(self, rows: slice) -> np.ndarray:
        """The replaced columns (:attr:`cols`) of the block ``rows`` (a view)."""
        return self._own[rows]


def runs(js: list[int]) -> list[tuple[int, int]]:
    """The runs of consecutive integers in the sorted ``js``, as ``(first, last + 1)``."""
    out: list[tuple[int, int]] = []
    for j in js:
        if out and out[-1][1] == j:
            out[-1] = (out[-1][0], j + 1)
        else:
            out.append((j, j + 1))
    return out
