"""Predictor sets, quickpred (against R mice golden values) and the screening of collinear predictors."""

from __future__ import annotations

import json
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dmice
from dmice import predictors as P
from dmice.errors import InputError
from dmice.schema import combine_summaries, summarize_partition

FIX = Path(__file__).parent / "fixtures"


def _qp_data():
    df = pd.read_csv(FIX / "quickpred_data.csv")
    df["c"] = df["c"].astype("str")  # pandas reads the empty cells as missing
    return df


@pytest.fixture(scope="module")
def golden():
    return json.loads((FIX / "quickpred_golden.json").read_text())


def test_quickpred_statistics_equal_r(golden):
    df = _qp_data()
    parts = [df.iloc[:97], df.iloc[97:210], df.iloc[210:]]
    variables = combine_summaries([summarize_partition(p) for p in parts], df.dtypes)
    pieces = [P.quickpred_partition(p, variables) for p in parts]
    s = {k: sum(p[k] for p in pieces) for k in pieces[0]}
    v, u, puc = P.quickpred_statistics(s)
    np.testing.assert_allclose(v, np.array(golden["v"]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(u, np.array(golden["u"]), rtol=1e-10, atol=1e-12)
    want = np.array([[np.nan if x == "NaN" else x for x in row] for row in golden["puc"]], dtype=float)
    np.testing.assert_allclose(puc, want, rtol=1e-12)
    names = list(df.columns)
    for case in golden["cases"]:
        pm = P.quickpred_matrix(s, names, mincor=case["mincor"][0], minpuc=case["minpuc"][0],
                                include=case["include"], exclude=case["exclude"])
        np.testing.assert_array_equal(pm.to_numpy(), np.array(case["matrix"]), err_msg=str(case))


def test_quickpred_equals_r_mice(cluster_client, golden):
    df = _qp_data()
    ddf = dd.from_pandas(df, npartitions=3)
    for case in (golden["cases"][0], golden["cases"][4]):  # all cases are checked above from the sums
        pm = dmice.quickpred(ddf, mincor=case["mincor"][0], minpuc=case["minpuc"][0],
                             include=case["include"], exclude=case["exclude"])
        assert list(pm.index) == case["names"] and list(pm.columns) == case["names"]
        np.testing.assert_array_equal(pm.to_numpy(), np.array(case["matrix"]), err_msg=str(case))


def test_quickpred_errors(cluster_client):
    df = _qp_data()
    with pytest.raises(InputError, match="include names unknown columns"):
        dmice.quickpred(df, include=["zz"])
    with pytest.raises(InputError, match="method must be 'pearson'"):
        dmice.quickpred(df, method="spearman")
    with pytest.raises(InputError, match="mincor"):
        dmice.quickpred(df, mincor=2)


def _frame(n=800, seed=0):
    g = np.random.default_rng(seed)
    z = g.normal(size=n)
    w = g.normal(size=n)
    y = g.normal(size=n)
    x = 1 + z + 0.5 * w - 0.5 * y + g.normal(size=n)
    df = pd.DataFrame({"x": x, "y": y, "z": z, "w": w})
    df.loc[g.random(n) < 0.3, "x"] = np.nan
    return df


def test_predictor_sets_map_to_design_columns_and_ignore_other_columns(cluster_client):
    df = _frame()
    # x predicted by z only: the values of y and w cannot matter
    a = dmice.impute(df, m=2, max_iter=1, seed=2, predictors={"x": ["z"]})
    df2 = df.assign(y=df["y"][::-1].to_numpy(), w=0.0)
    b = dmice.impute(df2, m=2, max_iter=1, seed=2, predictors={"x": ["z"]})
    # the same set as a predictor matrix
    pm = pd.DataFrame(0, index=df.columns, columns=df.columns)
    pm.loc["x", "z"] = 1
    c = dmice.impute(df, m=2, max_iter=1, seed=2, predictors=pm)
    for k in (1, 2):
        xa, xb, xc = (r.complete(k).compute()["x"].to_numpy() for r in (a, b, c))
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(xa, xc)
    s = a.schema
    assert list(a._engine.models[0].xcols) == [0, s["z"].cols[0]]
    full = dmice.impute(df, m=2, max_iter=1, seed=2)
    assert list(full._engine.models[0].xcols) == [0] + [s[c].cols[0] for c in ("y", "z", "w")]


@pytest.mark.parametrize("predictors, match", [
    ({"nope": ["z"]}, "unknown column 'nope' as a target"),
    ({"x": ["z", "nope"]}, r"predictors\['x'\] names unknown columns \['nope'\]"),
    ({"x": ["x", "z"]}, "lists 'x' itself"),
    ({"x": "z"}, "must be a list of column names"),
    (pd.DataFrame([[0, 2]], index=["x"], columns=["x", "z"]), "0 and 1 only"),
    (pd.DataFrame([[0, 1]], index=["x"], columns=["x", "q"]), "unknown columns: \\['q'\\]"),
    (["x"], "predictors must be a dict"),
])
def test_predictor_errors(cluster_client, predictors, match):
    with pytest.raises(InputError, match=match):
        dmice.impute(_frame(200), m=1, max_iter=1, seed=1, predictors=predictors)


def test_unusable_requested_predictor_is_logged(cluster_client):
    df = _frame(300)
    df["u"] = df["z"]
    df.loc[:9, "u"] = np.nan
    imp = dmice.impute(df, m=1, max_iter=1, seed=1, method={"u": ""}, predictors={"x": ["z", "u"]})
    ev = imp.logged_events
    assert ((ev.variable == "x") & ev.event.str.contains("predictor 'u' not used")).any()


def test_screen_finds_constant_and_collinear_columns():
    g = np.random.default_rng(0)
    n = 500
    a, b, c = g.normal(size=(3, n))
    X = np.column_stack([np.ones(n), a, np.full(n, 2.0), b, a + b, c, 3 * c + 1e-4 * g.normal(size=n)])
    drop, why = P.screen(X.T @ X, np.ones(X.shape[1], bool))
    assert why.count("constant") == 1 and drop[why.index("constant")] == 2
    kept = [i for i in range(X.shape[1]) if i not in drop]
    assert len(drop) == 3 and 0 in kept
    assert any(i in drop for i in (1, 3, 4)) and any(i in drop for i in (5, 6))
    Xk = X[:, kept]
    assert np.linalg.matrix_rank(Xk) == Xk.shape[1]
    # rank of what was dropped is redundant: adding any dropped column back does not raise the rank
    for i in drop:
        if i != 2:
            assert np.linalg.svd(np.column_stack([Xk, X[:, i]]), compute_uv=False)[-1] < 1e-2 * np.sqrt(n)
    # the target rule: a copy of y is dropped as "correlated with the target"
    y = 2 * a + g.normal(size=n)
    Xy = np.column_stack([np.ones(n), b, y + 1e-3 * g.normal(size=n)])
    A = Xy.T @ Xy
    drop, why = P.screen(A, np.ones(3, bool), y=np.append(Xy.T @ y, y @ y))
    assert drop == [2] and why == ["correlated with the target"]


def test_constant_and_duplicate_predictors_dropped_and_logged(cluster_client):
    df = _frame(1000)
    df["z_copy"] = df["z"]
    df["one"] = 1.0
    df["e"] = (np.random.default_rng(3).random(len(df)) < 0.5).astype(float)
    df.loc[df.index[::5], "e"] = np.nan
    imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=2, max_iter=2, seed=3)
    ev = imp.logged_events
    assert not ev.event.str.contains("ridge fallback").any()
    for j, model in imp._engine.models.items():
        name = imp.schema.variables[j].name
        mine = ev[(ev.variable == name) & ev.event.str.contains("dropped")]
        logged = sorted(s.split("'")[1] for s in mine.event)
        assert logged == sorted(model.dropped)
        assert "one" in logged and len({"z", "z_copy"} & set(logged)) == 1
        kept = {P.column_labels(imp.schema.variables, imp.schema.n_cols_encoded)[c] for c in model.xcols}
        assert not kept & set(logged)
