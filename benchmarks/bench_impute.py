#!/usr/bin/env python
"""Benchmark dmice.impute against statsmodels MICE, scikit-learn and R mice, then dmice at scale.

Usage::

    python benchmarks/bench_impute.py [--rows 100000] [--scale 1000000 10000000]
                                      [--out benchmarks/RESULTS.md] [--skip-peers] [--skip-r]

1. Head to head at ``--rows`` rows of the demo cohort (``dmice.demo.make_cohort`` then
   ``ampute``; m = 5 imputations, 10 iterations), all engines on the same amputed data:

   * dmice on a ``distributed.LocalCluster`` of worker processes (2 workers x 1 thread by
     default).  Only ``dmice.impute(...)`` is timed; the cluster start-up and moving the
     data onto the workers are timed and reported separately.
   * statsmodels ``MICEData`` on the numeric-encoded frame.
   * scikit-learn ``IterativeImputer(sample_posterior=True)`` on the numeric-encoded frame.
   * R mice 3.x through ``Rscript`` (skipped with a note when Rscript or mice is missing,
     or with ``--skip-r``: it takes minutes, more than all the others together).

2. dmice alone at each ``--scale`` size; the data are built chunk by chunk on the workers
   (one delayed pandas chunk per partition) so they never exist as one pandas frame.

3. A dated section with the measured figures is appended to ``--out``.

Every Python engine runs in its own freshly spawned process and R in its own ``Rscript``
process, so one engine's memory never shows in another's peak.  Peak memory is the highest
sum of the resident set sizes (RSS) of that process and all its descendants (for dmice: the
client/scheduler process plus the worker processes), sampled every 50 ms by a thread in
this (parent) process.  It therefore includes the interpreter, the imported libraries and
the engine's copy of the data.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import multiprocessing as mp
import os
import platform
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

M = 5
MAX_ITER = 10
SEED = 1
DATA_SEED = 2026
POLL_SECONDS = 0.05
MIB = 1024 * 1024

RESULTS_HEADER = """# dmice benchmark results

