"""Golden digests: the results of a fixed set of runs, recorded once and compared at every commit.

A change of the code's structure must not change its results.  Each run below (default methods
with Firth and shrinkage, pmm, polr and Poisson, formulas, ``by=``, SMC-FCS, explicit shrinkage,
5 + 5 style continuing, jobs in both layouts, and ``analyze`` with D1, D2 and D3) is reduced to
a SHA-256 digest of its completed data sets or pooled tables, bit for bit, and compared with
``tests/fixtures/golden.json``.

Floating point results depend on the processor and the numerical libraries (BLAS kernels, SIMD
paths of numpy's ufuncs), so the digests are compared on the platform they were recorded on (the
file names it: processor, libraries and their versions).  Elsewhere the runs are compared by what
they estimate: each imputed column's completed-data mean or level shares, and each pooled
coefficient, must lie within tolerances derived from their standard errors; the digests cannot
be expected to hold there and are reported, not asserted.

Record anew (only for an intended change of results, saying why in the commit)::

    python tests/test_golden.py --record
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd

import dmice

GOLDEN = Path(__file__).parent / "fixtures" / "golden.json"
M, ITER, SEED = 2, 3, 11
#: levels observed in fewer rows are left out of the comparison on another platform: the share
#: imputed to a level seen a handful of times swings with each draw of its coefficients
MIN_LEVEL_ROWS = 20


def golden_frame(n: int = 800, seed: int = 20261203) -> pd.DataFrame:
    """Mixed types: a binary column that x nearly separates (Firth), a category with a rare level
    (shrinkage), an ordered category (polr), a count (pmm by default, Poisson on request), a
    stratum ``site``, an outcome ``y`` and a complete outcome ``e``."""
    g = np.random.default_rng(seed)
    x = g.normal(size=n)
    site = g.choice(["east", "north", "south"], n)
    c = g.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2]).astype(object)
    c[:4] = "rare"
    o = g.choice(["low", "mid", "high"], n)
    k = g.poisson(np.exp(0.3 + 0.4 * x)).astype(float)
    b = np.where(x > 1.2, "yes", np.where(g.random(n) < 0.3, "yes", "no"))
    y = 1 + 0.8 * x + 0.5 * (b == "yes") + 0.3 * (c == "b") + 0.2 * k + g.normal(size=n)
    e = 0.5 + 0.6 * x - 0.4 * (b == "yes") + 0.1 * k + g.normal(size=n)  # complete (SMC-FCS)
    df = pd.DataFrame({
        "x": x, "y": y, "k": k, "e": e, "site": site,
        "b": pd.Categorical(b, categories=["no", "yes"]),
        "c": pd.Categorical(c, categories=["a", "b", "c", "rare"]),
        "o": pd.Categorical(o, categories=["low", "mid", "high"], ordered=True),
    })
    for col, frac in (("x", 0.15), ("y", 0.1), ("k", 0.15), ("b", 0.2), ("o", 0.2)):
        df.loc[g.random(n) < frac, col] = None
    holes = g.random(n) < 0.15
    holes[:4] = False  # the rare level stays observed
    df.loc[holes, "c"] = None
    return df


# -- digests -----------------------------------------------------------------------------------

def frame_bytes(df: pd.DataFrame) -> bytes:
    """The content of a frame, column by column in name order: names, dtypes and values
    (categories by their labels), whatever the index or the partitioning."""
    df = df.reset_index(drop=True)
    out = [str(len(df)).encode()]
    for col in sorted(df.columns, key=str):
        s = df[col]
        out.append(f"{col}:{s.dtype}".encode())
        if isinstance(s.dtype, pd.CategoricalDtype):
            out.append("\x1f".join(map(str, s.cat.categories)).encode())
            out.append(np.asarray(s.cat.codes, dtype=np.int64).tobytes())
        elif pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
            out.append(s.to_numpy(dtype=np.float64, na_value=np.nan).tobytes())
        else:
            out.append("\x1f".join("\x00" if pd.isna(v) else str(v) for v in s).encode())
    return b"\x1e".join(out)


def digest(frames: list[pd.DataFrame]) -> str:
    h = hashlib.sha256()
    for f in frames:
        h.update(frame_bytes(f))
        h.update(b"\x1d")
    return h.hexdigest()


def platform_id() -> dict[str, str]:
    """What floating point results depend on besides the code."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += "|" + line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    libs = {}
    for p in ("numpy", "scipy", "pandas", "pyarrow", "statsmodels", "scikit-learn", "formulaic",
              "dask", "distributed"):
        try:
            libs[p] = version(p)
        except PackageNotFoundError:
            libs[p] = "absent"
    try:
        from threadpoolctl import threadpool_info

        blas = ";".join(sorted(f"{i.get('internal_api')}:{i.get('version')}:{i.get('architecture')}"
                               for i in threadpool_info()))
    except ImportError:
        blas = "unknown"
    return {"machine": platform.machine(), "python": platform.python_version(),
            "cpu": hashlib.sha256(cpu.encode()).hexdigest()[:16], "blas": blas,
            **{f"lib:{k}": v for k, v in libs.items()}}


