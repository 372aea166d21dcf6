"""Congenial imputation models: by=, predictor sets, where/ignore, post-processing and delta shifts.

Statistical checks use simulated data with known truth; their tolerances come from the pooled
standard errors (Rubin's rules, dmice.pool over per-imputation statsmodels OLS fits).
"""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.special import expit

import dmice
from dmice.errors import InputError


def _pooled_ols(imp, terms):
    """Pooled OLS of ``y`` on ``terms`` (column names, or pairs for products) over all imputations."""
    long = imp.complete("long").compute()
    est, var = [], []
    for k in range(1, imp.m + 1):
        d = long[long["imputation"] == k]
        cols = [d[t].to_numpy(float) if isinstance(t, str) else d[t[0]].to_numpy(float) * d[t[1]].to_numpy(float)
                for t in terms]
        fit = sm.OLS(d["y"].to_numpy(float), sm.add_constant(np.column_stack(cols))).fit()
        est.append(fit.params)
        var.append(fit.bse ** 2)
    res = dmice.pool(np.array(est), np.array(var), dfcom=fit.df_resid).summary()
    return res["estimate"].to_numpy(), res["std_error"].to_numpy()


# ---------------------------------------------------------------------------
# by=: an interaction with a binary moderator

B_INT = np.array([0.5, 1.0, 0.5, 1.0])  # y ~ 1 + x + z + x:z


def _interaction_data(n=3000, seed=2):
    g = np.random.default_rng(seed)
    z = (g.random(n) < 0.5).astype(np.int64)
    x = g.normal(size=n)
    y = B_INT[0] + B_INT[1] * x + B_INT[2] * z + B_INT[3] * x * z + g.normal(size=n)
    df = pd.DataFrame({"x": x, "z": z, "y": y})
    df.loc[g.random(n) < expit(1.0 * (y - 0.75) - 0.5 * z), "x"] = np.nan  # MAR given (y, z)
    return df


@pytest.mark.slow
def test_by_moderator_recovers_interaction_main_effects_model_does_not(cluster_client):
    df = _interaction_data()
    ddf = dd.from_pandas(df, npartitions=2)
    terms = ["x", "z", ("x", "z")]
    # norm: pmm's donors are sparse where the MAR mechanism removed most observed x.  x is the
    # only incomplete column, so its model never sees imputed values: one iteration is exact
    flat = dmice.impute(ddf, m=20, max_iter=1, seed=7, method={"x": "norm"})
    est0, se0 = _pooled_ols(flat, terms)
    strat = dmice.impute(ddf, m=20, max_iter=1, seed=7, method={"x": "norm"}, by="z")
    est1, se1 = _pooled_ols(strat, terms)
    # imputing x from y and z without their interaction pulls the interaction toward zero
    assert (B_INT[3] - est0[3]) / se0[3] > 3, (est0, se0)
    # separate models per level of z are the congenial model: every coefficient within 3 SE
    assert np.all(np.abs(est1 - B_INT) / se1 < 3), (est1, se1)
    # the grouping column is not a predictor of the per-group models (constant within a group)
    zc = strat.schema["z"].cols[0]
    for model in strat._engine.models[0].models.values():
        assert zc not in model.xcols


def test_by_imputes_each_group_from_its_own_model(cluster_client):
    # x has opposite slopes on y in the two groups; only per-group fits reproduce both
    g = np.random.default_rng(5)
    n = 2000
    arm = g.choice(["a", "b"], n)
    y = g.normal(size=n)
    x = np.where(arm == "a", 2.0, -2.0) * y + 0.3 * g.normal(size=n)
    df = pd.DataFrame({"x": x, "y": y, "arm": arm})
    miss = g.random(n) < 0.3
    df.loc[miss, "x"] = np.nan
    imp = dmice.impute(df, m=3, max_iter=1, seed=3, by="arm", method={"x": "norm"})
    for lev in ("a", "b"):
        # the slope of the group's observed rows, with its posterior sd, is what a draw centres on
        ref = sm.OLS(x[~miss & (arm == lev)], sm.add_constant(y[~miss & (arm == lev)])).fit()
        for k in (1, 2, 3):
            rows = miss & (arm == lev)
            fit = sm.OLS(imp.complete(k).compute()["x"][rows].to_numpy(), sm.add_constant(y[rows])).fit()
            tol = 4 * np.hypot(fit.bse[1], ref.bse[1])
            assert abs(fit.params[1] - ref.params[1]) < tol, (lev, fit.params, ref.params)
            assert abs(fit.params[1]) > 1.5  # a pooled model would give a slope near 0


