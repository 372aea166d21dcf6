#!/usr/bin/env python
"""Two versions of dmice side by side in one run: imputation and analysis run times.

Usage::

    python benchmarks/bench_versions.py --old REF [--new REF] [--rows 200000] [--pairs 5]
                                        [--out benchmarks/RESULTS.md]

The package of each version (``--old`` and ``--new`` git revisions; ``--new`` defaults to the
working tree) is copied into its own directory and run from there (``PYTHONPATH``), in fresh
processes that alternate old, new, old, new, ... ``--pairs`` times.  Each process starts its
own ``LocalCluster`` (2 worker processes x 1 thread, which inherit the version's path), makes
the demo cohort of ``--rows`` rows in 2 partitions (``bench_impute.cohort_chunk``, the same data
for both), and times, after one untimed warm-up of each:

* ``impute``: ``dmice.impute(ddf, m=5, max_iter=10, seed=1)`` on the persisted frame;
* ``write``: ``to_parquet`` of that result (distribution summaries included);
* ``analyze``: ``dmice.analyze(out, FORMULA, family="binomial")`` on the written output.

Reported per workload: each version's times, the ratio of medians (new / old) and the median
and spread of the paired ratios.  A dated section is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FORMULA = "event ~ age + sex + bmi + sbp + chol + smoker + C(diet) + diabetes"

CHILD = r"""
import json, math, os, sys, tempfile, time
sys.path.insert(0, {bench!r})
import dask, dask.dataframe as dd
from distributed import Client, LocalCluster, futures_of, wait
if __name__ == "__main__":
    import dmice
    assert os.path.realpath(dmice.__file__).startswith(os.path.realpath({src!r})), dmice.__file__
    from bench_impute import cohort_chunk
    rows = {rows}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cl, Client(cl) as c:
        here = c.run(lambda: __import__("dmice").__file__)
        assert all(os.path.realpath(f).startswith(os.path.realpath({src!r})) for f in here.values()), here
        meta = cohort_chunk(10, 2026, 0).iloc[:0]
        half = math.ceil(rows / 2)
        ddf = dd.from_delayed([dask.delayed(cohort_chunk)(n, 2026, i) for i, n in enumerate([half, rows - half])],
                              meta=meta, verify_meta=False)
        ddf = c.persist(ddf)
        wait(futures_of(ddf))
        tmp = tempfile.mkdtemp(prefix="dmice-bench-")
        out = {{}}
        for rep in range(2):  # the first is the warm-up
            t0 = time.perf_counter()
            imp = dmice.impute(ddf, m=5, max_iter=10, seed=1, client=c, progress=None)
            t1 = time.perf_counter()
            path = os.path.join(tmp, f"out{{rep}}")
            imp.to_parquet(path)
            t2 = time.perf_counter()
            res = dmice.analyze(path, {formula!r}, family="binomial", client=c)
            t3 = time.perf_counter()
            imp.close()
            out = {{"impute": t1 - t0, "write": t2 - t1, "analyze": t3 - t2,
                    "estimate": [float(x) for x in res.summary()["estimate"]]}}
        print("RESULT " + json.dumps(out))
"""


def export(ref: str | None, dest: Path) -> str:
    """The package ``dmice`` of git revision ``ref`` (None: the working tree) under ``dest``;
    returns a label of the version."""
    dest.mkdir(parents=True)
    if ref is None:
        shutil.copytree(ROOT / "dmice", dest / "dmice", ignore=shutil.ignore_patterns("__pycache__"))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "dmice"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return f"{head}{' + changes' if dirty else ''} (working tree)"
    archive = subprocess.run(["git", "archive", ref, "dmice"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


def run_child(src: Path, rows: int) -> dict:
    code = CHILD.format(bench=str(HERE), src=str(src), rows=rows, formula=FORMULA)
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=src,
                          timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"benchmark process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def render(label_old: str, label_new: str, runs: list[dict], args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [f"## dmice {label_old} and {label_new} side by side — {_dt.datetime.now(_dt.timezone.utc):%a %b %d %H:%M:%S UTC %Y}",
             "",
             f"- machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}",
             f"- `python benchmarks/bench_versions.py --old {args.old}"
             f"{' --new ' + args.new if args.new else ''} --rows {args.rows} --pairs {args.pairs}`",
             f"- demo cohort of {args.rows:,} rows in 2 partitions; `impute(m=5, max_iter=10, seed=1)`, "
             "`to_parquet`, `analyze(out, FORMULA, family=\"binomial\")`; each process its own "
             "LocalCluster (2 workers x 1 thread), one untimed warm-up; processes alternate old, new",
             "",
             "| workload | old s (each run) | new s (each run) | ratio of medians (new / old) "
             "| paired ratios: median (min-max) |",
             "|---|---|---|---|---|"]
    for w in ("impute", "write", "analyze"):
        old = [r["old"][w] for r in runs]
        new = [r["new"][w] for r in runs]
        paired = [n / o for n, o in zip(new, old)]
        lines.append(f"| {w} | {', '.join(f'{x:.2f}' for x in old)} | {', '.join(f'{x:.2f}' for x in new)} "
                     f"| {statistics.median(new) / statistics.median(old):.3f} "
                     f"| {statistics.median(paired):.3f} ({min(paired):.3f}-{max(paired):.3f}) |")
    same = all(r["old"]["estimate"] == r["new"]["estimate"] for r in runs)
    lines += ["", f"Pooled estimates of the analysis identical in every pair: {'yes' if same else 'NO'}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--old", required=True, help="git revision of the old version")
    ap.add_argument("--new", default=None, help="git revision of the new version (default: working tree)")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dmice-versions-"))
    try:
        label_old = export(args.old, base / "old")
        label_new = export(args.new, base / "new")
        runs = []
        for k in range(args.pairs):
            pair = {"old": run_child(base / "old", args.rows), "new": run_child(base / "new", args.rows)}
            runs.append(pair)
            print(f"pair {k + 1}: " + ", ".join(f"{w} {pair['old'][w]:.2f} / {pair['new'][w]:.2f} s"
                                               for w in ("impute", "write", "analyze")), flush=True)
        text = render(label_old, label_new, runs, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(text)
    with open(args.out, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
