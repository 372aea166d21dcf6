"""Fitting m GLMs at once from passes over the data: Newton (Fisher scoring) steps, chord steps
with the first information, Broyden's secant updates, and the warm start of imputations 2..m
from imputation 1 (:func:`iterate`).

Pure numpy: a pass is a callback that returns the statistics of :mod:`dmice.glm.irls`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from dmice.errors import InputError

#: warm start of imputations 2..m: they start from imputation 1's estimate once its relative
#: step is at most this (or it has converged, or after WARM_MAX_LEAD passes)
WARM_START_STEP = 1e-1
WARM_MAX_LEAD = 6
#: a chord step larger than this fraction of the one before returns the fit to full passes
CHORD_MAX_RATE = 0.25
#: a fit whose last Newton step was larger than this (relative; and than 10 sqrt(tol)) takes a
#: lean pass next (see array_stats): Newton's next step is then far above tol, so that pass is
#: not its last (should it converge there all the same, one more pass takes every statistic)
LEAN_ABOVE = 1e-3


def chord_step(k: int, r: dict[str, Any], beta: list[Any], chord: dict[int, float],
                info0: np.ndarray, tol: float, secant: dict[int, tuple]) -> float:
    """Apply fit ``k``'s chord step (its chord matrix against its score ``r["g"]``) and
    decide whether its next pass is a chord again (see :func:`iterate`); returns the
    step's relative size.

    The chord matrix is imputation 1's information ``info0`` at the fit's first chord, then
    Broyden's update of the one before: the smallest change that maps the fit's last step
    onto the change of its score it caused (``secant[k]``: matrix, score and step of its
    last chord)."""
    g = r["g"]
    if not np.all(np.isfinite(g)):
        raise InputError("the model's statistics are not finite: check the outcome's range "
                         "for the family and the transformations in the formula")
    B = info0
    if k in secant:
        B, g_prev, s_prev = secant[k]
        B = B + np.outer((g_prev - g) - B @ s_prev, s_prev) / (s_prev @ s_prev)
    step = np.linalg.solve(B, g)
    secant[k] = (B, g, step)
    rel = float(np.max(np.abs(step) / (1.0 + np.abs(beta[k]))))
    beta[k] = beta[k] + step
    prev = chord[k]
    rate = rel / prev if np.isfinite(prev) and prev > 0 else None
    if rate is not None and (rate > CHORD_MAX_RATE or rel * rate <= tol):
        del chord[k]  # too slow, or close enough for a full pass to confirm convergence
    elif rel <= tol:
        del chord[k]
    else:
        chord[k] = rel
    return rel


def iterate(one_pass: Callable, m: int, p: int, link: str, tol: float,
             max_iter: int) -> tuple[np.ndarray, list[dict[str, Any]], int]:
    """Fisher scoring (IRLS) of the m fits; returns the estimates, the statistics of each
    fit's last pass and the number of passes over the data.

    Every fit stops at its own convergence: its step is at most ``tol * (1 + |beta|)`` in
    every coordinate (the estimate is then ``beta + step`` and its statistics those of
    that last pass, as for a single fit).  Imputation 1 iterates from the starting means,
    exactly as a fit on its data alone.  With a non-identity link and m > 1, imputations
    2..m wait until imputation 1's relative step is at most :data:`WARM_START_STEP` (or
    it has converged, or has run :data:`WARM_MAX_LEAD` passes, or one pass is left before
    ``max_iter``) and then start from its
    current estimate: completed data sets differ only in their imputed values, so their
    estimates are close and a warm start needs fewer passes than the starting means.  An
    identity link converges in one step from the starting means, so there every fit
    starts there.

    With a canonical link (logit, log), the warm-started fits first iterate by chords:
    their steps solve a chord matrix against their own score, so their passes compute
    the score alone (a few products with X instead of the information matrix, the
    likelihood and the other statistics).  The matrix is imputation 1's information at
    the fit's first chord, corrected after each chord by Broyden's update (see
    :func:`chord_step`).  Without the update the chord converges linearly, at the rate
    of the relative difference between the information matrices of two completed data
    sets (about 1e-2 for typical imputations); the update makes the later steps faster
    (superlinear convergence).  Once the rate measured over two steps predicts a
    remaining error below ``tol``, the fit takes full passes
    again, so that it stops, as every fit does, on a full pass whose own Newton step is at
    most ``tol`` and whose statistics are those of its final estimate.  A chord slower
    than :data:`CHORD_MAX_RATE` per pass, and every fit on the last pass that
    ``max_iter`` allows, returns to full passes.

    A full pass that cannot be a fit's last (its previous step was above
    :data:`LEAN_ABOVE`, so its Newton step is far above ``tol``) is lean: it leaves out
    the log-likelihood, the deviance and the sandwich's meat, which only the last pass
    reports.  Should a fit converge on a lean pass all the same, it takes one more pass.
    """
    beta: list[np.ndarray | None] = [None] * m
    res: list[dict[str, Any] | None] = [None] * m
    done = [False] * m
    lead = m > 1 and link != "identity" and max_iter >= 2
    chords = lead and link in ("logit", "log")
    chord: dict[int, float] = {}  # fit -> relative size of its last chord step
    info0: np.ndarray | None = None  # imputation 1's latest information: a chord's first matrix
    secant: dict[int, tuple] = {}  # fit -> its last chord's matrix, score and step
    active = [0] if lead else list(range(m))
    nrows = None
    it = 0
    last_rel = [np.inf] * m  # each fit's last relative Newton step
    while True:
        last = it + 1 >= max_iter
        grad = frozenset(k for k in active if k in chord) if not last else frozenset()
        # a pass that cannot be a fit's last (its step would be far above tol) leaves out the
        # likelihood and the meat: from a step above LEAN_ABOVE, Newton's next is above tol
        lean = frozenset(k for k in active if k not in grad and link != "identity" and not last
                         and last_rel[k] > max(LEAN_ABOVE, 10.0 * math.sqrt(tol)))
        out = one_pass({k: beta[k] for k in active}, grad, lean)
        it += 1
        for k in active:
            n = int(out[k]["n"])
            nrows = n if nrows is None else nrows
            if n == 0:
                raise InputError("the analysis data have no rows")
            if n != nrows:
                raise InputError("the completed data sets have different numbers of rows")
        rel0 = np.inf
        for k in active:
            r = out[k]
            if k in grad:
                last_rel[k] = chord_step(k, r, beta, chord, info0, tol, secant)
                continue
            chord.pop(k, None)
            if not (np.all(np.isfinite(r["XtWX"])) and np.all(np.isfinite(r["g"]))
                    and np.isfinite(r["pearson"])):
                raise InputError("the model's statistics are not finite: check the outcome's range "
                                 "for the family and the transformations in the formula")
            # Fisher scoring (IRLS); for non-canonical links, Newton's method (observed
            # information) from the third pass on, while that information is positive
            # definite: quadratic instead of linear convergence.
            info = r["XtWX"]
            if beta[k] is not None and it >= 3 and link not in ("logit", "log", "identity"):
                try:
                    np.linalg.cholesky(r["Hobs"])
                    info = r["Hobs"]
                except np.linalg.LinAlgError:
                    pass
            try:
                step = np.linalg.solve(info, r["g"])
            except np.linalg.LinAlgError:
                raise InputError("the model matrix is singular (collinear terms or an empty "
                                 "category level)") from None
            res[k] = r
            if k == 0:
                info0 = info
            if beta[k] is None:  # first pass: the solution is the first estimate, not a step
                beta[k] = step
            else:
                rel = np.abs(step) / (1.0 + np.abs(beta[k]))
                # converged, on a pass with every statistic (else one more pass takes them)
                done[k] = bool(np.all(rel <= tol)) and k not in lean
                beta[k] = beta[k] + step
                last_rel[k] = float(np.max(rel))
                if k == 0:
                    rel0 = float(np.max(rel))
        if lead and active == [0] and (done[0] or rel0 <= WARM_START_STEP
                                         or it >= min(WARM_MAX_LEAD, max_iter - 1)):
            for k in range(1, m):
                beta[k] = beta[0].copy()
                if chords:
                    chord[k] = np.inf
            active = list(range(m))
        active = [k for k in active if not done[k]]
        if not active:
            break
        if it >= max_iter:
            warnings.warn(f"the model did not converge in max_iter={max_iter} passes",
                          RuntimeWarning, stacklevel=4)
            break
    return np.array(beta), res, it