def test_by_group_fits_equal_statsmodels_per_group(cluster_client):
    # linear (x) and logistic (e) models fitted within each level of arm equal statsmodels on
    # that level's observed rows; only x and e are incomplete and neither predicts the other here
    g = np.random.default_rng(8)
    n = 3000
    arm = g.choice(["a", "b", "c"], n)
    y = g.normal(size=n)
    slope = np.select([arm == "a", arm == "b"], [1.0, -1.0], 0.3)
    x = slope * y + g.normal(size=n)
    e = (g.random(n) < expit(slope * y)).astype(float)
    df = pd.DataFrame({"x": x, "e": e, "y": y, "arm": pd.Categorical(arm)})
    df.loc[g.random(n) < 0.3, "x"] = np.nan
    df.loc[g.random(n) < 0.3, "e"] = np.nan
    imp = dmice.impute(df, m=2, max_iter=1, seed=1, by="arm", ridge=0.0,
                       predictors={"x": ["y"], "e": ["y"]})
    s = imp.schema
    vy, vx = s["y"], s["x"]
    models = imp._engine.models
    for k, lev in enumerate(["a", "b", "c"]):
        rows = (arm == lev) & df["x"].notna().to_numpy()
        X = sm.add_constant((y[rows] - vy.center) / vy.scale)
        ref = sm.OLS((x[rows] - vx.center) / vx.scale, X).fit()
        for c in range(2):
            np.testing.assert_allclose(models[0].models[k]._fits[c].coef, ref.params, rtol=1e-8, atol=1e-10)
        rows = (arm == lev) & df["e"].notna().to_numpy()
        ref = sm.Logit(e[rows], sm.add_constant((y[rows] - vy.center) / vy.scale)).fit(disp=0)
        for c in range(2):
            assert np.all(np.abs(models[1].models[k].beta[c] - ref.params) < 0.1 * ref.bse), lev


@pytest.mark.parametrize("kwargs, match", [
    ({"by": "nope"}, "by must name a column"),
    ({"by": "w"}, "by column 'w' has 40 missing"),
    ({"by": "c"}, "by column 'c' .* must be categorical"),
    ({"by": "arm", "method": {"x": "sample"}}, "sample"),
])
def test_by_errors(cluster_client, kwargs, match):
    g = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"x": g.normal(size=n), "w": g.normal(size=n), "c": g.normal(size=n),
                       "arm": g.choice(["a", "b"], n)})
    df.loc[:39, "w"] = np.nan
    df.loc[50:70, "x"] = np.nan
    with pytest.raises(InputError, match=match):
        dmice.impute(df, m=1, max_iter=1, seed=1, **kwargs)


# ---------------------------------------------------------------------------
# predictor sets: leaving the outcome out attenuates its relation with the imputed covariate

B_OUT = np.array([1.0, 1.0, 0.5])  # y ~ 1 + x + w


