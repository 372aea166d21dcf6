"""The engine on a real distributed cluster: statistics with known truth, reproducibility, dtypes."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from conftest import mixed_frame
from distributed import Client, LocalCluster
from scipy.special import expit

import dmice
from dmice.analysis import fit_glm
from dmice.pooling import pool

TRUTH_LIN = np.array([1.0, 1.0, 0.5])  # y ~ 1 + x + z
TRUTH_LOG = np.array([-0.5, 0.8, -0.5])  # e ~ 1 + x + z


def _mar_data(n=20000, seed=42):
    g = np.random.default_rng(seed)
    z = (g.random(n) < 0.5).astype(np.int64)
    x = 0.3 * z + g.normal(size=n)
    y = TRUTH_LIN[0] + TRUTH_LIN[1] * x + TRUTH_LIN[2] * z + g.normal(size=n)
    e = (g.random(n) < expit(TRUTH_LOG[0] + TRUTH_LOG[1] * x + TRUTH_LOG[2] * z)).astype(np.int64)
    df = pd.DataFrame({"x": x, "z": z, "y": y, "e": e})
    # x is missing more often when y is high and the event happened: MAR given (y, e)
    miss = g.random(n) < expit(-1.0 + 1.2 * (y - 1) + 0.8 * e)
    df.loc[miss, "x"] = np.nan
    return df


def _design(outcome):
    def f(df):
        X = np.column_stack([np.ones(len(df)), df["x"].to_numpy(float), df["z"].to_numpy(float)])
        return X, df[outcome].to_numpy(float)
    return f


@pytest.mark.parametrize("method", ["pmm", "norm"])
def test_pooled_estimates_recover_truth_complete_cases_do_not(cluster_client, method):
    df = _mar_data()
    ddf = dd.from_pandas(df, npartitions=3)
    imp = dmice.impute(ddf, m=10, max_iter=6, seed=11, method={"x": method})
    frames = [imp.complete(k) for k in range(1, imp.m + 1)]
    cc = df.dropna()
    for family, outcome, truth in (("gaussian", "y", TRUTH_LIN), ("binomial", "e", TRUTH_LOG)):
        fit = fit_glm(frames, _design(outcome), ["const", "x", "z"], family=family)
        res = pool(fit.params, fit.cov, dfcom=fit.df_resid).summary()
        z_mi = np.abs(res["estimate"].to_numpy() - truth) / res["std_error"].to_numpy()
        assert np.all(z_mi < 3), (family, z_mi)
        X, yv = _design(outcome)(cc)
        fam = sm.families.Gaussian() if family == "gaussian" else sm.families.Binomial()
        ccf = sm.GLM(yv, X, family=fam).fit()
        z_cc = np.abs(ccf.params - truth) / ccf.bse
        assert z_cc.max() > 3, (family, z_cc)  # complete cases are biased under this MAR
    assert imp.iterations == 6
    chain = imp.chain_stats
    assert set(chain["chain"]) == set(range(1, 11)) and chain["iteration"].max() == 6


def test_chain_stats_equal_completed_data(cluster_client):
    df = mixed_frame(2000, seed=3)
    imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=2, max_iter=2, seed=5)
    cs = imp.chain_stats
    miss = df["x"].isna().to_numpy()
    for k in (1, 2):
        done = imp.complete(k).compute()
        vals = done["x"].to_numpy()[miss]
        row = cs[(cs.variable == "x") & (cs.chain == k) & (cs.iteration == 2)].iloc[0]
        np.testing.assert_allclose([row["mean"], row["sd"]], [vals.mean(), vals.std(ddof=1)], rtol=1e-9)
        lev = cs[(cs.variable == "c") & (cs.chain == k) & (cs.iteration == 2)]
        got = done["c"][df["c"].isna().to_numpy()].value_counts(normalize=True)
        for _, r in lev.iterrows():
            assert r["proportion"] == pytest.approx(got.get(r["level"], 0.0), abs=1e-12)


def test_identical_results_with_one_and_two_workers(cluster_client, tmp_path):
    df = mixed_frame(3000, seed=8)
    ddf = dd.from_pandas(df, npartitions=4)
    two = dmice.impute(ddf, m=3, max_iter=3, seed=99)
    got2 = [two.complete(k).compute() for k in (1, 2, 3)]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
            Client(cl) as c1:
        one = dmice.impute(ddf, m=3, max_iter=3, seed=99, client=c1)
        got1 = [one.complete(k).compute(scheduler=c1.get) for k in (1, 2, 3)]
        one.close()
    for a, b in zip(got1, got2):
        pd.testing.assert_frame_equal(a, b)
    assert not got1[0].equals(got1[1])  # chains differ
    # a different seed gives different imputations
    other = dmice.impute(ddf, m=1, max_iter=3, seed=100).complete(1).compute()
    assert not other.equals(got2[0])


def test_in_process_cluster_gives_the_same_chains(cluster_client):
    """Workers that share one process (``processes=False``) keep their partitions apart."""
    ddf = dd.from_pandas(mixed_frame(2000, seed=5), npartitions=4)
    ref = dmice.impute(ddf, m=2, max_iter=3, seed=7).complete(2).compute()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cl, \
            Client(cl) as c:
        got = dmice.impute(ddf, m=2, max_iter=3, seed=7, client=c).complete(2).compute(scheduler=c.get)
    pd.testing.assert_frame_equal(got, ref)


def test_first_linear_visit_rides_along_with_the_cold_start(cluster_client, monkeypatch):
    """The statistics of the first visit (pmm) are computed in the first round of the Newton
    cold start: one round fewer, and the same chains as when they take a round of their own."""
    from dmice.runtime import engine as _engine

    ddf = dd.from_pandas(mixed_frame(2000, seed=6), npartitions=2)
    imp = dmice.impute(ddf, m=2, max_iter=2, seed=4)
    assert imp.visit_sequence[0] == "x" and imp.method["x"] == "pmm" and imp.method["z"] == "logreg"
    prefit = _engine.Engine.prefit
    monkeypatch.setattr(_engine.Engine, "prefit", lambda self, events, extra=None: prefit(self, events))
    ref = dmice.impute(ddf, m=2, max_iter=2, seed=4)
    assert imp._engine.rounds == ref._engine.rounds - 1
    for k in (1, 2):
        pd.testing.assert_frame_equal(imp.complete(k).compute(), ref.complete(k).compute())


def test_dtypes_and_categories_kept(cluster_client):
    g = np.random.default_rng(1)
    n = 1500
    df = pd.DataFrame({
        "num": g.normal(size=n),
        "count": pd.array(g.integers(0, 50, n), dtype="Int64"),
        "flag01": pd.array(g.integers(0, 2, n), dtype="Int64"),
        "yes": pd.array(g.random(n) < 0.3, dtype="boolean"),
        "cat": pd.Categorical(g.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi", "unused"]),
        "grade": pd.Categorical(g.choice(["I", "II", "III"], n), categories=["I", "II", "III"], ordered=True),
        "txt": pd.Series(g.choice(["alpha", "beta", "gamma"], n), dtype="string"),
    })
    for col in df.columns:
        df.loc[g.random(n) < 0.2, col] = None
    ddf = dd.from_pandas(df, npartitions=2)
    imp = dmice.impute(ddf, m=2, max_iter=2, seed=3)
    assert imp.method == {"num": "pmm", "count": "pmm", "flag01": "logreg", "yes": "logreg",
                          "cat": "polyreg", "grade": "polr", "txt": "polyreg"}
    assert not imp.logged_events["event"].str.contains("converge").any()  # well-posed fits log nothing
    out = imp.complete(1).compute()
    assert out.isna().sum().sum() == 0
    for col in df.columns:
        assert out[col].dtype == ddf.dtypes[col], col
    assert set(out["flag01"].unique()) <= {0, 1}
    assert set(out["count"].unique()) <= set(df["count"].dropna().unique())  # pmm: observed values
    assert list(out["cat"].cat.categories) == ["lo", "mid", "hi", "unused"]
    assert out["grade"].cat.ordered
    assert set(out["txt"].unique()) <= {"alpha", "beta", "gamma"}
    obs = df.notna()
    for col in df.columns:  # observed cells untouched
        pd.testing.assert_series_equal(out[col][obs[col]], ddf[col].compute()[obs[col]])


def test_embedded_cluster_is_started_and_closed():
    """With no active client, impute starts a LocalCluster owned by the result (fresh interpreter)."""
    import subprocess
    import sys

    code = """
