#!/usr/bin/env python
"""Snapshots of the chains and lost workers: what they cost.

Usage::

    python benchmarks/bench_faults.py [--rows 1000000] [--repeats 3] [--kill-at 5]
                                      [--out benchmarks/RESULTS.md]

On one ``LocalCluster`` (2 worker processes x 1 thread; the nannies restart a killed worker)
and the demo cohort of ``bench_impute.py`` (``--rows`` rows in 4 partitions, made by tasks, so
a lost partition is recomputed from its graph), ``dmice.impute(m=5, max_iter=10, seed=1)``:

* ``snapshots off``: the snapshots replaced by nothing (what the loop costs without them);
* ``default``: with the snapshots, their interval following their cost;
* ``worker killed``: the default with one worker killed (SIGKILL) after iteration
  ``--kill-at``: the chains are rebuilt and replayed, and the imputations compared with the
  undisturbed run's (all m, every cell).

The first two alternate ``--repeats`` times.  Reported: run times, the snapshots taken and
their mean cost, the interval chosen, the recovery's time and the iterations replayed.  A
dated section is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def digest(imp: Any, m: int) -> str:
    h = hashlib.sha256()
    for c in range(1, m + 1):
        df = imp.complete(c).compute()
        h.update(df.to_csv(index=False).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kill-at", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    args = ap.parse_args()

    import dask
    import dask.dataframe as dd
    from bench_impute import cohort_chunk, machine_info
    from distributed import Client, LocalCluster

    import dmice
    from dmice.runtime import engine as _engine

    info = machine_info()
    m, iters = 5, 10
    rows = args.rows
    per = math.ceil(rows / 4)
    sizes = [min(per, rows - i * per) for i in range(4) if rows - i * per > 0]
    meta = cohort_chunk(10, 2026, 0).iloc[:0]
    ddf = dd.from_delayed([dask.delayed(cohort_chunk)(n, 2026, i) for i, n in enumerate(sizes)],
                          meta=meta, verify_meta=False)
    kw = dict(m=m, max_iter=iters, seed=1, progress=None)
    original = _engine.Engine._take_snapshot
    runs: list[dict[str, Any]] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            Client(cl) as client:
        dmice.impute(ddf.partitions[0], m=1, max_iter=1, client=client, progress=None).close()  # warm-up
        want = None
        for k in range(args.repeats):
            for name in ("snapshots off", "default"):
                _engine.Engine._take_snapshot = (lambda self, events: None) if name == "snapshots off" \
                    else original
                t0 = time.perf_counter()
                imp = dmice.impute(ddf, client=client, **kw)
                secs = time.perf_counter() - t0
                eng = imp._engine
                runs.append({"config": name, "seconds": secs, "snapshots": list(eng.snapshots),
                             "every": eng.snapshot_every})
                if want is None and name == "default":
                    want = digest(imp, m)
                imp.close()
                print(f"{name} #{k}: {secs:.1f} s", flush=True)
        _engine.Engine._take_snapshot = original
        pids = client.run(os.getpid)
        killed: list[str] = []

        def progress(it: int, total: int, secs: float) -> None:
            if it == args.kill_at and not killed:
                killed.append(sorted(pids)[0])
                os.kill(pids[killed[0]], signal.SIGKILL)

        t0 = time.perf_counter()
        imp = dmice.impute(ddf, client=client, **{**kw, "progress": progress})
        secs = time.perf_counter() - t0
        eng = imp._engine
        got = digest(imp, m)
        runs.append({"config": "worker killed", "seconds": secs, "snapshots": list(eng.snapshots),
                     "every": eng.snapshot_every, "recoveries": list(eng.recoveries), "same": got == want})
        imp.close()
        print(f"worker killed: {secs:.1f} s, recoveries {eng.recoveries}, same result: {got == want}")

    def med(name: str) -> float:
        return statistics.median(r["seconds"] for r in runs if r["config"] == name)

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"## Snapshots of the chains and a lost worker — {info['date']}", "",
             f"- command: `python benchmarks/bench_faults.py --rows {rows} --repeats {args.repeats} "
             f"--kill-at {args.kill_at}`" + (f" at commit {info['commit']}" if info.get("commit") else ""),
             f"- machine: {info['nproc']} CPUs, CPU model: {info['cpu']}, {info['memory']} memory; "
             f"Python {info['python']}; {info['versions']}",
             f"- load average at start {info['load_start']}, at end {load}",
             f"- one `LocalCluster(2 workers x 1 thread)`; demo cohort, {rows:,} rows in {len(sizes)} "
             f"partitions made by tasks; m = {m}, {iters} iterations", "",
             "| run | seconds (each) | snapshots taken | mean snapshot s | interval chosen (iterations) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name in ("snapshots off", "default", "worker killed"):
        rs = [r for r in runs if r["config"] == name]
        snaps = [s["seconds"] for r in rs for s in r["snapshots"]]
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        lines.append(f"| {name} | {each} | "
                     f"{statistics.mean(len(r['snapshots']) for r in rs):.1f} | "
                     f"{(statistics.mean(snaps) if snaps else 0):.3f} | {rs[-1]['every']} |")
    killed_run = runs[-1]
    rec = killed_run.get("recoveries") or []
    lines += ["", f"- snapshots' cost: default / snapshots off = {med('default') / med('snapshots off'):.3f} "
                  "(ratio of medians)",
              f"- worker killed after iteration {args.kill_at}: "
              + (", ".join(f"lost at iteration {r['iteration']}, replayed from iteration {r['replayed_from']}, "
                           f"partitions rebuilt in {r['seconds']:.2f} s" for r in rec) or "no recovery")
              + f"; whole run {killed_run['seconds']:.1f} s against {med('default'):.1f} s undisturbed "
              f"(ratio {killed_run['seconds'] / med('default'):.2f}); imputations identical to the "
              f"undisturbed run's: {'yes' if killed_run.get('same') else 'NO'}", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