@pytest.mark.slow
def test_outcome_left_out_of_imputation_model_biases_toward_null(cluster_client):
    g = np.random.default_rng(4)
    n = 1500
    w = g.normal(size=n)
    x = 0.5 * w + g.normal(size=n)
    y = B_OUT[0] + B_OUT[1] * x + B_OUT[2] * w + g.normal(size=n)
    df = pd.DataFrame({"x": x, "w": w, "y": y})
    df.loc[g.random(n) < expit(-0.5 + w), "x"] = np.nan  # MAR given w
    ddf = dd.from_pandas(df, npartitions=2)
    full = dmice.impute(ddf, m=20, max_iter=1, seed=9)  # x alone is incomplete: one iteration is exact
    est1, se1 = _pooled_ols(full, ["x", "w"])
    no_y = dmice.impute(ddf, m=20, max_iter=1, seed=9, predictors={"x": ["w"]})
    est0, se0 = _pooled_ols(no_y, ["x", "w"])
    assert np.all(np.abs(est1 - B_OUT) / se1 < 3), (est1, se1)
    assert (B_OUT[1] - est0[1]) / se0[1] > 3, (est0, se0)
    assert 0 < est0[1] < B_OUT[1]
    xc = no_y.schema["x"].cols[0]
    assert list(no_y._engine.models[0].xcols) == [0, no_y.schema["w"].cols[0]] and xc not in \
        no_y._engine.models[0].xcols


# ---------------------------------------------------------------------------
# where= and ignore=


def _xyz(n=1200, seed=0):
    g = np.random.default_rng(seed)
    z = g.normal(size=n)
    y = g.normal(size=n)
    x = 1 + z - 0.5 * y + g.normal(size=n)
    df = pd.DataFrame({"x": x, "y": y, "z": z})
    df.loc[g.random(n) < 0.3, "x"] = np.nan
    return df


def test_where_over_imputes_marked_cells_and_keeps_them_out_of_the_fit(cluster_client):
    df = _xyz()
    g = np.random.default_rng(1)
    over = df["x"].notna().to_numpy() & (g.random(len(df)) < 0.1)
    where = {"x": over, "y": np.zeros(len(df), dtype=bool)}
    a = dmice.impute(dd.from_pandas(df, npartitions=3), m=2, max_iter=2, seed=4, where=where)
    # other values in the marked cells: they are not used, so the run is identical
    df2 = df.copy()
    df2.loc[over, "x"] = df2.loc[over, "x"] + 100.0
    b = dmice.impute(dd.from_pandas(df2, npartitions=3), m=2, max_iter=2, seed=4,
                     where=pd.DataFrame(where))
    # where as a dask frame with the data's partitions
    c = dmice.impute(dd.from_pandas(df, npartitions=3), m=2, max_iter=2, seed=4,
                     where=dd.from_pandas(pd.DataFrame(where), npartitions=3))
    miss = df["x"].isna().to_numpy()
    for k in (1, 2):
        ca, cb = a.complete(k).compute(), b.complete(k).compute()
        np.testing.assert_array_equal(ca["x"].to_numpy(), cb["x"].to_numpy())
        np.testing.assert_array_equal(ca["x"].to_numpy(), c.complete(k).compute()["x"].to_numpy())
        keep = ~over & ~miss
        np.testing.assert_array_equal(ca["x"].to_numpy()[keep], df["x"].to_numpy()[keep])
        np.testing.assert_array_equal(ca[["y", "z"]].to_numpy(), df[["y", "z"]].to_numpy())
        assert np.mean(ca["x"].to_numpy()[over] != df["x"].to_numpy()[over]) > 0.9
        assert not ca["x"].isna().any()
    assert a.n_missing["x"] == int(miss.sum() + over.sum())