import dmice, numpy as np, pandas as pd
from distributed import get_client
g = np.random.default_rng(0)
df = pd.DataFrame({"a": g.normal(size=500), "b": g.normal(size=500)})
df.loc[::7, "a"] = np.nan
with dmice.impute(df, m=2, max_iter=1, seed=1) as imp:
    cluster = imp._session.cluster
    assert cluster is not None and len(cluster.workers) >= 1
    assert imp.complete(2).compute().isna().sum().sum() == 0
assert imp._session is None and cluster.status.name == "closed"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", "if __name__ == '__main__':\n" +
                          "\n".join("    " + line for line in code.strip().splitlines())],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_long_format(cluster_client):
    df = mixed_frame(800, seed=4)
    imp = dmice.impute(df, m=3, max_iter=1, seed=1)
    long = imp.complete("long").compute()
    assert len(long) == 3 * len(df)
    assert sorted(long["imputation"].unique()) == [1, 2, 3]


def test_only_statistics_reach_the_client(cluster_client):
    """What the loop gathers per visit does not grow with the rows: the data stays on the workers."""
    per_visit = {}
    for n in (8000, 32000):
        df = mixed_frame(n, seed=1)
        imp = dmice.impute(dd.from_pandas(df, npartitions=4), m=2, max_iter=2, seed=1, donor_pool=500)
        eng = imp._engine
        per_visit[n] = eng.bytes_gathered / eng.rounds
        data_bytes = df.memory_usage(deep=True).sum()
    assert eng.bytes_gathered < data_bytes / 4, (eng.bytes_gathered, data_bytes)
    assert per_visit[32000] < 1.5 * per_visit[8000], per_visit