Sections are appended by `benchmarks/bench_impute.py` (see `benchmarks/README.md`), one per
run, newest last.  Every figure is what that run measured on the machine it describes.
"""


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def tree_rss(root: psutil.Process) -> int:
    """Sum of the RSS of ``root`` and all its descendants, in bytes (0 once it has exited)."""
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


class PeakRSS:
    """Background thread that polls the RSS of a process tree and keeps the peak of the sum."""

    def __init__(self, pid: int, interval: float = POLL_SECONDS):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peak-rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.proc))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / MIB


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def cohort_chunk(n: int, data_seed: int, chunk: int) -> pd.DataFrame:
    """Amputed demo cohort of ``n`` rows; each (data_seed, chunk) gets its own random streams."""
    from dmice.demo import ampute, make_cohort

    cohort_seed, ampute_seed = np.random.SeedSequence([data_seed, chunk]).generate_state(2)
    return ampute(make_cohort(n, int(cohort_seed)), seed=int(ampute_seed))


def numeric_frame(df: pd.DataFrame) -> pd.DataFrame:
    """All-float64 copy for statsmodels and scikit-learn: categories as codes, NA as NaN."""
    out = {}
    for col in df.columns:
        s = df[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            out[col] = s.cat.codes.astype("float64").where(s.notna())
        else:
            out[col] = s.astype("float64")  # Int64 / boolean / int / float; NA -> NaN
    return pd.DataFrame(out, index=df.index)


# --------------------------------------------------------------------------------------------
# engines (each runs in its own spawned process; must be module-level functions)
# --------------------------------------------------------------------------------------------
def _self_rss_mib() -> float:
    return tree_rss(psutil.Process()) / MIB


def engine_dmice(data: pd.DataFrame | None, rows: int, partition_rows: int, n_workers: int,
                 m: int, max_iter: int, seed: int, data_seed: int, verbose: bool,
                 warm: bool = False) -> dict[str, Any]:
    """dmice.impute on a LocalCluster of worker processes.

    ``data`` is the pandas frame for the head-to-head run, or None to build ``rows`` rows
    on the workers from delayed chunks of ``partition_rows`` rows.  With ``warm``, the call is
    timed twice on the same cluster: ``cold_seconds`` is the first call (it also pays the
    workers' first imports of dmice, scipy and friends), ``seconds`` the second, which is what
    the peers' timings correspond to (their libraries are imported before their timer starts).
    """
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster, futures_of, wait

    import dmice

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    startup = time.perf_counter() - t0
    try:
        partition_rows = partition_rows or min(1_000_000, math.ceil(rows / n_workers))
        nparts = max(1, math.ceil(rows / partition_rows))
        if data is not None:
            ddf = dd.from_pandas(data, npartitions=nparts, sort=False)
        else:
            sizes = [partition_rows] * (rows // partition_rows)
            if rows % partition_rows:
                sizes.append(rows % partition_rows)
            meta = cohort_chunk(10, data_seed, 0).iloc[:0]
            ddf = dd.from_delayed([dask.delayed(cohort_chunk)(n, data_seed, i)
                                   for i, n in enumerate(sizes)], meta=meta, verify_meta=False)
        t0 = time.perf_counter()
        ddf = client.persist(ddf)
        wait(futures_of(ddf))
        load = time.perf_counter() - t0
        rss_before = _self_rss_mib()

        def progress(it: int, total: int, secs: float) -> None:
            if verbose:
                print(f"    dmice {rows:,} rows: iteration {it}/{total} in {secs:.1f} s", flush=True)

        t0 = time.perf_counter()
        imp = dmice.impute(ddf, m=m, max_iter=max_iter, seed=seed, client=client, progress=progress)
        seconds = time.perf_counter() - t0
        cold = None
        if warm:  # the same call again on the same cluster: worker imports and set-up already done
            imp.close()
            cold = seconds
            t0 = time.perf_counter()
            imp = dmice.impute(ddf, m=m, max_iter=max_iter, seed=seed, client=client, progress=progress)
            seconds = time.perf_counter() - t0
        info = {"seconds": seconds, "cold_seconds": cold, "startup_seconds": startup, "load_seconds": load,
                "rss_before_mib": rss_before, "partitions": ddf.npartitions,
                "iterations": imp.iterations,
                "method": {c: imp.method[c] for c in imp.imputed_columns}}
        imp.close()
        return info
    finally:
        client.close()
        cluster.close()


def _blas_limit(threads: int | None) -> Any:
    """Context limiting BLAS/OpenMP threads of this process (no limit when ``threads`` is None)."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def engine_statsmodels(num: pd.DataFrame, m: int, max_iter: int, seed: int,
                       blas_threads: int | None) -> dict[str, Any]:
    """m independent MICEData chains, each update_all(max_iter); the final state of each is one data set."""
    import inspect

    from statsmodels.imputation.mice import MICEData

    has_rng = "rng" in inspect.signature(MICEData.__init__).parameters
    rss_before = _self_rss_mib()
    completed = []
    with _blas_limit(blas_threads):
        t0 = time.perf_counter()
        for k in range(1, m + 1):
            if has_rng:
                md = MICEData(num, rng=seed + k)
            else:  # older statsmodels draws from numpy's global state
                np.random.seed(seed + k)
                md = MICEData(num)
            md.update_all(max_iter)
            completed.append(md.data.copy())
        seconds = time.perf_counter() - t0
    left = int(sum(int(d.isna().sum().sum()) for d in completed))
    return {"seconds": seconds, "rss_before_mib": rss_before, "missing_left": left}


