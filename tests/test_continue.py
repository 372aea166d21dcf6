"""Continuing chains, adding chains, checkpoints, the R-hat stopping rule and progress reporting."""

from __future__ import annotations

import logging

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import mixed_frame

import dmice
from dmice import store
from dmice.diagnostics import RHAT_OK, threshold
from dmice.errors import InputError, OutputError


def _ddf(n=2000, seed=3):
    return dd.from_pandas(mixed_frame(n, seed=seed), npartitions=3)


def _cells(imp):
    """Every completed data set, as one pandas frame per imputation."""
    return [imp.complete(k).compute().reset_index(drop=True) for k in range(1, imp.m + 1)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)


def test_five_plus_five_iterations_equal_ten(cluster_client):
    ddf = _ddf()
    one = dmice.impute(ddf, m=3, max_iter=10, seed=5, progress=False)
    two = dmice.impute(ddf, m=3, max_iter=5, seed=5, progress=False)
    assert two.iterate(5, progress=False) is two
    assert two.iterations == 10
    _same(_cells(one), _cells(two))
    pd.testing.assert_frame_equal(one.chain_stats, two.chain_stats)
    # and not a coincidence: the chains do move between iteration 5 and 10
    five = dmice.impute(ddf, m=3, max_iter=5, seed=5, progress=False)
    assert not all(a.equals(b) for a, b in zip(_cells(five), _cells(one)))


def test_continue_from_disk_equals_one_run(cluster_client, tmp_path):
    ddf = _ddf()
    ref = dmice.impute(ddf, m=2, max_iter=6, seed=9, progress=False)
    first = dmice.impute(ddf, m=2, max_iter=3, seed=9, progress=False)
    first.to_parquet(str(tmp_path / "out"))
    opened = dmice.open(str(tmp_path / "out"))
    cont = opened.iterate(3, progress=False)
    assert cont is not opened and cont.iterations == 6 and opened.iterations == 3
    _same(_cells(ref), _cells(cont))
    pd.testing.assert_frame_equal(ref.chain_stats, cont.chain_stats)
    assert cont.dtypes == ref.dtypes


def test_continue_from_disk_with_marker_columns_equals_one_run(cluster_client, tmp_path):
    """where and ignore by marker columns are stored with the output, so its chains continue
    from disk (masks given as arrays are not, and are refused there)."""
    df = mixed_frame(2000, seed=3)
    g = np.random.default_rng(4)
    df["recheck"] = df["x"].notna().to_numpy() & (g.random(len(df)) < 0.1)
    df["holdout"] = g.random(len(df)) < 0.2
    ddf = dd.from_pandas(df, npartitions=3)
    kw = dict(m=2, seed=9, progress=False, where={"x": "recheck"}, ignore="holdout")
    ref = dmice.impute(ddf, max_iter=4, **kw)
    dmice.impute(ddf, max_iter=2, **kw).to_parquet(str(tmp_path / "out"))
    opened = dmice.open(str(tmp_path / "out"))
    assert opened.manifest["parameters"]["ignore"] == {"column": "holdout"}
    _same(_cells(ref), _cells(opened.iterate(2, progress=False)))
    arrays = dmice.impute(ddf, m=2, max_iter=2, seed=9, progress=False, ignore=df["holdout"].to_numpy())
    arrays.to_parquet(str(tmp_path / "arrays"))
    with pytest.raises(InputError, match=r"imputed with \['ignore'\], which are not stored"):
        dmice.open(str(tmp_path / "arrays")).iterate(1, progress=False)


def test_add_imputations_appends_independent_chains(cluster_client):
    ddf = _ddf()
    imp = dmice.impute(ddf, m=2, max_iter=4, seed=2, progress=False)
    before = _cells(imp)
    imp.add_imputations(2, progress=False)
    assert imp.m == 4 and imp.iterations == 4
    after = _cells(imp)
    _same(before, after[:2])  # the existing chains are untouched
    df = ddf.compute().reset_index(drop=True)
    for frame in after[2:]:
        assert frame.notna().all().all()
        obs = df["x"].notna()
        np.testing.assert_array_equal(frame.loc[obs, "x"], df.loc[obs, "x"])
    assert not after[2].equals(after[0]) and not after[2].equals(after[3])
    cs = imp.chain_stats
    assert sorted(cs["chain"].unique()) == [1, 2, 3, 4]
    assert cs.groupby("chain")["iteration"].max().eq(4).all()
    # chain statistics of the added chains equal the means recomputed from their completed data
    mis = df["x"].isna()
    last = cs[(cs["variable"] == "x") & (cs["iteration"] == 4)].set_index("chain")
    for k in (3, 4):
        np.testing.assert_allclose(last.loc[k, "mean"], after[k - 1].loc[mis, "x"].mean(), rtol=1e-10)
    # more chains continue together
    imp.iterate(1, progress=False)
    assert imp.iterations == 5 and imp.chain_stats["chain"].nunique() == 4