def test_ignored_rows_do_not_change_the_fitted_models(cluster_client):
    df = _xyz(seed=3)
    n = len(df)
    ignore = np.arange(n) < 400
    g = np.random.default_rng(2)
    # the ignored rows get other predictor values: a permutation within them keeps each
    # column's mean and sd (the encoding) and breaks their relation with x
    df2 = df.copy()
    for col in ("y", "z"):
        v = df2[col].to_numpy().copy()
        v[ignore] = g.permutation(v[ignore])
        df2[col] = v
    kw = dict(m=2, max_iter=2, seed=6, method={"x": "norm"}, ridge=0.0)
    a = dmice.impute(dd.from_pandas(df, npartitions=2), ignore=ignore, **kw)
    b = dmice.impute(dd.from_pandas(df2, npartitions=2), ignore=pd.Series(ignore), **kw)
    c = dmice.impute(dd.from_pandas(df2, npartitions=2), **kw)
    rows = df["x"].isna().to_numpy() & ~ignore
    for k in (1, 2):
        xa, xb, xc = (r.complete(k).compute()["x"].to_numpy()[rows] for r in (a, b, c))
        np.testing.assert_allclose(xa, xb, rtol=1e-9, atol=1e-9)
        assert np.max(np.abs(xa - xc)) > 1e-3  # without ignore, those rows change the fit
    assert not a.complete(1).compute()["x"].isna().any()  # ignored rows are still imputed


def test_marker_columns_name_where_and_ignore(cluster_client):
    """where and ignore given as boolean columns of the data: the same masks as arrays, the
    marker columns no predictor of any model (the default predictors equal an explicit list
    without them) and kept unchanged in the completed data."""
    df = _xyz(seed=7)
    n = len(df)
    g = np.random.default_rng(3)
    over = df["x"].notna().to_numpy() & (g.random(n) < 0.1)
    hold = np.arange(n) % 5 == 0
    df["recheck"], df["holdout"] = over, pd.array(hold, dtype="boolean")
    ddf = dd.from_pandas(df, npartitions=3)
    kw = dict(m=2, max_iter=2, seed=4, method={"x": "norm"}, ridge=0.0)
    named = dmice.impute(ddf, where={"x": "recheck"}, ignore="holdout", **kw)
    listed = dmice.impute(ddf, where={"x": over}, ignore=hold, predictors={"x": ["y", "z"]}, **kw)
    marker_cols = {named.schema[c].cols[0] for c in ("recheck", "holdout")}
    assert not marker_cols & set(np.asarray(named._engine.models[0].xcols).tolist())
    for k in (1, 2):
        a, b = named.complete(k).compute(), listed.complete(k).compute()
        np.testing.assert_array_equal(a["x"].to_numpy(), b["x"].to_numpy())
        assert a["recheck"].tolist() == over.tolist() and a["holdout"].tolist() == hold.tolist()
        assert np.mean(a["x"].to_numpy()[over] != df["x"].to_numpy()[over]) > 0.9
    assert named.n_missing["x"] == int(df["x"].isna().sum() + over.sum())
    bad = df.assign(holdout=pd.array(np.where(hold, True, None), dtype="boolean"))
    with pytest.raises(InputError, match="marker column 'holdout' has missing values"):
        dmice.impute(dd.from_pandas(bad, npartitions=3), ignore="holdout", **kw)
    with pytest.raises(InputError, match="column 'y' of dtype float64; a marker column must be boolean"):
        dmice.impute(ddf, where={"x": "y"}, **kw)
    with pytest.raises(InputError, match="unknown column 'nope'"):
        dmice.impute(ddf, ignore="nope", **kw)


@pytest.mark.parametrize("kwargs, match", [
    ({"where": {"nope": np.zeros(200, bool)}}, "where names unknown columns"),
    ({"where": {"x": np.zeros(10, bool)}}, "where\\['x'\\] has 10 rows"),
    ({"where": {"x": np.zeros(200)}}, "must be a 1-d boolean"),
    ({"where": {"y": np.arange(200) < 9}, "method": {"y": ""}}, "column 'y', which is not imputed"),
    ({"ignore": np.zeros(5, bool)}, "ignore has 5 rows"),
    ({"post": {"x": 3}}, "post for column 'x' must be a function"),
    ({"post": {"y": dmice.squeeze(0, 1)}}, "needs an imputed continuous column"),
    ({"delta": {"x": "a"}}, "delta for column 'x' must be a finite number"),
])
def test_where_ignore_post_errors(cluster_client, kwargs, match):
    g = np.random.default_rng(0)
    df = pd.DataFrame({"x": g.normal(size=200), "y": g.normal(size=200)})
    df.loc[:20, "x"] = np.nan
    with pytest.raises(InputError, match=match):
        dmice.impute(df, m=1, max_iter=1, seed=1, **kwargs)