def engine_sklearn(num: pd.DataFrame, m: int, max_iter: int, seed: int,
                   blas_threads: int | None) -> dict[str, Any]:
    """IterativeImputer(sample_posterior=True, random_state=k) fitted m times."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    x = num.to_numpy()
    rss_before = _self_rss_mib()
    completed = []
    with warnings.catch_warnings(), _blas_limit(blas_threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        for k in range(1, m + 1):
            completed.append(IterativeImputer(max_iter=max_iter, sample_posterior=True,
                                              random_state=k).fit_transform(x))
        seconds = time.perf_counter() - t0
    left = int(sum(int(np.isnan(c).sum()) for c in completed))
    return {"seconds": seconds, "rss_before_mib": rss_before, "missing_left": left}


def _child(q: Any, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    try:
        q.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put(("error", traceback.format_exc()))


def run_isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh spawned process, polling its process tree's RSS."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, fn, args), name=fn.__name__)
    proc.start()
    status, payload = "error", None
    with PeakRSS(proc.pid) as poll:
        while True:
            try:
                status, payload = q.get(timeout=0.5)
                break
            except queue.Empty:
                if not proc.is_alive():
                    payload = f"process exited with code {proc.exitcode} without a result"
                    break
        proc.join()
    if status != "ok":
        return {"error": str(payload).strip().splitlines()[-1], "traceback": payload,
                "peak_mib": poll.peak_mib}
    return {**payload, "peak_mib": poll.peak_mib}


# --------------------------------------------------------------------------------------------
# R mice
# --------------------------------------------------------------------------------------------
R_SCRIPT = r"""
suppressPackageStartupMessages(library(mice))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], na.strings = "NA", stringsAsFactors = FALSE)
d$sex <- factor(d$sex, levels = c(__SEX__))
d$diet <- factor(d$diet, levels = c(__DIET__))
d$smoker <- factor(d$smoker, levels = c(0, 1))
d$diabetes <- factor(as.logical(d$diabetes), levels = c(FALSE, TRUE))
tm <- system.time(imp <- mice(d, m = as.integer(args[2]), maxit = as.integer(args[3]),
                              seed = as.integer(args[4]), printFlag = FALSE))
cat(sprintf("BENCH_ELAPSED %.6f\n", tm[["elapsed"]]))
meth <- imp$method[imp$method != ""]
cat(sprintf("BENCH_METHOD %s\n", paste(names(meth), meth, sep = "=", collapse = ",")))
cat(sprintf("BENCH_MISSING_LEFT %d\n", sum(sapply(seq_len(imp$m), function(k) sum(is.na(complete(imp, k)))))))
cat(sprintf("BENCH_LOGGED_EVENTS %d\n", if (is.null(imp$loggedEvents)) 0L else nrow(imp$loggedEvents)))
cat(sprintf("BENCH_VERSION R %s.%s, mice %s\n", R.version$major, R.version$minor, packageVersion("mice")))
"""


def r_available() -> str | None:
    """None when Rscript with mice is usable, else the reason it is not."""
    if shutil.which("Rscript") is None:
        return "Rscript not found on PATH"
    ok = subprocess.run(["Rscript", "-e", 'quit(status = !requireNamespace("mice", quietly = TRUE))'],
                        capture_output=True)
    return None if ok.returncode == 0 else "R package mice is not installed"


def run_r_mice(df: pd.DataFrame, m: int, max_iter: int, seed: int, workdir: Path) -> dict[str, Any]:
    """mice() in an Rscript process; the time is R's system.time of the mice() call alone."""
    csv = workdir / "amputed.csv"
    df.to_csv(csv, index=False, na_rep="NA")

    def levels(col: str) -> str:
        return ", ".join(f'"{c}"' for c in df[col].cat.categories)

    script = workdir / "bench_mice.R"
    script.write_text(R_SCRIPT.replace("__SEX__", levels("sex")).replace("__DIET__", levels("diet")))
    proc = subprocess.Popen(["Rscript", str(script), str(csv), str(m), str(max_iter), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid) as poll:
        out, err = proc.communicate()
    if proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-5:]
        return {"error": f"Rscript exited with {proc.returncode}: {' | '.join(tail)}",
                "peak_mib": poll.peak_mib}
    found = {}
    for line in out.splitlines():
        if line.startswith("BENCH_"):
            key, _, value = line.partition(" ")
            found[key] = value.strip()
    return {"seconds": float(found["BENCH_ELAPSED"]), "peak_mib": poll.peak_mib,
            "method": found.get("BENCH_METHOD", ""), "missing_left": int(found.get("BENCH_MISSING_LEFT", -1)),
            "logged_events": int(found.get("BENCH_LOGGED_EVENTS", 0)),
            "version": found.get("BENCH_VERSION", "")}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    try:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info()) or "none"
    except ImportError:
        blas = "unknown (threadpoolctl not installed)"
    return {
        "date": date,
        "nproc": str(nproc),
        "memory": f"{psutil.virtual_memory().total / 1024**3:.1f} GiB",
        "cpu": cpu,
        "python": platform.python_version(),
        "versions": ", ".join(f"{p} {_version(p)}" for p in
                              ("dmice", "numpy", "pandas", "dask", "distributed", "scikit-learn",
                               "statsmodels", "psutil")),
        "blas": blas,
        "load_start": _loadavg(),
        "commit": _commit(),
    }


