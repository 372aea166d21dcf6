"""Type-1 predictive mean matching on all observed rows, as R mice does it, at any size.

The workers compute, for every chain, the predictions of the observed rows from ``beta_hat``
(sorted per partition, with their observed values) and of the missing rows from ``beta*``
(:func:`dmice.block.pmm_candidates`).  The client merges the sorted runs of the partitions
into one sorted list per chain (:func:`merge`), finds for every missing cell the ``d``
observed rows whose predictions are nearest (a contiguous run of the sorted list,
:func:`nearest_runs`) and takes one of them at random (:func:`match`).  Only the chosen
values go back to the workers.

Randomness, keyed as everywhere else (:mod:`dmice.rng`): the order of observed rows whose
predictions tie (mice shuffles its donors before sorting them) comes from a stream keyed by
(seed, chain, iteration, variable, partition) of the row; the choice among the ``d`` nearest,
and of the nearer side when two candidates are equally near, from the stream keyed by
(seed, chain, iteration, variable, partition) of the missing cell, the one the workers use to
impute every other method.  The result therefore depends on the seed and the partitioning only.

Donor scarcity (von Hippel 2025): where a complete variable drives the missingness strongly,
the missing cells' predictions pile up where few rows are observed, their nearest donors lie
far off and pmm is biased even with all rows as donors.  :func:`match` counts the missing cells
whose prediction lies outside the range of the observed rows' predictions, or whose farthest of
the ``d`` donors is more than ``SCARCE_SD`` residual standard deviations away.

Pure numpy; nothing here touches dask.
"""

from __future__ import annotations

import numpy as np

from dmice import rng as _rng

#: a missing cell's donors are "far" when the farthest of its ``d`` nearest observed
#: predictions is more than this many residual standard deviations from its own prediction
SCARCE_SD = 0.5
#: the share of a variable's missing cells with far donors (or a prediction outside the
#: observed range) from which donor scarcity is logged
SCARCE_SHARE = 0.01
#: bytes of observed and missing predictions gathered per matching round; more chains are split
#: over several rounds (a chain costs 16 bytes per observed row and 8 per missing cell)
MATCH_BYTES = 64 * 2**20


def chain_groups(m: int, n_obs: int, n_mis: int, limit: int = MATCH_BYTES) -> list[list[int]]:
    """The chains of each matching round: as many per round as fit in ``limit`` bytes (at least one)."""
    per = max(1, int(limit // max(16 * n_obs + 8 * n_mis, 1)))
    return [list(range(a, min(a + per, m))) for a in range(0, m, per)]


def merge(yhat: np.ndarray, y: np.ndarray, counts: np.ndarray, seed: int, key: tuple[int, ...]
          ) -> tuple[np.ndarray, np.ndarray]:
    """One sorted list of observed predictions ``yhat`` and their values ``y`` from the sorted
    runs of the partitions (``counts`` rows each, in partition order).  Ties are put in random
    order: the tie keys of partition ``p``'s rows come from the stream keyed by
    ``(seed, POOL, *key, p, 1)``."""
    order = np.argsort(yhat, kind="stable")  # merges the sorted runs
    s = yhat[order]
    # each partition put its ties in random order; these keys shuffle them across partitions
    order = shuffle_ties(s, order, lambda: np.concatenate(
        [_rng.generator(seed, _rng.POOL, *key, p, 1).random(int(n)) for p, n in enumerate(counts)]))
    return s, y[order]


def shuffle_ties(s: np.ndarray, order: np.ndarray, keys) -> np.ndarray:
    """``order`` (``s = x[order]`` sorted) with the elements of equal ``s`` ordered by their
    ``keys()`` (one per element of ``x``; only called when there are ties)."""
    eq = s[1:] == s[:-1]
    if not eq.any():
        return order
    tied = np.zeros(len(s), dtype=bool)
    tied[1:] |= eq
    tied[:-1] |= eq
    pos = np.nonzero(tied)[0]
    group = np.cumsum(np.concatenate([[True], ~eq]))[pos]
    order = order.copy()
    order[pos] = order[pos][np.lexsort((keys()[order[pos]], group))]
    return order


def nearest_runs(s: np.ndarray, t: np.ndarray, d: int, g: np.random.Generator) -> np.ndarray:
    """Start of the run of the ``d`` values of sorted ``s`` nearest to each ``t`` (``d <= len(s)``;
    sorted ``t`` search faster).

    The run grows one value at a time towards the nearer side; when both sides are equally near
    the side is drawn at random.
    """
    hi = np.searchsorted(s, t)
    lo = hi.copy()
    ext = np.concatenate([[-np.inf], s, [np.inf]])  # ext[i + 1] == s[i]
    for _ in range(d):
        dl = t - ext[lo]
        dr = ext[hi + 1] - t
        left = dl < dr
        tie = dl == dr
        if tie.any():
            left[tie] = g.random(int(tie.sum())) < 0.5
        lo -= left
        hi += ~left
    return lo


def match(s: np.ndarray, ys: np.ndarray, t: np.ndarray, d: int, g: np.random.Generator,
          sigma: float) -> tuple[np.ndarray, int]:
    """Values of one of the ``d`` nearest donors of each prediction ``t``, drawn at random, and
    the number of predictions whose donors are scarce (see the module notes)."""
    if not len(t):
        return np.zeros(0), 0
    d = min(d, len(s))
    lo = nearest_runs(s, t, d, g)
    vals = ys[lo + g.integers(0, d, len(t))]
    far = np.maximum(np.abs(t - s[lo]), np.abs(s[lo + d - 1] - t))
    scarce = (t < s[0]) | (t > s[-1]) | (far > SCARCE_SD * sigma)
    return vals, int(scarce.sum())
