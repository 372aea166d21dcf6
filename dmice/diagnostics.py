"""Convergence diagnostics of the chains: R-hat and autocorrelation (pure numpy).

The chain statistics gathered inside the visits (mean and standard deviation of
the imputed values of each variable, or the proportion of each level, per
iteration and chain; R mice's ``chainMean`` / ``chainVar``) are treated as m
Markov chains.  R-hat is the rank-normalised split R-hat of Vehtari, Gelman,
Simpson, Carpenter and Bürkner (2021): the larger of the bulk R-hat (on
rank-normalised draws) and the tail R-hat (on rank-normalised absolute
deviations from the median), each the classic potential scale reduction factor
of the chains split in halves.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from scipy.special import ndtri
from scipy.stats import rankdata

#: R-hat below this counts as converged (Vehtari et al. 2021 recommend 1.01 for MCMC
#: with thousands of draws; with tens of iterations 1.05 is the practical threshold)
RHAT_OK = 1.05


def _psrf(x: np.ndarray) -> float:
    """Classic potential scale reduction factor of chains ``x`` (chains, draws)."""
    n = x.shape[1]
    w = x.var(axis=1, ddof=1).mean()
    b = n * x.mean(axis=1).var(ddof=1)
    if w == 0:
        return np.nan if b == 0 else np.inf
    var_plus = (n - 1) / n * w + b / n
    return float(np.sqrt(var_plus / w))


def _split(x: np.ndarray) -> np.ndarray:
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def _rank_normalise(x: np.ndarray) -> np.ndarray:
    r = rankdata(x, method="average").reshape(x.shape)
    return ndtri((r - 3 / 8) / (x.size + 1 / 4))


def rhat(x: np.ndarray) -> float:
    """Rank-normalised split R-hat of chains ``x`` with shape (chains, draws).

    NaN when there are fewer than 4 draws per chain or every draw is equal.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[1] < 4 or not np.all(np.isfinite(x)):
        return np.nan
    s = _split(x)
    bulk = _psrf(_rank_normalise(s))
    tail = _psrf(_rank_normalise(np.abs(s - np.median(s))))
    return float(np.nanmax([bulk, tail])) if not (np.isnan(bulk) and np.isnan(tail)) else np.nan


