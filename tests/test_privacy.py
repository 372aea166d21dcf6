"""What dmice writes about the data: no patient's value in the manifest, the diagnostics, the
report, the plots or the logs; the embedded cluster listens on loopback only.

The reference is the bytes of every file written beside the imputations (the imputation
Parquet files and the chain state under ``_state/`` hold the data and are left out), and the
listening sockets of the cluster's processes (psutil).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dmice
from dmice import plots

#: unique extreme values of a continuous column: its minimum and maximum
LOW, HIGH = "123.456789", "98765.4321"
#: a value of a free-text field seen once, and one of a complete predictor
NAME, OTHER_NAME = "Jane Doe", "John Smith"
#: the rare value of a two-valued numeric column (seen three times)
RARE_VALUE = "4242.4242"
#: a category of a categorical column seen once (the dtype lists it in every partition)
RARE_CATEGORY = "Mary Major"
SECRETS = [LOW, HIGH, "98765", "123.45", NAME, OTHER_NAME, RARE_VALUE, "4242.42", RARE_CATEGORY]


def _frame(n: int = 800, seed: int = 11) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    v = g.uniform(1000.0, 5000.0, n)
    v[7], v[500] = float(LOW), float(HIGH)
    txt = g.choice(["alpha", "beta", "gamma"], n).astype(object)
    txt[3] = NAME
    site = g.choice(["north", "south", "east"], n).astype(object)
    site[10] = OTHER_NAME
    b = np.full(n, 2.0)
    b[[20, 40, 60]] = float(RARE_VALUE)
    y = 0.001 * v + (txt == "beta") + g.normal(size=n)
    df = pd.DataFrame({"v": v, "txt": txt, "site": site, "b": b, "y": y,
                       "age": g.integers(18, 90, n).astype(float)})
    df["w"] = g.normal(50.0, 10.0, n)
    dx = g.choice(["k", "l", "m"], n).astype(object)
    dx[30] = RARE_CATEGORY
    df["dx"] = pd.Categorical(dx)
    df.loc[g.random(n) < 0.1, "dx"] = None
    df.loc[30, "dx"] = RARE_CATEGORY
    df.loc[[100, 200, 300], "w"] = None  # three imputed cells only
    for col, frac in (("v", 0.25), ("txt", 0.2), ("b", 0.2), ("age", 0.15)):
        miss = g.random(n) < frac
        miss[[3, 7, 500, 20, 40, 60, 100, 200, 300]] = False  # the rare values stay observed
        df.loc[miss, col] = None
    return df


def _written_files(out: str) -> list[Path]:
    """Every file of the output but the imputations themselves and the chain state."""
    files = []
    for p in Path(out).rglob("*"):
        rel = p.relative_to(out).parts
        if p.is_dir() or rel[0].startswith("imputation=") or rel[0] == "_state":
            continue
        files.append(p)
    return files


def _leaks(data: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in data]


@pytest.fixture(scope="module")
def written(cluster_client, tmp_path_factory):
    pytest.importorskip("matplotlib")
    from dmice.report import build_report

    df = _frame()
    out = str(tmp_path_factory.mktemp("privacy") / "out")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.DEBUG)
    try:
        imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=2, max_iter=4, seed=5, progress="log")
        imp.to_parquet(out)
        build_report(out)
    finally:
        root.removeHandler(h)
        root.setLevel(old)
    logs = "\n".join(r.getMessage() for r in records)
    return df, imp, out, logs


def test_the_data_hold_the_rare_values(written):
    """The secrets are real values of the data: they are in the imputations, which keep them."""
    df, imp, out, logs = written
    back = dmice.open(out).complete(1).compute()
    assert (back["v"] == float(LOW)).sum() >= 1 and (back["v"] == float(HIGH)).sum() >= 1
    assert (back["txt"] == NAME).sum() >= 1 and (back["site"] == OTHER_NAME).sum() == 1
    assert (back["b"] == float(RARE_VALUE)).sum() >= 3


def test_no_value_in_any_written_summary(written):
    df, imp, out, logs = written
    files = _written_files(out)
    names = {str(p.relative_to(out)) for p in files}
    assert {"_manifest.json", "_SUCCESS", "_diagnostics.arrow", "_diagnostics/report.html",
            "_diagnostics/densities.png", "_diagnostics/trace.png", "_diagnostics/pattern.png"} <= names
    found = {str(p.relative_to(out)): _leaks(p.read_bytes()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
    assert _leaks(logs.encode()) == []


def test_histogram_edges_are_not_the_extremes(written):
    df, imp, out, logs = written
    man = json.loads(Path(out, "_manifest.json").read_text())
    assert man["min_cell_count"] == 10
    d = man["distributions"]["variables"]["v"]
    edges = [e for e in d["edges"] if e is not None]
    obs = df["v"].dropna().to_numpy()
    assert d["edges"][0] is None and d["edges"][-1] is None  # open-ended tails
    assert obs.min() not in edges and obs.max() not in edges
    # every count is zero or at least min_cell_count, observed and in each imputation
    for row in [d["observed"], *d["imputed"]]:
        assert all(c == 0 or c >= 10 for c in row)
    assert sum(d["observed"]) == len(obs)
    # the counts are those of the completed data between the stored edges
    full = [-np.inf, *edges, np.inf]
    np.testing.assert_array_equal(d["observed"], np.histogram(obs, bins=full)[0])
    miss = df["v"].isna().to_numpy()
    for k in range(imp.m):
        vals = imp.complete(k + 1)["v"].compute().to_numpy()[miss]
        np.testing.assert_array_equal(d["imputed"][k], np.histogram(vals, bins=full)[0])


def test_rare_levels_are_not_named(written):
    df, imp, out, logs = written
    man = json.loads(Path(out, "_manifest.json").read_text())
    var = {v["name"]: v for v in man["variables"]}
    assert var["txt"]["levels"] == ["alpha", "beta", "gamma"] and var["txt"]["other_levels"] == 1
    assert var["site"]["levels"] == ["east", "north", "south"] and var["site"]["other_levels"] == 1
    # a two-valued numeric column: the value seen 3 times is not listed, the common one is
    assert var["b"]["kind"] == "binary" and var["b"]["levels"] == [2.0] and var["b"]["other_levels"] == 1
    d = man["distributions"]["variables"]["txt"]
    # the one cell of the unnamed level is too few to show alone: the least frequent named level
    # joins it
    assert len(d["levels"]) == 3 and set(d["levels"][:2]) < {"alpha", "beta", "gamma"}
    assert d["levels"][2] == "other (2 levels)"
    assert sum(d["observed"]) == df["txt"].notna().sum()
    for row in [d["observed"], *d["imputed"]]:
        assert all(c == 0 or c >= 10 for c in row)
    keys = [k for k in man["convergence"]["rhat"] if k.startswith("txt ")]
    assert "txt proportion[other (1 level)]" in keys and len(keys) == 4
    # the chain statistics of the merged levels add up: proportions of each chain sum to 1
    cs = dmice.open(out).chain_stats
    tot = cs[cs["variable"] == "txt"].groupby(["iteration", "chain"])["proportion"].sum()
    np.testing.assert_allclose(tot, 1.0)


def test_fewer_imputed_cells_than_the_threshold_are_not_summarised(written):
    """w has 3 missing cells: pmm fills them with observed values, whose mean or histogram would
    show them."""
    df, imp, out, logs = written
    man = json.loads(Path(out, "_manifest.json").read_text())
    d = man["distributions"]["variables"]["w"]
    assert d["imputed"] is None and sum(d["observed"]) == len(df) - 3
    cs = dmice.open(out).chain_stats
    w = cs[cs["variable"] == "w"]
    assert len(w) == imp.m * imp.iterations and w["mean"].isna().all() and w["sd"].isna().all()
    assert not [k for k in man["convergence"]["rhat"] if k.startswith("w ") and man["convergence"]["rhat"][k]]
    v = cs[cs["variable"] == "v"]
    assert v["mean"].notna().all()


def test_opened_output_plots_and_continues(written):
    df, imp, out, logs = written
    again = dmice.open(out)
    dist = plots.distributions(again, bins=20)
    assert dist["v"]["observed"].sum() == df["v"].notna().sum()
    assert len(dist["v"]["edges"]) <= 23
    mem = plots.distributions(imp, bins=20)
    np.testing.assert_array_equal(mem["v"]["edges"], dist["v"]["edges"])
    np.testing.assert_array_equal(mem["v"]["imputed"], dist["v"]["imputed"])
    more = again.iterate(1, progress=None)
    try:
        assert more.iterations == 5
    finally:
        more.close()


def test_embedded_cluster_listens_on_loopback_only(monkeypatch):
    psutil = pytest.importorskip("psutil")
    import distributed

    from dmice.runtime import cluster as engine

    def no_client():
        raise ValueError("no client")

    monkeypatch.setattr(distributed, "get_client", no_client)
    client, cluster = engine.get_client(n_workers=1)
    try:
        sched = cluster.scheduler
        dash_port = sched.http_server.port
        assert sched.address.startswith("tcp://127.0.0.1:")
        ports = {int(sched.address.rsplit(":", 1)[1]), dash_port}
        ports |= {int(w.address.rsplit(":", 1)[1]) for w in cluster.workers.values()}
        here = [c for c in psutil.Process().net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
        assert {c.laddr.port for c in here} == ports
        assert {c.laddr.ip for c in here} == {"127.0.0.1"}
        pids = [w.process.process.pid for w in cluster.workers.values()]
        assert pids
        for pid in pids:
            listening = [c for c in psutil.Process(pid).net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN]
            assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
        # what the progress log line reports is where the dashboard listens
        assert client.dashboard_link.startswith(f"http://127.0.0.1:{dash_port}/")
    finally:
        client.close()
        cluster.close()


def test_job_output_names_no_rare_value(cluster_client, tmp_path):
    """``dmice run`` writes its own manifest (with the job's configuration): the same rule, and a
    collapse= naming the rare level in the job file is kept in the chain state only."""
    from dmice.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    df = _frame(600, seed=3)
    for i in range(2):
        df.iloc[i * 300:(i + 1) * 300].reset_index(drop=True).to_parquet(inp / f"part-{i}.parquet")
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(f'version: 1\ninput: {{url: "{inp}", format: parquet}}\n'
                   f'output: {{url: "{out}", layout: cells}}\n'
                   f'imputation: {{m: 2, max_iter: 2, seed: 3, min_cell_count: 12, '
                   f'collapse: {{site: {{"{OTHER_NAME}": north}}}}}}\n')
    assert main(["run", str(job), "--run-id", "r1"]) == 0
    man = json.loads((out / "runs" / "r1" / "_manifest.json").read_text())
    assert man["min_cell_count"] == 12 and man["parameters"]["collapse"] == {"site": {}}
    found = {}
    for p in out.rglob("*"):
        rel = p.relative_to(out).parts
        if p.is_dir() or "cells" in rel or "_state" in rel:
            continue
        found[str(p.relative_to(out))] = _leaks(p.read_bytes())
    assert "runs/r1/_manifest.json" in found and "runs/r1/_diagnostics.arrow" in found
    assert {k: v for k, v in found.items() if v} == {}
    # continuing from disk uses the collapse= given (kept in the chain state)
    more = dmice.open(str(out)).iterate(1, progress=None)
    try:
        assert more.parameters["collapse"] == {"site": {OTHER_NAME: "north"}}
        assert more.iterations == 3
    finally:
        more.close()


def test_merging_keeps_every_count_zero_or_above_the_threshold():
    from dmice import disclosure as D

    g = np.random.default_rng(4)
    for _ in range(300):
        cells = int(g.integers(1, 30))
        rows = g.poisson(g.uniform(0, 12), size=(int(g.integers(1, 4)), cells))
        rows = rows[D.active_rows(rows, 10)]
        groups = D.merge_runs(rows, 10)
        assert [a for a, _ in groups] == [0] + [b for _, b in groups[:-1]] and groups[-1][1] == cells
        for a, b in groups:
            s = rows[:, a:b].sum(axis=1)
            assert ((s == 0) | (s >= 10)).all()
    # unordered levels: the rare one is never named; its group takes in the least frequent level
    names, members = D.merge_levels(["a", "b", "c", "d"], np.array([[50, 12, 30, 2], [20, 0, 15, 0]]),
                                    10, False, [False, False, False, True])
    assert names == ["a", "c", "other (2 levels)"] and members == [[0], [2], [1, 3]]
    # ordered levels merge with a neighbour and are labelled by position
    names, members = D.merge_levels(["lo", "mid", "hi", "top"], np.array([[50, 3, 30, 40]]), 10, True,
                                    [False, True, False, False])
    assert names == ["lo", "levels 2-3", "top"] and members == [[0], [1, 2], [3]]
