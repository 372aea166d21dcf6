#!/usr/bin/env python
"""Predictive mean matching at scale: bias of the donor sample against matching on all rows.

Usage::

    python benchmarks/bench_pmm.py [--rows 200000] [--reps 25] [--timing-rows 100000 1000000]
                                   [--timing-repeats 2] [--out benchmarks/RESULTS.md]

1. The scenario of von Hippel (2025): X ~ N(0, 1), Y = X + e, P(Y missing) = expit(-1 + 3X),
   ``--rows`` rows, ``--reps`` replications (data set r and imputation seed r).  Each
   replication imputes with m = 5, 5 iterations, and pools the slope of ``y ~ x`` (OLS per
   imputation, Rubin's rules) for

   * ``donor_pool=10_000``: the former default, a fixed sample of observed rows;
   * the new default: type-1 matching on all observed rows (the matching rounds);
   * ``donor_pool=10**9``: the sample-based code path with every observed row in the sample,
     i.e. all-row matching computed the former way (the reference for the new default);
   * ``norm``.

   Reported: the mean bias of the pooled slope (true slope 1), in pooled standard errors, the
   standard deviation of the pooled slope over the replications against the pooled standard
   error sqrt(T) and against sqrt(B/m) (what finite m explains), and the coverage of the
   95% intervals.

2. Run time of ``dmice.impute(m=5, max_iter=10)`` on the demo cohort of
   ``benchmarks/bench_impute.py`` at each ``--timing-rows`` size, the former default
   (``donor_pool=10_000``) and the new one alternating on the same cluster and data,
   ``--timing-repeats`` times each.

Everything runs on one ``LocalCluster`` (2 worker processes x 1 thread).  A dated section is
appended to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit
from scipy.stats import t as t_dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = [
    ("former default, `donor_pool=10_000`", {"donor_pool": 10_000}),
    ("new default (all observed rows, matching rounds)", {}),
    ("all-row matching, former code path (`donor_pool=10**9`)", {"donor_pool": 10**9}),
    ("`norm`", {"method": {"y": "norm"}}),
]


def scenario(n: int, seed: int) -> pd.DataFrame:
    g = np.random.default_rng([2025, seed])
    x = g.standard_normal(n)
    y = x + g.standard_normal(n)
    y[g.random(n) < expit(-1 + 3 * x)] = np.nan
    return pd.DataFrame({"x": x, "y": y})


def pooled_slope(imp: Any) -> dict[str, float]:
    from dmice.pooling import pool_scalar

    q, u = [], []
    for k in range(1, imp.m + 1):
        c = imp.complete(k).compute()
        x, y = c["x"].to_numpy(), c["y"].to_numpy()
        xc = x - x.mean()
        sxx = float(xc @ xc)
        b = float(xc @ (y - y.mean())) / sxx
        res = y - y.mean() - b * xc
        q.append(b)
        u.append(float(res @ res) / (len(x) - 2) / sxx)
    p = pool_scalar(np.array(q), np.array(u), n=len(x), k=2)
    half = t_dist.ppf(0.975, p.df) * math.sqrt(p.t)
    return {"qbar": p.qbar, "t": p.t, "b": p.b, "m": imp.m, "cover": float(abs(p.qbar - 1) <= half)}


def run_scenario(client: Any, rows: int, reps: int, verbose: bool) -> pd.DataFrame:
    import dask.dataframe as dd

    import dmice

    out = []
    for r in range(reps):
        df = scenario(rows, r)
        ddf = client.persist(dd.from_pandas(df, npartitions=2))
        for name, kw in CONFIGS:
            t0 = time.perf_counter()
            imp = dmice.impute(ddf, m=5, max_iter=5, seed=r + 1, client=client, progress=None, **kw)
            secs = time.perf_counter() - t0
            res = pooled_slope(imp)
            scarce = [e for e in imp.logged_events.to_dict("records")
                      if str(e["event"]).startswith("donor scarcity")] if len(imp.logged_events) else []
            imp.close()
            out.append({"config": name, "rep": r, "seconds": secs, "scarcity_logged": bool(scarce), **res})
            if verbose:
                print(f"  rep {r} {name}: slope {res['qbar']:.4f} ({secs:.1f} s)", flush=True)
    return pd.DataFrame(out)


def summarize(res: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for name, _ in CONFIGS:
        d = res[res["config"] == name]
        bias = d["qbar"] - 1
        se = np.sqrt(d["t"])
        rows.append({"config": name, "reps": len(d), "bias": bias.mean(),
                     "bias_se": bias.mean() / se.mean(), "mean_bias_in_se": (bias / se).mean(),
                     "sd_over_seeds": d["qbar"].std(ddof=1), "pooled_se": se.mean(),
                     "sqrt_b_m": np.sqrt(d["b"] / d["m"]).mean(), "coverage": d["cover"].mean(),
                     "scarcity": d["scarcity_logged"].mean(), "seconds": d["seconds"].median()})
    return rows


def run_timing(client: Any, sizes: list[int], repeats: int, verbose: bool) -> list[dict[str, Any]]:
    import dask
    import dask.dataframe as dd
    from bench_impute import cohort_chunk
    from distributed import futures_of, wait

    import dmice

    out = []
    for rows in sizes:
        per = min(1_000_000, math.ceil(rows / 2))
        sizes_ = [per] * (rows // per) + ([rows % per] if rows % per else [])
        meta = cohort_chunk(10, 2026, 0).iloc[:0]
        ddf = dd.from_delayed([dask.delayed(cohort_chunk)(n, 2026, i) for i, n in enumerate(sizes_)],
                              meta=meta, verify_meta=False)
        ddf = client.persist(ddf)
        wait(futures_of(ddf))
        warm = rows == sizes[0]  # a warm-up pair (worker imports) before the first size, not reported
        for k in range(0 if warm else 1, repeats + 1):
            for name, kw in (("former default", {"donor_pool": 10_000}), ("new default", {})):
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                imp = dmice.impute(ddf, m=5, max_iter=10, seed=1, client=client, progress=None, **kw)
                secs = time.perf_counter() - t0
                eng = imp._engine
                rec = {"rows": rows, "config": name, "repeat": k, "seconds": secs, "rounds": eng.rounds,
                       "mib_gathered": eng.bytes_gathered / 2**20, "load1": load}
                imp.close()
                if k:
                    out.append(rec)
                if verbose:
                    print(f"  timing {rows:,} {name} #{k}: {secs:.1f} s (load {load:.1f})", flush=True)
        del ddf
    return out


def paired_differences(res: pd.DataFrame) -> list[dict[str, Any]]:
    """Per replication, each method's pooled slope minus that of all-row matching computed the
    former way (CONFIGS[2]): how far a method's draws lie from exact matching on the same data."""
    ref = res[res["config"] == CONFIGS[2][0]].set_index("rep")["qbar"]
    out = []
    for name, _ in CONFIGS:
        if name == CONFIGS[2][0]:
            continue
        diff = res[res["config"] == name].set_index("rep")["qbar"] - ref
        out.append({"config": name, "mean": diff.mean(), "sd": diff.std(ddof=1), "max": diff.abs().max()})
    return out


