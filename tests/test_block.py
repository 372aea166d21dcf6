"""The per-partition kernels: the structured Gram/predictor computations equal dense ones."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from conftest import chain_design_stack, encoded_blocks, mixed_frame

from dmice import block as B
from dmice import schema as S


def _block(m=3, n=2000, seed=1):
    df = mixed_frame(n, seed=seed)
    variables = S.combine_summaries([S.summarize_partition(df)], df.dtypes)
    S.assign_methods(variables, None)
    Q = S.layout(variables)
    plan = B.Plan(tuple(variables), Q, m, 5, {j: 1.0 for j, v in enumerate(variables) if v.imputed})
    blk = B.encode_partition(df, plan, 0)
    blk = B.init_fill(blk, plan, B.sample_values(blk))
    return df, plan, blk


def _dense(plan, blk):
    return chain_design_stack(blk, plan, np.arange(blk.n), np.arange(plan.n_cols))


def test_design_fills_encoded_imputed_cells():
    df, plan, blk = _block()
    X = _dense(plan, blk)
    assert X.shape == (plan.m, len(df), plan.n_cols)
    assert np.all(X[:, :, 0] == 1.0)
    v = plan.variables[0]  # x, continuous
    j = 0
    for c in range(plan.m):
        np.testing.assert_allclose(X[c, blk.mis[j], v.cols[0]], (blk.imp[j][c] - v.center) / v.scale)
        np.testing.assert_allclose(X[c, blk.obs[j], v.cols[0]],
                                   (df["x"].to_numpy()[blk.obs[j]] - v.center) / v.scale)
    # nominal: one-hot without the reference level, exactly one or zero ones per row
    cat = plan.variables[3]
    oh = X[:, :, cat.cols[0]:cat.cols[1]]
    assert set(np.unique(oh.sum(axis=2))) <= {0.0, 1.0}


def test_weighted_gram_equals_dense():
    _, plan, blk = _block()
    X = _dense(plan, blk)
    W = np.random.default_rng(3).random(blk.n)
    G = B.weighted_gram(blk, plan, W, B.imputed_parts(blk, plan))
    for c in range(plan.m):
        np.testing.assert_allclose(G[c], (X[c] * W[:, None]).T @ X[c], rtol=1e-10, atol=1e-8)


def test_linear_predictor_equals_dense():
    _, plan, blk = _block()
    X = _dense(plan, blk)
    g = np.random.default_rng(4)
    Bc = g.normal(size=(plan.m, plan.n_cols))
    eta = B.linear_predictor(blk, plan, Bc, np.arange(blk.n))
    rows = np.sort(g.choice(blk.n, 300, replace=False))
    eta_rows = B.linear_predictor(blk, plan, Bc, rows)
    for c in range(plan.m):
        np.testing.assert_allclose(eta[c], X[c] @ Bc[c], rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(eta_rows[c], X[c, rows] @ Bc[c], rtol=1e-12, atol=1e-10)


def _reference_design(plan, blk, rows, cols, c):
    """Chain c's design of ``rows`` x ``cols`` from each incomplete variable's current values
    (complete variables: their encoded columns, which no imputation touches)."""
    X = blk.D0[rows].copy()
    for k, v in enumerate(plan.variables):
        if v.width and k in blk.values:
            a, b = v.cols
            X[:, a:b] = B.encoded(v, B.current_values(blk, plan, k, rows, chain=c))
    return X[:, cols]


def test_chain_designs_fill_a_partly_kept_nominal_variable():
    _, plan, blk = _block()
    cat = plan.variables[3]
    assert cat.width >= 2 and len(blk.mis[3])
    # predictors without column 1 and without the nominal variable's first dummy
    cols = np.array([c for c in range(plan.n_cols) if c != 1 and c != cat.cols[0]])
    rows = np.arange(blk.n)
    for c, X in enumerate(B.chain_designs(blk, plan, rows, cols)):
        np.testing.assert_allclose(X, _reference_design(plan, blk, rows, cols, c), rtol=0, atol=1e-12)


def test_model_designs_follow_imputations_predictors_and_rows():
    """The cached designs of a model's statistics: each chain's design equals the reference
    after the imputations change, after the predictors change and for other rows."""
    _, plan, blk = _block()
    j = 1  # z, binary target
    v = plan.variables[j]
    cat = plan.variables[3]
    cols = np.array([c for c in range(plan.n_cols) if not (v.cols[0] <= c < v.cols[1])])

    def check(b, rows, cols):
        got = []
        for X in B.model_designs(b, plan, j, rows, cols):
            assert X.flags.f_contiguous
            got.append(X.copy())
        assert len(got) == plan.m
        for c, X in enumerate(got):
            np.testing.assert_array_equal(X, _reference_design(plan, b, rows, cols, c))

    rows = blk.obs[j]
    check(blk, rows, cols)
    assert ("mdesign", j, "obs") in blk.cache
    # a later round: new imputations of x and c (new arrays, as a visit makes), same cache
    g = np.random.default_rng(5)
    new = B.replace(blk, imp={**blk.imp, 0: g.normal(size=blk.imp[0].shape),
                              3: g.integers(0, cat.n_levels, blk.imp[3].shape).astype(float)})
    assert new.cache is blk.cache
    check(new, rows, cols)
    # screening dropped a predictor (the nominal variable's first dummy): the entry is replaced
    fewer = cols[cols != cat.cols[0]]
    check(new, rows, fewer)
    check(new, rows, cols)
    # other rows (a stratum's observed rows) under the same variable
    check(new, rows[::3], cols)
    # unsorted columns are served uncached
    check(new, rows, cols[::-1])


def test_model_designs_of_some_chains_and_of_the_missing_rows(monkeypatch):
    """``chains`` yields only those chains' designs, and the designs of a variable's missing
    rows (its imputation) are kept beside those of its fitting rows, below their own limit."""
    _, plan, blk = _block()
    j = 1
    v = plan.variables[j]
    cols = np.array([c for c in range(plan.n_cols) if not (v.cols[0] <= c < v.cols[1])])
    for key, rows in (("obs", blk.obs[j]), ("mis", blk.mis[j])):
        got = [X.copy() for X in B.model_designs(blk, plan, j, rows, cols, key, chains=[2, 0])]
        assert len(got) == 2
        for c, X in zip([2, 0], got):
            np.testing.assert_array_equal(X, _reference_design(plan, blk, rows, cols, c))
    assert ("mdesign", j, "obs") in blk.cache and ("mdesign", j, "mis") in blk.cache
    _, plan, blk = _block()
    plan = replace(plan, design_cache=(plan.design_cache[0], 1000))
    rows = blk.mis[j]
    for _ in range(2):  # built again each time, the same designs
        got = [X.copy() for X in B.model_designs(blk, plan, j, rows, cols, "mis")]
        for c, X in enumerate(got):
            np.testing.assert_array_equal(X, _reference_design(plan, blk, rows, cols, c))
    assert ("mdesign", j, "mis") not in blk.cache


def test_newton_statistics_of_some_chains_are_those_chains_statistics():
    """A request naming chains gets exactly those chains' rows of the full statistics."""
    _, plan, blk = _block()
    j = 1  # binary target: logistic statistics
    v = plan.variables[j]
    xcols = np.array([c for c in range(plan.n_cols) if not (v.cols[0] <= c < v.cols[1])])
    beta = np.random.default_rng(3).normal(scale=0.1, size=(plan.m, len(xcols)))
    req = {"var": j, "stat": "logistic", "xcols": xcols, "beta": beta}
    full = B.model_stats(blk, plan, req)["sum"]
    some = B.model_stats(blk, plan, {**req, "chains": np.array([2, 0])})["sum"]
    for key in ("g", "H"):
        np.testing.assert_array_equal(some[key], full[key][[2, 0]])
    assert some["n"] == full["n"]