# -- the runs -----------------------------------------------------------------------------------

def _completed(imp: Any) -> list[pd.DataFrame]:
    frames = [imp.complete(k) for k in range(1, imp.m + 1)]
    return [f.compute() if hasattr(f, "compute") else f for f in frames]


def _imputation(frames: list[pd.DataFrame], original: pd.DataFrame) -> dict[str, Any]:
    """Digest, and what the completed data estimate: each incomplete column's mean (numbers) or
    level shares (categories) over the m data sets, with the sizes the tolerances need."""
    est = {}
    for col in original.columns:
        n_mis = int(original[col].isna().sum())
        if not n_mis:
            continue
        s = pd.concat([f[col] for f in frames], ignore_index=True)
        if isinstance(original[col].dtype, pd.CategoricalDtype):
            shares = s.value_counts(normalize=True)
            seen = original[col].value_counts()
            for lev in original[col].cat.categories:
                if seen.get(lev, 0) >= MIN_LEVEL_ROWS:
                    est[f"{col}={lev}"] = [float(shares.get(lev, 0.0)), n_mis]
        else:
            est[col] = [float(s.astype(float).mean()), n_mis]
    return {"digest": digest(frames), "estimates": est}


def _pooled(res: Any) -> dict[str, Any]:
    t = res.pooled
    return {"digest": digest([t]),
            "estimates": {str(r["term"]): [float(r["estimate"]), float(np.sqrt(r["t"]))]
                          for _, r in t.iterrows()}}


def _test_table(cmp: Any) -> dict[str, Any]:
    return {"digest": digest([cmp.table]), "estimates": {}}


def _impute(ddf: Any, client: Any, **kw: Any) -> Any:
    base = {"m": M, "max_iter": ITER, "seed": SEED}
    return dmice.impute(ddf, client=client, progress=False, **{**base, **kw})


def _job(layout: str, tmp: Path, df: pd.DataFrame) -> dict[str, Any]:
    from dmice.cli import main

    inp = tmp / f"in_{layout}"
    inp.mkdir()
    half = len(df) // 2
    df.iloc[:half].to_parquet(inp / "part-0.parquet")
    df.iloc[half:].reset_index(drop=True).to_parquet(inp / "part-1.parquet")
    out = tmp / f"out_{layout}"
    job = tmp / f"job_{layout}.yaml"
    job.write_text(f"version: 1\ninput: {{url: \"{inp}\", format: parquet}}\n"
                   f"output: {{url: \"{out}\", layout: {layout}}}\n"
                   f"imputation: {{m: {M}, max_iter: {ITER}, seed: {SEED}, method: {{k: poisson}}}}\n")
    if main(["run", str(job), "--run-id", "golden"]) != 0:
        raise AssertionError(f"the {layout} job failed")
    opened = dmice.open(str(out))
    try:
        return _imputation(_completed(opened), df)
    finally:
        opened.close()


