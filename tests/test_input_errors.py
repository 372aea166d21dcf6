"""Inputs that used to crash deep inside a run (or return a silently wrong result) either impute
correctly or raise InputError naming the column, never a value."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

import dmice
from dmice.errors import InputError

SECRET = "Jane Q. Patient"  # a data value that must never appear in a message


def _base(n: int = 300, seed: int = 0) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    x = g.normal(size=n)
    df = pd.DataFrame({"x": x, "y": x + g.normal(size=n)})
    df.loc[g.random(n) < 0.2, "y"] = np.nan
    return df


def _assert_imputed(imp, df: pd.DataFrame) -> None:
    """Every imputation: no missing cell in an imputed column, observed cells unchanged."""
    for k in range(1, imp.m + 1):
        d = imp.complete(k).compute().reset_index(drop=True)
        for c in imp.imputed_columns:
            assert d[c].isna().sum() == 0, c
        for c in df.columns:
            obs = df[c].notna().to_numpy()
            assert (d[c][obs].to_numpy() == df[c][obs].to_numpy()).all(), c
        assert {c: str(t) for c, t in d.dtypes.items()} == imp.dtypes  # the input's dtypes


def test_string_column_with_one_observed_level(cluster_client):
    df = _base()
    df["s"] = np.where(np.arange(len(df)) % 3 == 0, None, SECRET)
    imp = dmice.impute(df, m=2, max_iter=2, seed=1)
    assert imp.method["s"] == "sample"
    _assert_imputed(imp, df)
    assert (imp.complete(1).compute()["s"] == SECRET).all()
    assert imp.logged_events.event.str.contains("one observed level").any()
    assert not imp.logged_events.event.str.contains(SECRET, regex=False).any()


def test_categorical_and_numeric_columns_with_one_observed_value(cluster_client):
    df = _base()
    df["c"] = pd.Categorical(np.where(np.arange(len(df)) % 4 == 0, None, "u"), categories=["u", "v"])
    df["k"] = np.where(np.arange(len(df)) % 5 == 0, np.nan, 7.0)
    imp = dmice.impute(df, m=2, max_iter=2, seed=1)
    _assert_imputed(imp, df)
    d = imp.complete(2).compute()
    assert (d["c"] == "u").all() and (d["k"] == 7.0).all()


@pytest.mark.parametrize("big", [1e160, -3e200, 1e300])
def test_huge_values_are_imputed(cluster_client, big, tmp_path):
    """Values near the float range: moments computed in scaled units; the models work on the
    standardised column, as for any other scale."""
    df = _base(400)
    df["y"] = df["y"] * big
    df["x"] = df["x"] * big
    df.loc[::7, "x"] = np.nan
    imp = dmice.impute(df, m=2, max_iter=2, seed=4, method={"y": "norm"})
    _assert_imputed(imp, df)
    d = imp.complete(1).compute()
    obs = df["y"].notna()
    # the imputed values are on the column's scale, not overflowed or collapsed
    assert np.isfinite(d["y"]).all() and np.isfinite(d["x"]).all()
    assert 0.2 < (d["y"][~obs] / big).std() / (df["y"][obs] / big).std() < 5
    # chain statistics (R-hat) and the written summaries work on that scale too
    cs = imp.chain_stats
    assert np.isfinite(cs["mean"]).all() and np.isfinite(cs["sd"]).all() and (cs["sd"] > 0).all()
    out = imp.to_parquet(str(tmp_path / "out"))
    assert dmice.open(out).complete(1).compute()["y"].isna().sum() == 0


@pytest.mark.parametrize("method", ["pmm", "norm"])
def test_values_at_the_ends_of_the_float_range(cluster_client, method):
    df = _base()
    df.loc[0, "y"], df.loc[1, "y"] = 1.7e308, -1.7e308
    df.loc[2, "x"] = 1.7e308
    imp = dmice.impute(df, m=2, max_iter=2, seed=3, method={"y": method})
    _assert_imputed(imp, df)
    for k in (1, 2):
        assert np.isfinite(imp.complete(k).compute()["y"]).all()


@pytest.mark.parametrize("col", ["x", "y"])
def test_one_huge_value_among_ordinary_ones(cluster_client, col):
    """One value of 1e160 (a unit error, say) among standard normal values: imputes (the value
    dominates the column's scale; the models still fit) instead of crashing in screening."""
    df = _base()
    df.loc[5, col] = 1e160
    df.loc[::11, "x"] = np.nan
    df.loc[5, col] = 1e160
    imp = dmice.impute(df, m=2, max_iter=2, seed=5)
    _assert_imputed(imp, df)


def test_multiindex_columns_are_refused():
    df = _base()
    df.columns = pd.MultiIndex.from_tuples([("a", "x"), ("a", "y")])
    with pytest.raises(InputError, match="MultiIndex"):
        dmice.impute(df, m=2)


@pytest.mark.parametrize("name", [1, 2.5, None, ("a", "b")])
def test_non_string_column_names_are_refused(name):
    df = _base()
    df[name] = 1.0
    with pytest.raises(InputError, match="column names must be"):
        dmice.impute(df, m=2)


def test_complex_column_is_refused(cluster_client):
    df = _base()
    df["z"] = df["x"] + 1j * df["x"]
    df.loc[::6, "z"] = np.nan
    with pytest.raises(InputError, match="column 'z'.*complex"):
        dmice.impute(df, m=2, max_iter=1)
    # left alone on request, or kept as it is when complete
    imp = dmice.impute(df, m=2, max_iter=1, method={"z": ""})
    assert imp.method["z"] == "" and imp.complete(1).compute()["z"].isna().sum() == df["z"].isna().sum()
    df["z"] = df["z"].fillna(0)
    imp = dmice.impute(df, m=2, max_iter=1)
    assert (imp.complete(1).compute()["z"].to_numpy() == df["z"].to_numpy()).all()


def test_mixed_object_column_is_refused(cluster_client):
    df = _base()
    vals = np.array([SECRET, 3, "b", 4.5] * (len(df) // 4), dtype=object)
    df["o"] = pd.Series(vals, dtype=object)
    df.loc[::5, "o"] = None
    with pytest.raises(InputError, match="column 'o'.*several Python types.*int.*str") as e:
        dmice.impute(df, m=2, max_iter=1)
    assert SECRET not in str(e.value)
    # complete: kept as it is (values and types), and not used as a predictor
    df["o"] = pd.Series(np.array([SECRET, 3, "b", 4.5] * (len(df) // 4), dtype=object), dtype=object)
    imp = dmice.impute(df, m=2, max_iter=1)
    out = imp.complete(1).compute()["o"].tolist()
    assert out == df["o"].tolist() and [type(v) for v in out] == [type(v) for v in df["o"]]
    assert imp.logged_events.event.str.contains("several Python types").any()


def test_incomplete_unsupported_dtype_names_the_way_out(cluster_client):
    df = _base()
    df["when"] = pd.Timestamp("2020-01-01") + pd.to_timedelta(np.arange(len(df)), unit="D")
    df.loc[::9, "when"] = pd.NaT
    with pytest.raises(InputError, match="column 'when' cannot be imputed.*method=\\{'when': ''\\}"):
        dmice.impute(df, m=2, max_iter=1)


def test_too_many_levels_with_missing_values(cluster_client):
    df = _base(500)
    df["name"] = [f"n{i}" for i in range(len(df))]
    df.loc[::10, "name"] = None
    with pytest.raises(InputError, match="column 'name' cannot be imputed.*distinct values"):
        dmice.impute(df, m=2, max_iter=1)
    imp = dmice.impute(df, m=2, max_iter=1, method={"name": ""})
    assert imp.complete(1).compute()["name"].isna().sum() == df["name"].isna().sum()


# ---------------------------------------------------------------------------------------------
# memory: a run whose resident state cannot fit in the workers is refused before it starts


def test_m_too_large_for_the_workers_is_refused(cluster_client):
    df = _base(2000)
    df.loc[::3, "x"] = np.nan
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"m=1000000.*GiB.*workers") as e:
        dmice.impute(df, m=10**6, max_iter=1)
    assert time.perf_counter() - t0 < 30  # refused from the schema, before any block is built
    assert "partitions" in str(e.value)


def test_memory_estimate_is_close_to_a_real_run(cluster_client):
    """The estimate of the resident state against the size of the blocks the workers hold."""
    from dmice import api

    df = _base(20_000)
    df["c"] = pd.Categorical(np.random.default_rng(1).choice(list("abcd"), len(df)))
    df.loc[::3, "x"] = np.nan
    df.loc[::4, "c"] = None
    m = 40
    imp = dmice.impute(df, m=m, max_iter=1, seed=2)
    est = api.resident_bytes(imp.schema, m, imp._engine.plan.n_cols)
    blocks = cluster_client.gather(imp._engine.blocks)
    real = sum(_block_bytes(b) for b in blocks)
    assert 0.8 < est["total"] / real < 1.25, (est["total"], real)


def _block_bytes(b) -> int:
    seen: set[int] = set()
    total = 0

    def add(a):
        nonlocal total
        if isinstance(a, np.ndarray) and id(a) not in seen:
            seen.add(id(a))
            total += a.nbytes
        elif isinstance(a, dict):
            for v in a.values():
                add(v)
        elif isinstance(a, tuple):
            for v in a:
                add(v)

    for f in ("D0", "values", "mis", "obs", "mis_pos", "pool", "pairs", "imp", "cache"):
        add(getattr(b, f))
    return total


def test_screening_drops_overflowed_columns_instead_of_failing():
    """A Gram matrix with overflowed entries no longer stops the eigen-decomposition of predictor
    screening (LinAlgError); the column is dropped as "not finite"."""
    from dmice.predictors import screen

    g = np.random.default_rng(0)
    X = np.c_[np.ones(50), g.normal(size=(50, 3))]
    A = X.T @ X
    A[2, :] = A[:, 2] = np.inf
    drop, why = screen(A, np.ones(4, dtype=bool))
    assert drop == [2] and why == ["not finite"]


def test_the_state_estimate_is_in_the_log_and_the_repr(cluster_client, caplog):
    """The estimate of the state on the workers (what the refusal compares with the workers'
    memory) is logged when the run starts and shown in the result's repr."""
    import logging

    from dask.utils import format_bytes

    from dmice import api

    df = _base(5_000)
    df.loc[::3, "x"] = np.nan
    with caplog.at_level(logging.INFO, logger="dmice"):
        imp = dmice.impute(df, m=3, max_iter=1, seed=2)
    est = api.resident_bytes(imp.schema, 3, imp._engine.plan.n_cols)
    busiest = max(est["peak"])
    assert any("state takes an estimated" in r.getMessage() for r in caplog.records)
    assert f"about {format_bytes(busiest)} at peak on the busiest of" in repr(imp)
    imp.close()