def test_model_designs_beyond_the_cache_limit_are_built_each_time(monkeypatch):
    """A design larger than dmice.design-cache.observed is not kept (and drops a kept entry of its
    variable), with the same designs as the reference."""
    _, plan, blk = _block()
    j = 1
    v = plan.variables[j]
    cat = plan.variables[3]
    cols = np.array([c for c in range(plan.n_cols) if not (v.cols[0] <= c < v.cols[1])])
    rows = blk.obs[j]

    def check(cols):
        got = [X.copy(order="F") for X in B.model_designs(blk, plan, j, rows, cols)]
        assert len(got) == plan.m
        for c in range(plan.m):
            np.testing.assert_array_equal(got[c], _reference_design(plan, blk, rows, cols, c))

    plan = replace(plan, design_cache=(1000, plan.design_cache[1]))
    check(cols)
    check(cols)
    assert ("mdesign", j, "obs") not in blk.cache
    plan = replace(plan, design_cache=(1 << 30, plan.design_cache[1]))
    check(cols)
    assert ("mdesign", j, "obs") in blk.cache
    plan = replace(plan, design_cache=(1000, plan.design_cache[1]))
    check(cols[cols != cat.cols[0]])
    assert ("mdesign", j, "obs") not in blk.cache


def test_donor_cells_complete_the_kept_design_over_partitions():
    """pmm donors: the fixed design the client keeps plus the cells of each round give every
    chain's donor design, rows of all partitions in order."""
    _, plan, blocks, _ = encoded_blocks(mixed_frame(3001, seed=1), m=3, parts=3)
    j = 0  # continuous target
    v = plan.variables[j]
    cat = plan.variables[3]
    xcols = np.array([c for c in range(plan.n_cols) if not (v.cols[0] <= c < v.cols[1]) and c != cat.cols[0]])
    req = {"var": j, "stat": "gram", "xcols": xcols, "pool": "base"}
    res = B.combine([B.model_stats(b, plan, req) for b in blocks])["cat"]
    cells = B.combine([B.model_stats(b, plan, dict(req, pool="cells")) for b in blocks])["cat"]
    assert "pool_D" not in cells and "pool_y" not in cells
    for key in ("pool_fr", "pool_fc", "pool_fv"):
        np.testing.assert_array_equal(cells[key], res[key])
    ref = [np.concatenate([_reference_design(plan, b, b.obs[j][b.pool[j]], xcols, c) for b in blocks])
           for c in range(plan.m)]
    assert len(res["pool_fr"]) and res["pool_D"].shape == ref[0].shape
    for c in range(plan.m):
        X = res["pool_D"].copy()
        X[res["pool_fr"], res["pool_fc"]] = res["pool_fv"][c]
        np.testing.assert_allclose(X, ref[c], rtol=0, atol=1e-12)
    y = np.concatenate([b.values[j][b.obs[j][b.pool[j]]] for b in blocks])
    np.testing.assert_array_equal(res["pool_y"], y)