def runs(client: Any, tmp: Path) -> dict[str, dict[str, Any]]:
    """Every run's digest and estimates."""
    df = golden_frame()
    ddf = dd.from_pandas(df, npartitions=2)
    got: dict[str, dict[str, Any]] = {}

    def one(name: str, kw: dict[str, Any], then: Callable[[Any], None] | None = None) -> Any:
        imp = _impute(ddf, client, **kw)
        if then is not None:
            then(imp)
        got[name] = _imputation(_completed(imp), df)
        return imp

    imp = one("default", {})
    full = dmice.analyze(imp, "y ~ x + b + C(c) + k", client=client)
    reduced = dmice.analyze(imp, "y ~ x + k", client=client)
    got["analyze gaussian"] = _pooled(full)
    got["analyze poisson"] = _pooled(dmice.analyze(imp, "k ~ x + y", family="poisson", client=client))
    for method in ("D1", "D2", "D3"):
        got[f"compare {method}"] = _test_table(full.compare(reduced, method=method))
    imp.close()
    one("polr and poisson", {"method": {"k": "poisson", "x": "norm", "o": "polr"}}).close()
    one("formulas", {"formulas": {"y": "y ~ x * b + C(c) + I(k ** 2)"}}).close()
    one("by", {"by": "site"}).close()
    one("smcfcs", {"substantive": "e ~ x + b + k"}).close()
    one("shrinkage", {"shrinkage": 0.7, "separation": "ridge"}).close()
    one("continued", {"max_iter": 2}, lambda imp: imp.iterate(ITER - 2, progress=False)).close()
    for layout in ("full", "cells"):
        got[f"job {layout}"] = _job(layout, tmp, df)
    return got


# -- the comparison ------------------------------------------------------------------------------

def _tolerance(name: str, key: str, value: list[float], df: pd.DataFrame) -> float:
    """Five standard errors of what a run estimates, for the comparison on another platform."""
    if name.startswith("analyze"):
        return 5 * value[1]  # the pooled standard error
    col, _, lev = key.partition("=")
    n_mis = value[1]
    n_obs = (len(df) - n_mis) / (df["site"].nunique() if name == "by" else 1)  # rows per model
    s = df[col]
    if lev:
        p = max(float((s == lev).mean()), 1.0 / len(df))
        sd = np.sqrt(p * (1 - p))
    else:
        sd = float(s.astype(float).std())
    # the completed-data mean moves with the imputed cells' mean: parameter and draw noise
    return 5 * (n_mis / len(df)) * sd * np.sqrt(1 / max(n_obs, 1) + 1 / (M * n_mis)) + 1e-12


def compare(got: dict[str, dict[str, Any]], golden: dict[str, Any]) -> list[str]:
    """The differences from the golden record (an empty list when the results are the same)."""
    same_platform = golden["platform"] == platform_id()
    df = golden_frame()
    problems = []
    if set(got) != set(golden["runs"]):
        problems.append(f"runs {sorted(set(got) ^ set(golden['runs']))} are not in both the record and this test")
    for name in sorted(set(got) & set(golden["runs"])):
        want, have = golden["runs"][name], got[name]
        if same_platform:
            if have["digest"] != want["digest"]:
                problems.append(f"{name}: digest {have['digest'][:12]} differs from the recorded "
                                f"{want['digest'][:12]}")
            continue
        for key, value in want["estimates"].items():
            if key not in have["estimates"]:
                problems.append(f"{name}: {key} is missing")
                continue
            tol = _tolerance(name, key, value, df)
            if not abs(have["estimates"][key][0] - value[0]) <= tol:
                problems.append(f"{name}: {key} {have['estimates'][key][0]:.4f} against the recorded "
                                f"{value[0]:.4f} (tolerance {tol:.4f})")
    return problems


def test_results_equal_the_golden_record(cluster_client, tmp_path):
    """The runs give the recorded results: bit for bit on the recording platform, within five
    standard errors elsewhere."""
    golden = json.loads(GOLDEN.read_text())
    got = runs(cluster_client, tmp_path)
    problems = compare(got, golden)
    where = "the recording platform" if golden["platform"] == platform_id() else "another platform"
    assert not problems, f"on {where}:\n" + "\n".join(problems)


def test_the_comparison_can_fail():
    """A changed digest is a failure on the recording platform, and a moved estimate elsewhere."""
    golden = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(golden["runs"]))
    got["default"]["digest"] = "0" * 64
    here = {**golden, "platform": platform_id()}
    assert compare(got, here) == [f"default: digest 000000000000 differs from the recorded "
                                  f"{golden['runs']['default']['digest'][:12]}"]
    elsewhere = {**golden, "platform": {"machine": "elsewhere"}}
    assert compare(got, elsewhere) == []  # digests are not compared there
    key = next(iter(got["default"]["estimates"]))
    got["default"]["estimates"][key][0] += 1.0
    assert [p.split(":")[0] for p in compare(got, elsewhere)] == ["default"]


def record() -> None:
    import tempfile

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            Client(cl) as client, tempfile.TemporaryDirectory() as tmp:
        got = runs(client, Path(tmp))
    GOLDEN.write_text(json.dumps({"platform": platform_id(), "runs": got}, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(got)} runs in {GOLDEN.name}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()
