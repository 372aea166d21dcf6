#!/usr/bin/env python
"""Coverage of pooled 95% intervals when a level of a predictor never shows one outcome.

Usage::

    python benchmarks/bench_rare.py [--reps 100] [--n 2000] [--m 5] [--out benchmarks/RESULTS.md]

Data (per replication, seed = replication number): ``x ~ N(0, 1)``; ``z`` in {A, B, C, R} with
probabilities 0.35/0.30/0.25/0.10; a binary ``b`` with ``P(b = 1) = expit(-0.5 + x + d_z)``,
``d = (0, 0.5, -0.5)`` for A, B, C and ``b = 0`` always in level R (a structural zero: the
logistic imputation model of ``b`` is quasi-separated); an outcome ``y = 1 + b + 0.5 x + e``,
``e ~ N(0, 1)``.  ``b`` is missing at random given ``x`` and ``y`` (about 30%).

Each replication imputes ``b`` with dmice's default (separation detected, Firth refit) and with
``separation="none"`` (the maximum-likelihood logistic fit kept, as mice without augmentation:
the coefficient of R diverges and its parameter draws spread over +-hundreds, so missing ``b`` in
level R come out 0 or 1 at random).  The pooled analyses (statsmodels OLS per completed data set,
pooled by ``dmice.pool`` with Rubin's rules) are the mean of ``b`` and the regression ``y ~ b + x``; the truths are the population mean of ``b``
(Gauss-Hermite integral) and the coefficients 1 and 0.5.  Reported per method: mean bias,
empirical coverage of the 95% intervals (its Monte-Carlo standard error is
``sqrt(0.95 * 0.05 / reps)``) and mean interval width; also for the complete data before deletion.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import time

import numpy as np
import pandas as pd
from scipy.special import expit

P_Z = {"A": 0.35, "B": 0.30, "C": 0.25, "R": 0.10}
D_Z = {"A": 0.0, "B": 0.5, "C": -0.5}


def truth_mean_b() -> float:
    t, w = np.polynomial.hermite_e.hermegauss(80)  # E over x ~ N(0, 1)
    w = w / w.sum()
    return float(sum(P_Z[k] * np.sum(w * expit(-0.5 + t + d)) for k, d in D_Z.items()))


def make(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    g = np.random.default_rng(seed)
    x = g.normal(size=n)
    z = g.choice(list(P_Z), n, p=list(P_Z.values()))
    d = pd.Series(z).map(D_Z).fillna(0.0).to_numpy()
    b = (g.random(n) < expit(-0.5 + x + d)).astype(float)
    b[z == "R"] = 0.0
    y = 1 + b + 0.5 * x + g.normal(size=n)
    full = pd.DataFrame({"x": x, "z": pd.Categorical(z), "b": b, "y": y})
    inc = full.copy()
    inc.loc[g.random(n) < expit(-1.2 + 0.5 * x + 0.3 * (y - 1.5)), "b"] = np.nan
    return full, inc


def _pooled_ols(frames: list[pd.DataFrame], outcome: list[str], preds: list[str]) -> pd.DataFrame:
    """OLS on each completed data set (statsmodels), pooled by Rubin's rules (dmice.pool)."""
    import statsmodels.api as sm

    from dmice import pool

    est, var = [], []
    for f in frames:
        X = sm.add_constant(f[preds].to_numpy(float), has_constant="add") if preds \
            else np.ones((len(f), 1))
        fit = sm.OLS(f[outcome[0]].to_numpy(float), X).fit()
        est.append(fit.params)
        var.append(fit.cov_params())
    terms = ["Intercept"] + preds
    return pool(np.array(est), np.array(var), dfcom=len(frames[0]) - len(terms),
                terms=terms).summary().set_index("term")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--max-iter", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows-csv", default=None, help="also write every replication's results here")
    a = ap.parse_args()

    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    import dmice

    logging.getLogger("dmice").setLevel(logging.WARNING)
    truth = {"mean_b": truth_mean_b(), "b": 1.0, "x": 0.5}
    rows = []
    t0 = time.time()
    load0 = os.getloadavg()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cl, Client(cl) as client:
        for r in range(a.reps):
            full, inc = make(a.n, r)
            ddf = dd.from_pandas(inc, npartitions=2)
            fits = {"complete data": [full]}
            for name, sep in (("dmice default (Firth)", "firth"), ("plain ML (separation='none')", "none")):
                imp = dmice.impute(ddf, m=a.m, max_iter=a.max_iter, seed=1000 + r, separation=sep,
                                   client=client, progress=lambda *_: None)
                fits[name] = [imp.complete(k).compute() for k in range(1, a.m + 1)]
            for name, frames in fits.items():
                s1 = _pooled_ols(frames, ["b"], [])
                s2 = _pooled_ols(frames, ["y"], ["b", "x"])
                for est, s, term in (("mean_b", s1, "Intercept"), ("b", s2, "b"), ("x", s2, "x")):
                    row = s.loc[term]
                    rows.append({"method": name, "estimand": est, "rep": r,
                                 "err": row["estimate"] - truth[est],
                                 "cover": row["conf_low"] <= truth[est] <= row["conf_high"],
                                 "width": row["conf_high"] - row["conf_low"]})
            print(f"rep {r + 1}/{a.reps} {time.time() - t0:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    if a.rows_csv:
        df.to_csv(a.rows_csv, index=False)
    tab = df.groupby(["estimand", "method"], sort=False).agg(
        bias=("err", "mean"), bias_se=("err", lambda e: e.std(ddof=1) / np.sqrt(len(e))),
        coverage=("cover", "mean"), width=("width", "mean")).reset_index()
    mc = np.sqrt(0.95 * 0.05 / a.reps)
    lines = [f"## Coverage with a structural-zero level (bench_rare.py), {_dt.datetime.now(_dt.timezone.utc):%a %b %d %H:%M UTC %Y}",
             "",
             f"- command: `python benchmarks/bench_rare.py --reps {a.reps} --n {a.n} --m {a.m} --max-iter {a.max_iter}`",
             f"- {a.reps} replications, n = {a.n}, m = {a.m}, {a.max_iter} iterations; b missing at random "
             "given x and y (about 30%); level R (10% of rows) never has b = 1; Monte-Carlo SE of a 95% "
             f"coverage: {mc:.3f}; run time {time.time() - t0:.0f} s, load average at start "
             f"{load0[0]:.1f}",
             f"- truths: mean of b = {truth['mean_b']:.4f}, coefficient of b in y ~ b + x = 1, of x = 0.5",
             "",
             "| estimand | method | bias (± MC SE) | coverage of 95% CI | mean CI width |",
             "| --- | --- | ---: | ---: | ---: |"]
    for _, t in tab.iterrows():
        lines.append(f"| {t['estimand']} | {t['method']} | {t['bias']:+.4f} (± {t['bias_se']:.4f}) | "
                     f"{t['coverage']:.3f} | {t['width']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