def test_checkpoint_resume_equals_uninterrupted(cluster_client, tmp_path):
    ddf = _ddf()
    ck = str(tmp_path / "ck")
    ref = dmice.impute(ddf, m=2, max_iter=6, seed=4, progress=False)
    # an interrupted run: its last checkpoint is the state after iteration 4
    dmice.impute(ddf, m=2, max_iter=4, seed=4, checkpoint=ck, progress=False)
    ptr = store.latest_checkpoint(ck, None)
    assert ptr["iteration"] == 4
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("iter=")] == ["iter=000004"]
    resumed = dmice.impute(ddf, m=2, max_iter=6, seed=4, checkpoint=ck, progress=False)
    assert resumed.iterations == 6
    _same(_cells(ref), _cells(resumed))
    pd.testing.assert_frame_equal(ref.chain_stats, resumed.chain_stats)
    # a checkpoint of another configuration is refused, naming the problem
    with pytest.raises(OutputError, match="another configuration"):
        dmice.impute(ddf, m=2, max_iter=6, seed=5, checkpoint=ck, progress=False)


def test_until_rhat_stops_early_and_equals_a_run_of_that_length(cluster_client):
    ddf = _ddf(3000)
    imp = dmice.impute(ddf, m=4, max_iter=30, seed=8, until_rhat=1.2, progress=False)
    assert 8 <= imp.iterations < 30
    conv = imp.convergence(window=imp.iterations // 2)
    assert conv["rhat"].max() < 1.2
    same = dmice.impute(ddf, m=4, max_iter=imp.iterations, seed=8, progress=False)
    _same(_cells(imp), _cells(same))
    with pytest.raises(InputError, match="until_rhat"):
        dmice.impute(ddf, m=1, until_rhat=1.05)
    with pytest.raises(InputError, match="until_rhat"):
        dmice.impute(ddf, m=2, until_rhat=0.9)


def _sticky(n=3000, seed=0):
    """Two strongly correlated variables missing together: mice's classic slowly mixing case
    (correlation 0.989, just below the 0.99 at which the screening drops a predictor)."""
    g = np.random.default_rng(seed)
    a = g.normal(size=n)
    b = a + 0.15 * g.normal(size=n)
    c = g.normal(size=n)
    miss = g.random(n) < 0.8
    df = pd.DataFrame({"a": a, "b": b, "c": c})
    df.loc[miss, "a"] = np.nan
    df.loc[miss, "b"] = np.nan
    return dd.from_pandas(df, npartitions=2)


def test_non_converged_runs_are_flagged(cluster_client):
    ddf = _sticky()
    one = dmice.impute(ddf, m=4, max_iter=1, seed=1, progress=False)
    assert "NOT converged" in one.verdict() and "NOT converged" in repr(one)
    # a bad start: chains filled from random observed values, and a and b, missing together
    # and almost collinear, can only drift slowly away from it (mice's pathological case)
    few = dmice.impute(ddf, m=4, max_iter=20, seed=1, progress=False)
    conv = few.convergence(window=10)
    assert conv["rhat"].max() > threshold(4, 10, len(conv)) > RHAT_OK
    assert "NOT converged" in few.verdict()


def test_progress_log_lines_and_callback(cluster_client, caplog):
    ddf = _ddf(1000)
    calls = []
    dmice.impute(ddf, m=2, max_iter=2, seed=1, progress=lambda it, tot, s: calls.append((it, tot)))
    assert calls == [(1, 2), (2, 2)]
    with caplog.at_level(logging.INFO, logger="dmice"):
        dmice.impute(ddf, m=2, max_iter=9, seed=1, progress="log")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration=")]
    assert len(lines) == 9
    assert lines[0].startswith("iteration=1/9 seconds=") and lines[0].endswith("max_rhat=nan")
    assert "max_rhat=nan" not in lines[-1]  # judged once 8 iterations exist
    assert any(r.getMessage().startswith("dashboard=http") for r in caplog.records)
    with pytest.raises(InputError, match="progress"):
        dmice.impute(ddf, progress="loud")


def test_interrupted_iterate_keeps_the_chains_it_ran(cluster_client):
    """An error raised while ``iterate`` runs (here from the progress callback after iteration 3,
    as a Ctrl-C would) leaves a usable result holding the chains of the iterations done: continuing
    it to 4 iterations equals an uninterrupted run of 4."""
    ref = dmice.impute(_ddf(), m=2, max_iter=4, seed=8)
    imp = dmice.impute(_ddf(), m=2, max_iter=2, seed=8)

    def stop(it, total, secs):
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imp.iterate(2, progress=stop)
    assert imp.iterations == 3
    imp.iterate(1)
    assert imp.iterations == 4
    _same(_cells(imp), _cells(ref))