def _psrf_batch(x: np.ndarray) -> np.ndarray:
    n = x.shape[2]
    w = x.var(axis=2, ddof=1).mean(axis=1)
    b = n * x.mean(axis=2).var(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(((n - 1) / n * w + b / n) / w)


def rhat_batch(x: np.ndarray) -> np.ndarray:
    """:func:`rhat` of many sets of chains at once: ``x`` (sets, chains, draws) of finite draws."""
    reps, m, n = x.shape
    if n < 4:
        return np.full(reps, np.nan)
    half = n // 2
    s = np.concatenate([x[:, :, :half], x[:, :, n - half:]], axis=1)

    def norm(a: np.ndarray) -> np.ndarray:
        r = rankdata(a.reshape(reps, -1), method="average", axis=1).reshape(a.shape)
        return ndtri((r - 3 / 8) / (a[0].size + 1 / 4))

    bulk = _psrf_batch(norm(s))
    med = np.median(s.reshape(reps, -1), axis=1)[:, None, None]
    tail = _psrf_batch(norm(np.abs(s - med)))
    return np.fmax(bulk, tail)


def autocorrelation(x: np.ndarray, lag: int = 1) -> float:
    """Lag-``lag`` autocorrelation pooled over chains ``x`` (chains, draws), as mice's convergence()."""
    x = np.asarray(x, dtype=float)
    if x.shape[1] <= lag + 1:
        return np.nan
    d = x - x.mean(axis=1, keepdims=True)
    den = (d**2).sum()
    return float((d[:, lag:] * d[:, :-lag]).sum() / den) if den > 0 else np.nan


def convergence(chain_stats: pd.DataFrame, *, window: int | None = None) -> pd.DataFrame:
    """R-hat and lag-1 autocorrelation of every chain statistic.

    Parameters
    ----------
    chain_stats : pandas.DataFrame
        ``MultipleImputation.chain_stats``: columns iteration, variable, chain and
        ``mean``/``sd`` (continuous) or ``level``/``proportion`` (categorical).
    window : int, optional
        Use only the last ``window`` iterations.

    Returns
    -------
    pandas.DataFrame
        One row per variable and statistic: ``variable, statistic, rhat, ac1``.
    """
    rows = []
    if chain_stats.empty:
        return pd.DataFrame(columns=["variable", "statistic", "rhat", "ac1"])
    cs = chain_stats
    if window is not None:
        cs = cs[cs["iteration"] > cs["iteration"].max() - window]
    for var, g in cs.groupby("variable", sort=False):
        series = []
        if "mean" in g and g["mean"].notna().any():
            series += [("mean", g.pivot_table(index="chain", columns="iteration", values="mean")),
                       ("sd", g.pivot_table(index="chain", columns="iteration", values="sd"))]
        if "level" in g and g["level"].notna().any():
            for lev, gl in g.groupby("level", sort=False):
                series.append((f"proportion[{lev}]",
                               gl.pivot_table(index="chain", columns="iteration", values="proportion")))
        for name, tab in series:
            x = tab.to_numpy()
            rows.append({"variable": var, "statistic": name, "rhat": rhat(x),
                         "ac1": autocorrelation(x)})
    return pd.DataFrame(rows, columns=["variable", "statistic", "rhat", "ac1"])


@functools.lru_cache(maxsize=256)
def mixed_bound(chains: int, draws: int, statistics: int = 1, reps: int = 4000) -> float:
    """Bound that R-hat of well-mixed chains stays below: the ``1 - 0.05/statistics`` quantile
    of the rank-normalised split R-hat of ``chains`` independent chains of ``draws``
    independent draws (a family-wise 5% false alarm over ``statistics`` R-hats), by
    simulation with a fixed seed.  With few draws R-hat is noisy: 5 chains of 5 draws give a
    median of 1.10 even for perfectly mixed chains, so a fixed 1.05 would call almost every
    short run unconverged."""
    g = np.random.default_rng(20211)
    reps = max(400, min(reps, 4_000_000 // max(chains * draws, 1)))  # bounded memory for long runs
    sims = rhat_batch(g.standard_normal((reps, chains, draws)))
    sims = sims[np.isfinite(sims)]
    if not len(sims):
        return np.inf
    return float(np.quantile(sims, 1 - 0.05 / max(statistics, 1)))


def trailing_window(iterations: int) -> int:
    """Iterations judged for convergence: the second half, the first half being burn-in.

    As in Gelman and Rubin's original recipe, the first half of the chains (which starts
    from the random initial fill) is discarded; R-hat needs at least 4 iterations, so a
    verdict needs at least 8.
    """
    return iterations // 2


def max_rhat(chain_stats: pd.DataFrame, iterations: int) -> float:
    """Largest R-hat over every statistic in the trailing window (NaN when not available)."""
    w = trailing_window(iterations)
    if w < 4 or chain_stats.empty:
        return np.nan
    r = convergence(chain_stats, window=w)["rhat"].dropna()
    return float(r.max()) if len(r) else np.nan


def threshold(chains: int, draws: int, statistics: int) -> float:
    """R-hat below which a statistic counts as converged: :data:`RHAT_OK`, or the bound
    well-mixed chains stay below (:func:`mixed_bound`) when that is larger (few draws).

    From 1,000 draws in all the bound is below 1.02 (simulated up to 200 statistics), so
    the simulation is skipped there."""
    if chains * draws >= 1000:
        return RHAT_OK
    return max(RHAT_OK, mixed_bound(chains, draws, statistics))


def verdict(conv: pd.DataFrame, window: tuple[int, int] | None = None, chains: int | None = None) -> str:
    """One line: the largest R-hat and whether every statistic is below the threshold.

    ``window`` (first, last iteration) is named in the line when given.  With ``chains``
    the threshold is :func:`threshold` for that many chains and the window's draws, else
    :data:`RHAT_OK`.  Fewer than 4 iterations cannot be judged and count as not converged.
    """
    r = conv["rhat"].dropna() if not conv.empty else pd.Series(dtype=float)
    span = f" over iterations {window[0]}-{window[1]}" if window else ""
    if r.empty:
        return ("NOT converged: too few iterations to judge (R-hat needs at least 4 iterations "
                "after burn-in)")
    worst = conv.loc[r.idxmax()]
    limit = RHAT_OK
    if chains is not None and window is not None:
        limit = threshold(chains, window[1] - window[0] + 1, len(r))
    ok = bool((r < limit).all())
    why = f"{limit:.3f}" + (f", what {chains} well-mixed chains of {window[1] - window[0] + 1} iterations "
                            f"can reach" if limit > RHAT_OK else "")
    return (f"max R-hat {r.max():.3f}{span} ({worst['variable']} {worst['statistic']}): "
            + (f"converged (below {why})" if ok else f"NOT converged (threshold {why})"))
