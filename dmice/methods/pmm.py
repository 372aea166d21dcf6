"""Type-1 predictive mean matching on all observed rows, as R mice does it, at any size.

The workers compute, for every chain, the predictions of the observed rows from ``beta_hat``
(sorted per partition, with their observed values) and of the missing rows from ``beta*``
(:func:`dmice.block.pmm_candidates`).  The client merges the sorted runs of the partitions
into one sorted list per chain (:func:`merge`), finds for every missing cell the ``d``
observed rows whose predictions are nearest (a contiguous run of the sorted list,
:func:`nearest_runs`) and takes one of them at random (:func:`match`).  Only the chosen
values go back to the workers.

Observed rows whose predictions tie (designs made of categories only have many) stand in for
each other: mice shuffles its donors before sorting them, so the rows of a tie that fall into a
run of ``d`` nearest are a random subset of the tie.  :func:`match` draws a donor that ties
with others uniformly from the whole tie instead, which gives every row the same chance
(the run holds ``r`` of the tie's ``k`` rows: chosen with probability ``r/d``, then each row
``1/k``, against ``r/k`` in the run and ``1/d`` chosen) without shuffling every tie first.

Randomness, keyed as everywhere else (:mod:`dmice.rng`): the choice among the ``d`` nearest,
within a tie, and of the nearer side when two candidates are equally near, comes from the
stream keyed by (seed, chain, iteration, variable, partition) of the missing cell, the one the
workers use to impute every other method; the sorted lists are in a fixed order (ties by
partition, then row).  The result therefore depends on the seed and the partitioning only.

Donor scarcity (von Hippel 2025): where a complete variable drives the missingness strongly,
the missing cells' predictions pile up where few rows are observed, their nearest donors lie
far off and pmm is biased even with all rows as donors.  :func:`match` counts the missing cells
whose prediction lies outside the range of the observed rows' predictions, or whose farthest of
the ``d`` donors is more than ``SCARCE_SD`` residual standard deviations away.

Pure numpy; nothing here touches dask.
"""

from __future__ import annotations

import numpy as np

#: a missing cell's donors are "far" when the farthest of its ``d`` nearest observed
#: predictions is more than this many residual standard deviations from its own prediction
SCARCE_SD = 0.5
#: the share of a variable's missing cells with far donors (or a prediction outside the
#: observed range) from which donor scarcity is logged
SCARCE_SHARE = 0.01
def chain_groups(m: int, n_obs: int, n_mis: int, limit: int) -> list[list[int]]:
    """The chains of each matching round: as many per round as fit in ``limit`` bytes (at least one).

    A chain costs 16 bytes per observed row and 8 per missing cell (counted generously: 12 and
    8, plus 8 per observed row once).  The limit is dask config ``dmice.pmm.match-bytes``
    (256 MiB): a million rows' five chains take one round; each further round costs a round
    trip per visit (64 MB made two at a million rows)."""
    per = max(1, int(limit // max(16 * n_obs + 8 * n_mis, 1)))
    return [list(range(a, min(a + per, m))) for a in range(0, m, per)]


def merge(yhat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sorted list of the observed predictions ``yhat`` (the sorted runs of the partitions,
    in partition order) and its order: ties stay in partition order."""
    order = np.argsort(yhat, kind="stable")  # merges the sorted runs
    return yhat[order], order


def nearest_runs(s: np.ndarray, t: np.ndarray, d: int, g: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Start of the run of the ``d`` values of sorted ``s`` nearest to each ``t`` (``d <= len(s)``;
    sorted ``t`` search faster), and the distance to the farthest of them.

    The run starting at ``i`` is nearer than the one starting at ``i + 1`` when
    ``t - s[i] < s[i + d] - t``, that is when ``t`` lies below the midpoint
    ``(s[i] + s[i + d]) / 2``.  The midpoints never decrease with ``i``, so the nearest run
    starts at the number of midpoints below ``t``: one binary search.  Where ``t`` is a
    midpoint the runs on either side are equally near and one is drawn at random.
    """
    twice = s[:len(s) - d] + s[d:]  # twice the midpoints (2t is exact)
    tt = 2.0 * t
    lo = np.searchsorted(twice, tt, "left")
    tie = np.nonzero(twice[np.minimum(lo, len(twice) - 1)] == tt)[0] if len(twice) else lo[:0]
    if len(tie):
        span = np.searchsorted(twice, tt[tie], "right") - lo[tie]
        lo[tie] += np.minimum((g.random(len(tie)) * (span + 1)).astype(np.intp), span)
    far = np.maximum(t - s[lo], s[lo + d - 1] - t)
    return lo, far


def match(s: np.ndarray, t: np.ndarray, d: int, g: np.random.Generator, sigma: float,
          ties: bool | None = None) -> tuple[np.ndarray, int]:
    """Positions in sorted ``s`` of one of the ``d`` nearest donors of each prediction ``t``,
    drawn at random (a donor that ties with others: any row of the tie, see the module notes),
    and the number of predictions whose donors are scarce (see the module notes).  ``ties``:
    whether ``s`` holds equal values (found out when None)."""
    if not len(t):
        return np.zeros(0, dtype=np.intp), 0
    d = min(d, len(s))
    lo, far = nearest_runs(s, t, d, g)
    pos = lo + g.integers(0, d, len(t))
    if ties is None:
        ties = bool((s[1:] == s[:-1]).any())
    if ties:
        sp = s[pos]
        tied = np.nonzero(((pos > 0) & (s[np.maximum(pos - 1, 0)] == sp))
                          | ((pos < len(s) - 1) & (s[np.minimum(pos + 1, len(s) - 1)] == sp)))[0]
        if len(tied):
            first = np.searchsorted(s, sp[tied], "left")
            size = np.searchsorted(s, sp[tied], "right") - first
            pos[tied] = first + np.minimum((g.random(len(tied)) * size).astype(np.intp), size - 1)
    scarce = (t < s[0]) | (t > s[-1]) | (far > SCARCE_SD * sigma)
    return pos, int(scarce.sum())