# ---------------------------------------------------------------------------
# post-processing and delta adjustment


def test_squeeze_and_round_to_bound_the_imputed_values(cluster_client):
    df = _xyz(seed=5)
    df["w"] = 3 * df["z"] + np.random.default_rng(8).normal(size=len(df))
    df.loc[df.index[::4], "w"] = np.nan
    imp = dmice.impute(df, m=3, max_iter=2, seed=2, method={"x": "norm", "w": "norm"},
                       post={"x": dmice.squeeze(0.0, 1.5), "w": [dmice.round_to(0.5)]})
    mx, mw = df["x"].isna().to_numpy(), df["w"].isna().to_numpy()
    for k in (1, 2, 3):
        d = imp.complete(k).compute()
        x, w = d["x"].to_numpy()[mx], d["w"].to_numpy()[mw]
        assert x.min() >= 0.0 and x.max() <= 1.5
        assert np.mean(x == 0.0) > 0.05 and np.mean(x == 1.5) > 0.05  # the bounds were active
        np.testing.assert_array_equal(w * 2, np.round(w * 2))
        np.testing.assert_array_equal(d["x"].to_numpy()[~mx], df["x"].to_numpy()[~mx])
        np.testing.assert_array_equal(d["w"].to_numpy()[~mw], df["w"].to_numpy()[~mw])
    # the chain statistics see the post-processed values
    cs = imp.chain_stats
    last = cs[(cs.variable == "x") & (cs.iteration == 2) & (cs.chain == 1)].iloc[0]
    assert last["mean"] == pytest.approx(imp.complete(1).compute()["x"].to_numpy()[mx].mean(), rel=1e-12)


@pytest.mark.parametrize("method", ["pmm", "norm"])
def test_delta_shifts_the_imputed_values_exactly(cluster_client, method):
    # x is the only incomplete column: its model is fitted on observed rows only, so with
    # the same seed the draws are the same and every imputed value moves by delta
    df = _xyz(seed=6)
    kw = dict(m=2, max_iter=2, seed=3, method={"x": method})
    a = dmice.impute(df, **kw)
    b = dmice.impute(df, delta={"x": 5.0}, **kw)
    miss = df["x"].isna().to_numpy()
    for k in (1, 2):
        xa = a.complete(k).compute()["x"].to_numpy()
        xb = b.complete(k).compute()["x"].to_numpy()
        np.testing.assert_allclose(xb[miss] - xa[miss], 5.0, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(xb[~miss], xa[~miss])


def test_delta_shifts_pooled_mean_within_se(cluster_client):
    # independent runs (other seeds) with and without delta: the pooled mean of x moves by
    # delta times the fraction imputed, within the Monte-Carlo error of the two runs
    g = np.random.default_rng(11)
    n = 1500
    z = g.normal(size=n)
    x = z + g.normal(size=n)
    y = x + z + g.normal(size=n)
    df = pd.DataFrame({"x": x, "y": y, "z": z})
    df.loc[g.random(n) < expit(-1 + z), "x"] = np.nan
    frac = df["x"].isna().mean()
    delta = 2.0
    kw = dict(m=20, max_iter=1)
    a = dmice.impute(df, seed=1, **kw)
    b = dmice.impute(df, seed=2, delta={"x": delta}, **kw)
    means = []
    for r in (a, b):
        long = r.complete("long").compute()
        means.append(long.groupby("imputation")["x"].mean().to_numpy())
    diff = means[1].mean() - means[0].mean()
    se = np.sqrt(means[0].var(ddof=1) / 20 + means[1].var(ddof=1) / 20)
    assert abs(diff - delta * frac) < 4 * se, (diff, delta * frac, se)