def _commit() -> str:
    """The checked-out commit of this source tree (with ``+changes`` when it differs), or ''."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+changes" if dirty else "")


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def render(rows: list[dict[str, Any]], notes: list[str], info: dict[str, str], argv: list[str]) -> str:
    lines = [
        f"## {info['date']}",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`",
        f"- machine: {info['nproc']} CPUs (nproc), {info['memory']} memory, CPU model: {info['cpu']}",
        f"- Python {info['python']}; {info['versions']}",
        f"- BLAS library default (threadpoolctl): {info['blas']}",
        f"- load average (1 / 5 / 15 min) at start {info['load_start']}, at end {_loadavg()} "
        "(anything else running on the machine slows every engine)",
        "",
        "| engine | rows | seconds | peak memory MiB | ratio vs dmice |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        secs = "failed" if r.get("error") else _fmt(r.get("seconds"))
        lines.append(f"| {r['engine']} | {r['rows']:,} | {secs} | {_fmt(r.get('peak_mib'), 0)} "
                     f"| {_fmt(r.get('ratio'))} |")
    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def append_results(path: Path, section: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write(RESULTS_HEADER)
        f.write("\n" + section)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, flush=True)


def _outcome(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"FAILED: {r['error']}"
    return f"{r['seconds']:.2f} s, peak {r['peak_mib']:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000,
                        help="rows of the head-to-head comparison")
    parser.add_argument("--scale", type=int, nargs="*", default=[1_000_000, 10_000_000],
                        help="row counts for dmice alone (give --scale with no value to skip)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                        help="markdown file the dated section is appended to")
    parser.add_argument("--skip-peers", action="store_true",
                        help="run dmice only (no statsmodels, scikit-learn or R)")
    parser.add_argument("--skip-r", action="store_true",
                        help="no R mice (the Python peers still run)")
    parser.add_argument("--workers", type=int, default=2, help="dmice LocalCluster worker processes")
    parser.add_argument("--partition-rows", type=int, default=None,
                        help="rows per dask partition given to dmice (default: rows / workers, "
                             "at most 1,000,000)")
    parser.add_argument("--peer-blas-threads", type=int, default=None,
                        help="limit BLAS threads of the statsmodels and scikit-learn runs "
                             "(default: the library default, see the report's BLAS line)")
    parser.add_argument("--data-seed", type=int, default=DATA_SEED, help="seed of the synthetic data")
    args = parser.parse_args(argv)
    cmdline = ["python", Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]

    info = machine_info()
    rows: list[dict[str, Any]] = []
    notes: list[str] = [
        f"All engines: m = {M} imputations, {MAX_ITER} iterations, on the same amputed "
        f"`dmice.demo` cohort (`make_cohort` + `ampute`, data seed {args.data_seed}); "
        "seconds are wall-clock time of the imputation call(s) alone.",
        "Peak memory: highest sum of RSS over the engine's process and all its descendants, "
        f"sampled every {POLL_SECONDS * 1000:.0f} ms; each Python engine runs in a fresh spawned "
        "process, so the figure includes the interpreter, imported libraries and the engine's "
        "copy of the data.",
    ]

    # ---- head to head --------------------------------------------------------------------
    n = args.rows
    _say(f"building {n:,} amputed rows")
    df = cohort_chunk(n, args.data_seed, 0)
    miss = ", ".join(f"{c} {df[c].isna().mean():.0%}" for c in df.columns if df[c].isna().any())
    notes.append(f"Missing at {n:,} rows: {miss}.")

    _say(f"dmice, {n:,} rows, LocalCluster {args.workers} workers x 1 thread")
    d = run_isolated(engine_dmice, df, n, args.partition_rows, args.workers, M, MAX_ITER, SEED,
                     args.data_seed, False, True)
    _say(f"  {_outcome(d)}")
    dmice_label = f"dmice (LocalCluster {args.workers} workers × 1 thread)"
    rows.append({"engine": dmice_label, "rows": n, "seconds": d.get("seconds"),
                 "peak_mib": d.get("peak_mib"), "ratio": None if d.get("error") else 1.0,
                 "error": d.get("error")})
    if not d.get("error"):
        rows.append({"engine": "dmice first call on the new cluster (not in the ratios)", "rows": n,
                     "seconds": d["cold_seconds"], "peak_mib": None, "ratio": None})
        rows.append({"engine": "dmice cluster start-up (not in the dmice time)", "rows": n,
                     "seconds": d["startup_seconds"], "peak_mib": None, "ratio": None})
        notes.append(
            f"dmice at {n:,} rows: `dmice.impute(ddf, m={M}, max_iter={MAX_ITER}, seed={SEED}, "
            f"client=client)` on a `LocalCluster(n_workers={args.workers}, threads_per_worker=1)` "
            f"(processes), timed twice on the same cluster: the second call is the dmice time of "
            f"the ratios (the peers' libraries are imported before their timers start); the first "
            f"call, {d['cold_seconds']:.2f} s, also pays the workers' first imports and set-up; the data were a dask DataFrame of {d['partitions']} partition(s) "
            f"(`--partition-rows {args.partition_rows or 'rows / workers, at most 1,000,000'}`), persisted on the workers before the "
            f"timer started ({d['load_seconds']:.2f} s, not included); methods "
            f"{', '.join(f'{k}={v}' for k, v in d['method'].items())}; tree RSS just before the "
            f"call {d['rss_before_mib']:.0f} MiB.")
    else:
        notes.append(f"dmice at {n:,} rows failed: {d['error']}")
    dmice_secs = d.get("seconds")

    def peer(label: str, r: dict[str, Any], note: str) -> None:
        ratio = None
        if not r.get("error") and dmice_secs:
            ratio = r["seconds"] / dmice_secs
        rows.append({"engine": label, "rows": n, "seconds": r.get("seconds"),
                     "peak_mib": r.get("peak_mib"), "ratio": ratio, "error": r.get("error")})
        notes.append(note if not r.get("error") else f"{label} failed: {r['error']}")

    if args.skip_peers:
        notes.append("Peers skipped (`--skip-peers`).")
    else:
        num = numeric_frame(df)
        notes.append("statsmodels and scikit-learn BLAS threads: "
                     + ("library default (see the BLAS line above)" if args.peer_blas_threads is None
                        else f"limited to {args.peer_blas_threads} (`--peer-blas-threads`)")
                     + "; dmice's worker processes run 1 BLAS thread each (distributed's default).")
        numeric_note = ("the numeric-encoded frame (sex and diet as category codes 0.., smoker "
                        "and diabetes as 0/1, NA as NaN, everything float64)")

        _say(f"statsmodels MICEData, {n:,} rows")
        r = run_isolated(engine_statsmodels, num, M, MAX_ITER, SEED, args.peer_blas_threads)
        _say(f"  {_outcome(r)}")
        peer(f"statsmodels {_version('statsmodels')} MICEData", r,
             f"statsmodels: `MICEData` on {numeric_note}; {M} independent chains (a fresh "
             f"`MICEData(num, rng={SEED}+k)` per imputation k, each `update_all({MAX_ITER})`, its "
             f"final data set kept), i.e. {M * MAX_ITER} update cycles as in R mice's m × maxit.  "
             "statsmodels MICE imputes every variable by predictive mean matching from an OLS "
             "fit (pmm only; no logistic or multinomial models), so binary and category codes "
             "are only ever filled with observed codes"
             + ("" if r.get("error") else f"; missing values left: {r['missing_left']}") + ".")

        _say(f"scikit-learn IterativeImputer, {n:,} rows")
        r = run_isolated(engine_sklearn, num, M, MAX_ITER, SEED, args.peer_blas_threads)
        _say(f"  {_outcome(r)}")
        peer(f"scikit-learn {_version('scikit-learn')} IterativeImputer", r,
             f"scikit-learn: `IterativeImputer(max_iter={MAX_ITER}, sample_posterior=True, "
             f"random_state=k)` (BayesianRidge, the default) fitted k = 1..{M} times on "
             f"{numeric_note}; with sample_posterior=True every round runs (no early stop); "
             "categorical and binary codes are imputed as unrounded continuous values"
             + ("" if r.get("error") else f"; missing values left: {r['missing_left']}") + ".")

        why = "`--skip-r`" if args.skip_r else r_available()
        if why:
            _say(f"R mice skipped: {why}")
            notes.append(f"R mice skipped: {why}.")
        else:
            _say(f"R mice, {n:,} rows")
            with tempfile.TemporaryDirectory(prefix="dmice-bench-") as tmp:
                r = run_r_mice(df, M, MAX_ITER, SEED, Path(tmp))
            _say(f"  {_outcome(r)}")
            peer("R mice" + (f" ({r['version']})" if r.get("version") else ""), r,
                 f"R mice: the amputed frame written to CSV and read by `Rscript` (sex, diet, "
                 f"smoker and diabetes as factors), then `mice(d, m={M}, maxit={MAX_ITER}, "
                 f"seed={SEED}, printFlag=FALSE)`; seconds are R's `system.time` elapsed for the "
                 f"`mice()` call alone, peak memory is the Rscript process"
                 + ("" if r.get("error") else
                    f"; methods {r['method']}; logged events {r['logged_events']}; "
                    f"missing values left: {r['missing_left']}") + ".")
    del df

    # ---- dmice alone at scale ------------------------------------------------------------
    for n in args.scale:
        _say(f"dmice, {n:,} rows (data built on the workers in chunks of {args.partition_rows or min(1_000_000, -(-n // args.workers)):,})")
        d = run_isolated(engine_dmice, None, n, args.partition_rows, args.workers, M, MAX_ITER,
                         SEED, args.data_seed, True)
        _say(f"  {_outcome(d)}")
        rows.append({"engine": dmice_label, "rows": n, "seconds": d.get("seconds"),
                     "peak_mib": d.get("peak_mib"), "ratio": None, "error": d.get("error")})
        if d.get("error"):
            notes.append(f"dmice at {n:,} rows failed: {d['error']}")
        else:
            notes.append(
                f"dmice at {n:,} rows: {d['partitions']} partition(s) of up to "
                f"{-(-n // d['partitions']):,} rows, each an amputed `make_cohort` chunk with its own "
                f"seeds, generated and persisted on the workers before the timer started "
                f"({d['load_seconds']:.2f} s, not included); cluster start-up "
                f"{d['startup_seconds']:.2f} s (not included); tree RSS just before the call "
                f"{d['rss_before_mib']:.0f} MiB.")

    section = render(rows, notes, info, cmdline)
    append_results(args.out, section)
    _say("")
    _say(section)
    _say(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
