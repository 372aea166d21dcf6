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

from dmice import rng as _rng

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


def nearest_runs(s: np.ndarray, t: np.ndarray, d: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start of the run of the ``d`` values of sorted ``s`` nearest to each ``t`` (``d <= len(s)``;
    sorted ``t`` search faster), and the distance to the farthest of them.

    The run starting at ``i`` is nearer than the one starting at ``i + 1`` when
    ``t - s[i] < s[i + d] - t``, that is when ``t`` lies below the midpoint
    ``(s[i] + s[i + d]) / 2``.  The midpoints never decrease with ``i``, so the nearest run
    starts at the number of midpoints below ``t``: one binary search.  Where ``t`` is a
    midpoint the runs on either side are equally near and one is drawn with the uniform ``u``
    of its cell.
    """
    twice = s[:len(s) - d] + s[d:]  # twice the midpoints (2t is exact)
    tt = 2.0 * t
    lo = np.searchsorted(twice, tt, "left")
    tie = np.nonzero(twice[np.minimum(lo, len(twice) - 1)] == tt)[0] if len(twice) else lo[:0]
    if len(tie):
        span = np.searchsorted(twice, tt[tie], "right") - lo[tie]
        lo[tie] += np.minimum((u[tie] * (span + 1)).astype(np.intp), span)
    far = np.maximum(t - s[lo], s[lo + d - 1] - t)
    return lo, far


def uniforms(g: np.random.Generator, n: int) -> np.ndarray:
    """The three uniforms of each of ``n`` missing cells (in the order of their predictions) that
    :func:`match` draws with: the run at a midpoint, the donor in the run, the row in a tie."""
    return g.random((3, n))


def cell_uniforms(seed: int, chain: int, iteration: int, var: int, part: int, n: int,
                  stream: tuple[int, ...] = ()) -> np.ndarray:
    """:func:`uniforms` of partition ``part``'s ``n`` missing cells of ``var`` in one chain and
    iteration, from their stream (the one the workers impute every other method with, and for
    ``by=`` the group's ``stream`` after it): the client and the workers draw the same ones."""
    return uniforms(_rng.generator(seed, _rng.WORKER, chain, iteration, var, part, *stream), n)


def match(s: np.ndarray, t: np.ndarray, d: int, u: np.ndarray, sigma: float,
          ties: bool | None = None) -> tuple[np.ndarray, int]:
    """Positions in sorted ``s`` of one of the ``d`` nearest donors of each prediction ``t``,
    drawn with the cells' :func:`uniforms` ``u`` (a donor that ties with others: any row of the
    tie, see the module notes), and the number of predictions whose donors are scarce (see the
    module notes).  ``ties``: whether ``s`` holds equal values (found out when None).  A subset
    of ``s`` that holds every cell's ``d`` nearest and whole ties gives the same donors."""
    if not len(t):
        return np.zeros(0, dtype=np.intp), 0
    d = min(d, len(s))
    lo, far = nearest_runs(s, t, d, u[0])
    pos = lo + np.minimum((u[1] * d).astype(np.intp), d - 1)
    if ties is None:
        ties = bool((s[1:] == s[:-1]).any())
    if ties:
        sp = s[pos]
        tied = np.nonzero(((pos > 0) & (s[np.maximum(pos - 1, 0)] == sp))
                          | ((pos < len(s) - 1) & (s[np.minimum(pos + 1, len(s) - 1)] == sp)))[0]
        if len(tied):
            first = np.searchsorted(s, sp[tied], "left")
            size = np.searchsorted(s, sp[tied], "right") - first
            pos[tied] = first + np.minimum((u[2, tied] * size).astype(np.intp), size - 1)
    scarce = (t < s[0]) | (t > s[-1]) | (far > SCARCE_SD * sigma)
    return pos, int(scarce.sum())


# -- matching on the workers ---------------------------------------------------------------------
# Where the chains' predictions are too many to gather (dask config dmice.pmm.worker-match-bytes),
# the workers match among themselves: the predictions are split into ranges, one per partition
# (at most MAX_RANGES), at boundaries taken from quantiles of the observed predictions; each
# partition sends each range its observed predictions in the range, the ``d`` nearest beyond it
# on either side (whole ties) and its missing predictions in the range; the range's worker merges
# the observed pieces and matches the missing ones (:func:`match_range`).  A missing cell's ``d``
# nearest observed rows in any partition are among that partition's rows in the cell's range or
# its ``d`` nearest beyond the range's ends, so the merged pieces hold the cell's ``d`` nearest
# of all observed rows (and whole ties), in the order of the full merge: each cell gets the donor
# the client's matching gives it, drawn with the same uniforms (made on the cell's worker).

#: ranges of predictions, and tasks matching them, at most
MAX_RANGES = 16
#: sorted observed predictions each partition reports per chain for the range boundaries
QUANTILES = 64


def quantile_sample(s: np.ndarray, k: int = QUANTILES) -> np.ndarray:
    """``k`` values of sorted ``s`` at evenly spaced ranks (NaN when ``s`` is empty)."""
    if not len(s):
        return np.full(k, np.nan)
    return s[np.linspace(0, len(s) - 1, k).round().astype(np.int64)]


def range_bounds(samples: np.ndarray, counts: np.ndarray, n_ranges: int) -> np.ndarray:
    """``n_ranges - 1`` boundaries splitting the observed predictions of one chain into ranges of
    about equal size, from each partition's :func:`quantile_sample` (``samples``: partitions x k)
    and number of rows (``counts``)."""
    k = samples.shape[1]
    vals = samples.reshape(-1)
    w = np.repeat(np.asarray(counts, dtype=np.float64) / k, k)
    keep = ~np.isnan(vals)
    vals, w = vals[keep], w[keep]
    if not len(vals):
        return np.zeros(n_ranges - 1)
    o = np.argsort(vals, kind="stable")
    cw = np.cumsum(w[o])
    idx = np.searchsorted(cw, cw[-1] * np.arange(1, n_ranges) / n_ranges)
    return vals[o][np.minimum(idx, len(vals) - 1)]


def range_pieces(s: np.ndarray, v: np.ndarray, q: np.ndarray, u: np.ndarray, bounds: np.ndarray, d: int
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
    """One partition's share of each range ``[bounds[r-1], bounds[r])`` for one chain: its sorted
    observed predictions ``s`` in the range and the ``d`` nearest beyond each end (whole ties),
    their values ``v``, and its sorted missing predictions ``q`` in the range with their
    :func:`uniforms` ``u`` and the position of the first of them."""
    n = len(s)
    es = np.concatenate([[0], np.searchsorted(s, bounds, "left"), [n]])
    eq = np.concatenate([[0], np.searchsorted(q, bounds, "left"), [len(q)]])
    out = []
    for r in range(len(bounds) + 1):
        lo, hi = max(0, int(es[r]) - d), min(n, int(es[r + 1]) + d)
        if lo < hi:
            lo = int(np.searchsorted(s, s[lo], "left"))
            hi = int(np.searchsorted(s, s[hi - 1], "right"))
        out.append((s[lo:hi], v[lo:hi], q[eq[r]:eq[r + 1]], u[:, eq[r]:eq[r + 1]], int(eq[r])))
    return out


def match_range(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]], d: int,
                sigma: float) -> list[tuple[int, np.ndarray, int]]:
    """Match one chain's missing predictions of one range: ``pieces`` of the partitions (in order,
    from :func:`range_pieces`).  Returns per partition the position of its first cell, the
    matched values and the number of scarce cells: the values the client's matching gives the
    same cells (the same donors, drawn with the same uniforms)."""
    s_all = np.concatenate([p[0] for p in pieces])
    v_all = np.concatenate([p[1] for p in pieces])
    out = []
    if not len(s_all):
        return [(q0, np.full(len(q), np.nan), len(q)) for _, _, q, _, q0 in pieces]
    s, order = merge(s_all)
    ties = bool((s[1:] == s[:-1]).any())
    for _, _, q, u, q0 in pieces:
        pos, k = match(s, q, d, u, sigma, ties)
        out.append((q0, v_all[order[pos]], k))
    return out