def test_parquet_input_with_unknown_categories(cluster_client, tmp_path):
    """dask reads Parquet categoricals with unknown categories; levels come from the partitions."""
    df = mixed_frame(2000, seed=6)
    df.to_parquet(tmp_path / "in.parquet")
    ddf = dd.read_parquet(tmp_path / "in.parquet")
    assert not ddf["c"].cat.known
    imp = dmice.impute(ddf, m=2, max_iter=2, seed=1)
    assert imp.method["c"] == "polyreg"
    out = imp.complete(2).compute()
    assert out.isna().sum().sum() == 0
    assert set(out["c"].astype(str)) == {"a", "b", "c"}


def test_complete_data_in_several_partitions(cluster_client):
    """Nothing to impute in a frame of several partitions (one of them empty): the data come back
    unchanged (distributed refused the empty scatter of sampling pools)."""
    g = np.random.default_rng(2)
    df = pd.DataFrame({"x": g.normal(size=40), "y": g.normal(size=40)})
    ddf = dd.from_pandas(df, npartitions=2, sort=False)
    ddf = dd.concat([ddf.head(0, compute=False), ddf])
    with dmice.impute(ddf, m=2, max_iter=2, seed=1) as imp:
        assert not imp.method or set(imp.method.values()) <= {""}
        pd.testing.assert_frame_equal(imp.complete(2).compute().reset_index(drop=True), df)


def test_lost_worker_with_persisted_input_is_rebuilt_and_the_run_finishes():
    """A worker killed while the chains run, the input persisted on the workers: its partitions
    are recomputed from the input's graph, the chains replayed, and the result is the undisturbed
    run's (more cases in test_faults.py)."""
    import os
    import signal

    ddf = dd.from_pandas(mixed_frame(4000, seed=3), npartitions=4)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
            Client(cl) as c:
        ddf = c.persist(ddf)
        with dmice.impute(ddf, m=2, max_iter=4, seed=1, client=c, progress=None) as plain:
            want = plain.complete(2).compute()
        pids = c.run(os.getpid)
        killed = []

        def progress(it, total, secs):
            if it == 2 and not killed:  # once: the replay passes iteration 2 again
                killed.append(sorted(pids)[0])
                os.kill(pids[killed[0]], signal.SIGKILL)

        with dmice.impute(ddf, m=2, max_iter=4, seed=1, client=c, progress=progress) as imp:
            assert len(imp._engine.recoveries) == 1
            pd.testing.assert_frame_equal(imp.complete(2).compute(), want)


def test_calls_keep_older_objects_out_of_collections_until_they_return():
    """dmice._gc.frozen: objects older than the call are not traversed (nor collected) by
    collections during it, nested calls included, and are collected again once it returns,
    even when it raises."""
    import gc
    import weakref

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    assert gc.get_freeze_count() == 0
    gc.disable()  # no automatic collection between the garbage made here and the call
    try:
        old = cycle()  # unreachable garbage made before the call
        seen = []
        _call_frozen(cycle, seen, old)
    finally:
        gc.enable()
    (old_alive, new_collected, frozen_count), = seen
    assert old_alive and new_collected and frozen_count > 0
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None


def _call_frozen(cycle, seen, old):
    import gc

    from dmice._gc import frozen

    @frozen
    def inner():
        new = cycle()
        gc.collect()
        seen.append((old() is not None, new() is None, gc.get_freeze_count()))

    @frozen
    def outer():
        inner()
        raise ValueError("stop")

    with pytest.raises(ValueError):
        outer()


def test_a_failed_round_logs_no_data_values(monkeypatch, caplog):
    """A round that fails on a worker is logged by distributed with its arguments: the donors'
    values and the draws travel sealed, so the log holds no value of the data."""
    import logging

    import dmice.block as B

    g = np.random.default_rng(3)
    n = 80
    x = g.normal(size=n)
    y = np.round(5000 + 1000 * g.random(n), 3) + 0.123  # every value ends in .123
    df = pd.DataFrame({"x": x, "y": y})
    df.loc[::4, "y"] = np.nan
    calls = {"n": 0}
    visit = B.visit

    def failing(block, plan, order, request):
        if order:
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("visit failed")
        return visit(block, plan, order, request)

    monkeypatch.setattr(B, "visit", failing)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cl, \
            Client(cl) as c, caplog.at_level(logging.WARNING, logger="distributed"):
        with pytest.raises(RuntimeError, match="visit failed"):
            dmice.impute(dd.from_pandas(df, npartitions=2), m=2, max_iter=3, seed=1, client=c)
    text = caplog.text
    assert "Run Failed" in text  # the failure was logged, with its arguments
    # the order (the drawn coefficients, the donors' predicted means and values) is not shown
    assert "donor" not in text and "array(" not in text and ".123" not in text
    assert "<sealed dict>" in text