def test_match_picks_among_the_nearest_donors():
    g = np.random.default_rng(0)
    donor_yhat = np.sort(g.normal(size=200))
    donor_y = np.arange(200.0)  # the donor's own index, to see which was chosen
    targets = g.normal(size=500) * 1.5
    picked = B._match(targets, donor_yhat, donor_y, 5, np.random.default_rng(1)).astype(int)
    for t, p in zip(targets, picked):
        nearest = np.argsort(np.abs(donor_yhat - t), kind="stable")[:5]
        assert p in nearest
    # every one of the 5 nearest is used for a fixed target
    many = B._match(np.full(5000, 0.1), donor_yhat, donor_y, 5, np.random.default_rng(2))
    assert len(np.unique(many)) == 5


def test_codes_round_trip_for_each_kind():
    df = pd.DataFrame({
        "obj_bool": pd.Series([True, None, False, True], dtype=object),
        "num01": [1.0, 0.0, np.nan, 1.0],
        "strs": pd.Series(["b", "a", None, "c"], dtype=object),
        "cat": pd.Categorical(["x", None, "y", "x"], categories=["never", "x", "y"]),
    })
    variables = S.combine_summaries([S.summarize_partition(df)], df.dtypes)
    kinds = {v.name: (v.kind, v.levels) for v in variables}
    assert kinds == {"obj_bool": ("binary", [False, True]), "num01": ("binary", [0, 1]),
                     "strs": ("nominal", ["a", "b", "c"]), "cat": ("binary", ["x", "y"])}
    for v in variables:
        codes = S.to_codes(df[v.name], v)
        back = S.from_codes(codes[~np.isnan(codes)], v, df[v.name])
        assert list(back) == list(df[v.name].dropna()), v.name
        assert back.dtype == df[v.name].dtype
