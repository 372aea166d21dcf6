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


def verdict(conv: pd.DataFrame, window: tuple[int, int] | None = None) -> str:
    """One line: the largest R-hat and whether every statistic is below :data:`RHAT_OK`.

    ``window`` (first, last iteration) is named in the line when given.  Fewer than 4
    iterations cannot be judged and count as not converged.
    """
    r = conv["rhat"].dropna() if not conv.empty else pd.Series(dtype=float)
    span = f" over iterations {window[0]}-{window[1]}" if window else ""
    if r.empty:
        return ("NOT converged: too few iterations to judge (R-hat needs at least 4 iterations "
                "after burn-in)")
    worst = conv.loc[r.idxmax()]
    ok = bool((r < RHAT_OK).all())
    return (f"max R-hat {r.max():.3f}{span} ({worst['variable']} {worst['statistic']}): "
            + ("converged" if ok else f"NOT converged (threshold {RHAT_OK})"))
