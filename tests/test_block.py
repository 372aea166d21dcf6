"""The per-partition kernels: the structured Gram/predictor computations equal dense ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import mixed_frame

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
    return B.design(blk, plan, np.arange(blk.n), np.arange(plan.n_cols))


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