def render(summary: list[dict[str, Any]], timing: list[dict[str, Any]], info: dict[str, str],
           args: argparse.Namespace, load_end: str, paired: list[dict[str, Any]] | None = None) -> str:
    lines = [f"## pmm on all observed rows — {info['date']}", "",
             f"- command: `python benchmarks/bench_pmm.py {' '.join(sys.argv[1:])}`"
             + (f" at commit {info['commit']}" if info.get("commit") else ""),
             f"- machine: {info['nproc']} CPUs, CPU model: {info['cpu']}, {info['memory']} memory; "
             f"Python {info['python']}; {info['versions']}",
             f"- load average (1/5/15 min) at start {info['load_start']}, at end {load_end} (the machine "
             "is shared: other work slows every row)",
             "- one `LocalCluster(2 workers x 1 thread)` (processes) for everything"]
    if summary:
        lines += ["", f"### Bias: {args.rows:,} rows, {args.reps} replications, m = 5, 5 iterations", "",
                  "X ~ N(0,1), Y = X + e, P(Y missing) = expit(-1 + 3X); replication r: data set r, seed r; "
                  "pooled slope of `y ~ x` (true 1), OLS per imputation and Rubin's rules.", "",
                  "| method | bias | bias / pooled SE | mean of bias / SE | sd over replications | pooled SE "
                  "sqrt(T) | sqrt(B/m) | 95% coverage | scarcity logged | median s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        lines.append(f"| {s['config']} | {s['bias']:+.4f} | {s['bias_se']:+.1f} | {s['mean_bias_in_se']:+.1f} | "
                     f"{s['sd_over_seeds']:.4f} | {s['pooled_se']:.4f} | {s['sqrt_b_m']:.4f} | "
                     f"{s['coverage']:.2f} | {s['scarcity']:.2f} | {s['seconds']:.1f} |")
    if paired:
        lines += ["", "Paired by replication (same data set and seed), the pooled slope of one method minus "
                  "that of all-row matching by the former code path:", "",
                  "| method | mean difference | sd of differences | largest absolute difference |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {p['config']} | {p['mean']:+.4f} | {p['sd']:.4f} | {p['max']:.4f} |" for p in paired]
    if timing:
        t = pd.DataFrame(timing)
        lines += ["", "### Run time: demo cohort, m = 5, 10 iterations (bench_impute's data)", "",
                  "| rows | former default s (each run) | new default s (each run) | ratio of medians | "
                  "ratio of best | MiB gathered (former / new) | rounds (former / new) |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
        for rows, d in t.groupby("rows"):
            a = d[d["config"] == "former default"]
            b = d[d["config"] == "new default"]
            lines.append(f"| {rows:,} | {', '.join(f'{x:.1f}' for x in a['seconds'])} | "
                         f"{', '.join(f'{x:.1f}' for x in b['seconds'])} | "
                         f"{b['seconds'].median() / a['seconds'].median():.2f} | "
                         f"{b['seconds'].min() / a['seconds'].min():.2f} | "
                         f"{a['mib_gathered'].median():.0f} / {b['mib_gathered'].median():.0f} | "
                         f"{int(a['rounds'].median())} / {int(b['rounds'].median())} |")
        lines += ["", "Runs alternate (former, new) on the same cluster and data; a warm-up pair before "
                  "the first size is not reported. 1-minute load average before each run: "
                  + ", ".join(f"{x:.1f}" for x in t["load1"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--timing-rows", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--timing-repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    ap.add_argument("--csv", default=None, help="also write the per-replication results here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    from bench_impute import machine_info
    from distributed import Client, LocalCluster

    info = machine_info()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            Client(cl) as client:
        timing = run_timing(client, args.timing_rows, args.timing_repeats, not args.quiet) \
            if args.timing_rows else []
        res = run_scenario(client, args.rows, args.reps, not args.quiet) if args.reps else pd.DataFrame()
    if args.csv:
        res.to_csv(args.csv, index=False)
    summary = summarize(res) if len(res) else []
    load_end = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = render(summary, timing, info, args, load_end, paired_differences(res) if len(res) else None)
    print(text)
    with open(args.out, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
