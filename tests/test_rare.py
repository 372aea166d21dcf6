"""Rare categories and separation: polr, poisson, Firth, collapsing, shrinkage.

Model fits run through the worker kernels (dmice.block, dmice.glm.kernels) and the client Newton code
(dmice.methods) on in-memory partitions and are checked against statsmodels or a direct
single-machine implementation on the same design; the end-to-end tests run dmice.impute on the
real cluster.
"""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from conftest import chain_design_stack, encoded_blocks, fit_target
from scipy.special import expit
from statsmodels.miscmodels.ordinal_model import OrderedModel

import dmice
from dmice import block as B
from dmice import schema as S


def _fit(df, target, method=None, m=1, parts=1, setup=None, **kw):
    """:func:`conftest.fit_target`, returning the model, the design of the fitting rows (chain 1)
    and the logged events."""
    model, plan, blocks, xcols, events = fit_target(df, target, method, m=m, parts=parts, setup=setup, **kw)
    j = model.j
    X = np.concatenate([chain_design_stack(b, plan, b.obs[j], xcols)[0] for b in blocks])
    return model, X, events


def _data(n=3000, seed=0):
    g = np.random.default_rng(seed)
    x1 = g.normal(10, 3, n)
    x2 = (g.random(n) < 0.4).astype(float)
    c = g.choice(3, n, p=[0.5, 0.3, 0.2])
    ystar = 0.3 * (x1 - 10) - 0.8 * x2 + 0.6 * (c == 1) + g.logistic(size=n)
    o = np.digitize(ystar, [-1.5, 0.0, 1.2])
    lam = np.exp(0.5 + 0.08 * (x1 - 10) + 0.4 * x2 - 0.3 * (c == 2))
    return pd.DataFrame({
        "x1": x1, "x2": x2, "cat": pd.Categorical(np.array(["a", "b", "c"])[c]),
        "o": pd.Categorical(np.array(["low", "mid", "high", "top"])[o],
                            categories=["low", "mid", "high", "top"], ordered=True),
        "cnt": g.poisson(lam).astype(np.int64),
    })


# ---------------------------------------------------------------------------
# polr


@pytest.mark.parametrize("parts", [3])
def test_polr_equals_statsmodels_ordered_model(parts):
    df = _data()
    miss = np.random.default_rng(1).random(len(df)) < 0.25
    df.loc[miss, "o"] = np.nan
    v_cnt = df["cnt"].astype(float)
    df["cnt"] = v_cnt
    model, X, events = _fit(df, "o", parts=parts, newton_tol=1e-10, newton_accuracy=0.0)
    assert model.method == "polr" and not events
    obs = df[~miss]
    Z = X[:, 1:]  # the encoded design without its intercept
    ref = OrderedModel(obs["o"].cat.codes.to_numpy(), Z, distr="logit").fit(
        method="newton", disp=0, tol=1e-12, maxiter=200)
    q = Z.shape[1]
    cuts = ref.model.transform_threshold_params(ref.params)[1:-1]
    est = model.beta[0]
    np.testing.assert_allclose(est[:3], cuts, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(est[3:], ref.params[:q], rtol=1e-6, atol=1e-7)
    # the slope block of the inverse information does not depend on how the cutpoints are parametrised
    cov = model._fits[0].cov[3:, 3:]
    np.testing.assert_allclose(cov, ref.cov_params()[:q, :q], rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------
# poisson


@pytest.mark.parametrize("parts", [1, 2])
def test_poisson_equals_statsmodels_glm(parts):
    df = _data()
    miss = np.random.default_rng(2).random(len(df)) < 0.3
    df["cnt"] = df["cnt"].astype("Int64")
    df.loc[miss, "cnt"] = pd.NA
    model, X, events = _fit(df, "cnt", method={"cnt": "poisson"}, parts=parts, newton_tol=1e-10,
                            newton_accuracy=0.0)
    assert not events
    y = df.loc[~miss, "cnt"].to_numpy(dtype=float)
    ref = sm.GLM(y, X, family=sm.families.Poisson()).fit(tol=1e-13)
    np.testing.assert_allclose(model.beta[0], ref.params, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(model._fits[0].cov, ref.cov_params(), rtol=1e-5)


def test_poisson_needs_non_negative_integers():
    df = _data(200)
    df["cnt"] = df["cnt"] - 3.0
    df.loc[:20, "cnt"] = np.nan
    with pytest.raises(dmice.errors.InputError, match="non-negative integer"):
        encoded_blocks(df, {"cnt": "poisson"})


# ---------------------------------------------------------------------------
# separation and Firth


def _firth_direct(X, y, tol=1e-12):
    """Single-machine Firth logistic regression: full hat matrix at the current estimate."""
    b = np.zeros(X.shape[1])
    for _ in range(5000):  # logistf's iteration; linear convergence, slow under complete separation
        p = expit(X @ b)
        w = p * (1 - p)
        info = X.T @ (X * w[:, None])
        inv = np.linalg.inv(info)
        Xw = X * np.sqrt(w)[:, None]
        h = np.einsum("ij,jk,ik->i", Xw, inv, Xw)  # diag of W^1/2 X I^-1 X' W^1/2
        step = inv @ (X.T @ (y - p + h * (0.5 - p)))
        b = b + step
        if np.max(np.abs(step)) < tol:
            break
    return b, inv


def _penalised_ll(b, X, y):
    eta = X @ b
    p = expit(eta)
    info = X.T @ (X * (p * (1 - p))[:, None])
    return float(np.sum(y * eta - np.logaddexp(0, eta)) + 0.5 * np.linalg.slogdet(info)[1])


def _separated(n=400, seed=4, quasi=False):
    g = np.random.default_rng(seed)
    x1 = g.normal(size=n)
    x2 = (g.random(n) < 0.5).astype(float)
    if quasi:  # level "r" of a 3-level predictor only ever has b = 0
        c = g.choice(3, n, p=[0.45, 0.45, 0.1])
        b = (g.random(n) < expit(0.3 + 0.8 * x1)).astype(float)
        b[c == 2] = 0.0
    else:  # x2 predicts b perfectly
        c = g.choice(3, n)
        b = x2.copy()
    df = pd.DataFrame({"x1": x1, "x2": x2, "c": pd.Categorical(np.array(["p", "q", "r"])[c]), "b": b})
    df.loc[g.random(n) < 0.2, "b"] = np.nan
    return df


@pytest.mark.parametrize("quasi", [False, True])
def test_separation_detected_and_firth_equals_direct_fit(quasi):
    df = _separated(quasi=quasi)
    model, X, events = _fit(df, "b", parts=2, newton_tol=1e-10, newton_accuracy=0.0)
    assert any("separation detected" in e["event"] and e["variable"] == "b" for e in events)
    assert model.method == "logreg.firth" and model.var.method == "logreg.firth"
    y = df["b"].dropna().to_numpy()
    ref, ref_inv = _firth_direct(X, y)
    np.testing.assert_allclose(model.beta[0], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model._fits[0].cov, ref_inv, rtol=1e-5, atol=1e-8)
    # and it maximises the penalised likelihood l(b) + log|I(b)|/2 (checked without any score formula)
    from scipy.optimize import minimize

    opt = minimize(lambda b: -_penalised_ll(b, X, y), np.zeros(X.shape[1]), method="BFGS",
                   options={"gtol": 1e-8})
    assert _penalised_ll(model.beta[0], X, y) >= -opt.fun - 1e-7
    assert np.all(np.abs(model.beta[0]) < 15)  # finite, unlike the diverging ML fit


def test_no_separation_on_ordinary_logistic_data():
    g = np.random.default_rng(8)
    n = 3000
    x1 = g.normal(size=n)
    b = (g.random(n) < expit(-0.5 + 1.5 * x1)).astype(float)
    df = pd.DataFrame({"x1": x1, "x2": g.normal(size=n), "b": b})
    df.loc[g.random(n) < 0.2, "b"] = np.nan
    model, X, events = _fit(df, "b", newton_tol=1e-10, newton_accuracy=0.0)
    assert not events and model.method == "logreg"
    ref = sm.Logit(df["b"].dropna().to_numpy(), X).fit(disp=0, tol=1e-12)
    np.testing.assert_allclose(model.beta[0], ref.params, rtol=1e-6)


def test_separation_ridge_and_error():
    df = _separated(quasi=True)
    model, X, events = _fit(df, "b", separation="ridge")
    assert model.method == "logreg" and any("ridge penalty" in e["event"] for e in events)
    # the ridge MAP: score minus penalty vanishes at the estimate
    y = df["b"].dropna().to_numpy()
    bhat = model.beta[0]
    grad = X.T @ (y - expit(X @ bhat)) - np.r_[0.0, np.ones(X.shape[1] - 1)] * bhat
    assert np.max(np.abs(grad)) < 0.2 * np.sqrt(len(y))  # the default rule stops within 0.2 SE
    with pytest.raises(dmice.errors.InputError, match="'b'.*separated"):
        _fit(df, "b", separation="error")


def test_firth_method_on_request():
    df = _data()
    df["b"] = (df["x2"] > 0).astype(float)
    df["b"] = np.where(np.random.default_rng(3).random(len(df)) < 0.1, 1 - df["b"], df["b"])
    df = df.drop(columns=["x2", "o"])
    df.loc[np.random.default_rng(4).random(len(df)) < 0.2, "b"] = np.nan
    model, X, events = _fit(df, "b", method={"b": "logreg.firth"}, newton_tol=1e-10, newton_accuracy=0.0)
    ref, _ = _firth_direct(X, df["b"].dropna().to_numpy())
    np.testing.assert_allclose(model.beta[0], ref, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------
# collapsing rare predictor levels


def _rare_level(n=100_000, seed=5, separated=False):
    g = np.random.default_rng(seed)
    icd = g.choice(["A", "B", "C"], n, p=[0.5, 0.3, 0.2]).astype(object)
    icd[g.choice(n, 5, replace=False)] = "R"  # 5 rows among 100,000
    x = g.normal(size=n)
    eff = pd.Series(icd).map({"A": 0.0, "B": 0.5, "C": -0.5, "R": 0.0}).to_numpy()
    b = (g.random(n) < expit(-0.5 + 0.7 * x + eff)).astype(float)
    r = np.nonzero(icd == "R")[0]
    b[r] = 0.0 if separated else np.array([1, 0, 1, 0, 0])
    df = pd.DataFrame({"x": x, "icd": pd.Categorical(icd), "b": b})
    df.loc[g.random(n) < 0.1, "b"] = np.nan
    return df


@pytest.mark.parametrize("min_level_count", [0, 10])
def test_rare_predictor_level_with_and_without_collapsing(min_level_count):
    df = _rare_level()
    # screen=False: the Newton fit on the full design (the default screening would drop the
    # 5-row dummy as near-constant, see the next test)
    model, X, events = _fit(df, "b", setup={"min_level_count": min_level_count}, newton_tol=1e-10,
                            newton_accuracy=0.0, screen=False)
    obs = df.dropna()
    icd = obs["icd"].astype(str)
    if min_level_count:
        # 5 rows < 10: an "other" group that is itself rare joins the reference level
        assert X.shape[1] == 4
        icd = icd.replace({"R": "A"})
    else:
        assert X.shape[1] == 5
    ref_X = sm.add_constant(np.column_stack([pd.get_dummies(icd, drop_first=True, dtype=float),
                                             obs["x"].to_numpy()]))
    ref = sm.Logit(obs["b"].to_numpy(), ref_X).fit(disp=0, tol=1e-12)
    # the encoded design orders columns x, icd dummies; compare fitted probabilities
    np.testing.assert_allclose(expit(X @ model.beta[0]), ref.predict(), rtol=1e-6, atol=1e-10)
    assert np.all(np.abs(model.beta[0]) < 5) and np.all(np.isfinite(model._fits[0].cov))


def test_rare_level_separating_the_target_stays_finite():
    df = _rare_level(separated=True)
    # without collapsing or screening, the 5 rows (all b = 0) separate: detected, refitted by Firth
    model, X, events = _fit(df, "b", setup={"min_level_count": 0}, screen=False)
    assert any("separation detected" in e["event"] for e in events)
    se = np.sqrt(np.diag(model._fits[0].cov))
    assert np.all(np.abs(model.beta[0]) < 10) and se.max() < 5
    # with collapsing there is nothing to separate
    model, X, events = _fit(df, "b", setup={"min_level_count": 10})
    assert model.method == "logreg" and not any("separation" in e["event"] for e in events)


def test_screening_drops_a_near_constant_rare_dummy_as_mice_does():
    # without collapsing, the default screening (mice's remove.lindep: variance below 1e-4)
    # drops the 5-row dummy before any fit, with a logged event; the fit then equals the
    # logistic regression without that column
    df = _rare_level(separated=True)
    model, X, events = _fit(df, "b", setup={"min_level_count": 0}, newton_tol=1e-10, newton_accuracy=0.0)
    assert len(model.xcols) == 4 and len(model.dropped) == 1
    assert any("dropped" in e["event"] for e in events)
    assert not any("separation" in e["event"] for e in events)
    obs = df.dropna()
    icd = obs["icd"].astype(str)
    keep = icd != "R"
    ref_X = sm.add_constant(np.column_stack([(icd == "B").astype(float), (icd == "C").astype(float),
                                             obs["x"].to_numpy()]))
    ref = sm.Logit(obs["b"].to_numpy(), ref_X).fit(disp=0, tol=1e-12)
    np.testing.assert_allclose(expit(X[:, model.xcols] @ model.beta[0])[keep.to_numpy()],
                               ref.predict()[keep.to_numpy()], rtol=1e-6, atol=1e-10)


def test_user_collapse_mapping_recorded_without_level_names_in_events():
    df = _rare_level(n=2000)
    variables = S.combine_summaries([S.summarize_partition(df)], df.dtypes)
    S.assign_methods(variables, None)
    events = S.collapse_levels(variables, 0, {"icd": {"C": "CR", "R": "CR"}})
    v = variables[1]
    assert v.collapse == {"C": "CR", "R": "CR"} and v.to_dict()["collapse"] == v.collapse
    assert v.groups == [0, 1, 2, 2]  # levels A, B, C, R
    assert S.layout(variables) == 1 + 1 + 2 + 1
    assert len(events) == 1 and not any(lev in events[0]["event"] for lev in ("CR", "\'R\'"))
    codes = np.array([0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(B.encoded(v, codes), [[0, 0], [1, 0], [0, 1], [0, 1]])
    with pytest.raises(dmice.errors.InputError, match="collapse.*'icd'"):
        S.collapse_levels(variables, 0, {"icd": {"nope": "x"}})
    with pytest.raises(dmice.errors.InputError, match="collapse names unknown column"):
        S.collapse_levels(variables, 0, {"zzz": {"A": "x"}})


# ---------------------------------------------------------------------------
# end to end on the cluster


def _mixed(n=4000, seed=9):
    g = np.random.default_rng(seed)
    df = _data(n, seed)
    df["cnt"] = df["cnt"].astype("Int64")
    # b is predicted perfectly by x2: separation, refitted by Firth
    df["b"] = df["x2"].astype(np.int64)
    icd = g.choice(["A", "B", "C"], n).astype(object)
    icd[:4] = "R"
    df["icd"] = icd
    for col, frac in (("o", 0.3), ("cnt", 0.3), ("b", 0.2)):
        df.loc[g.random(n) < frac, col] = None
    return df


def test_impute_end_to_end_polr_poisson_firth_collapse(cluster_client):
    df = _mixed()
    ddf = dd.from_pandas(df, npartitions=3)
    imp = dmice.impute(ddf, m=3, max_iter=2, seed=7, method={"cnt": "poisson"}, client=cluster_client)
    assert imp.method["o"] == "polr" and imp.method["cnt"] == "poisson"
    assert imp.method["b"] == "logreg.firth" and imp.method["icd"] == ""  # a complete predictor
    ev = imp.logged_events
    assert ((ev["variable"] == "b") & ev["event"].str.contains("separation detected")).any()
    assert ((ev["variable"] == "icd") & ev["event"].str.contains("collapsed")).any()
    # R (4 rows) is merged into the reference group; the manifest does not name a level seen fewer
    # than min_cell_count times (its collapse entry is left out, the level counted in other_levels)
    assert imp.schema["icd"].collapse == {"R": "A"}
    man = imp.manifest_dict([], 3)
    assert man["collapse"] == {}
    icd = next(v for v in man["variables"] if v["name"] == "icd")
    assert icd["levels"] == ["A", "B", "C"] and icd["other_levels"] == 1 and "collapse" not in icd
    obs_o = df["o"].value_counts(normalize=True).sort_index()
    miss_o = df["o"].isna().to_numpy()
    for k in range(1, 4):
        out = imp.complete(k).compute()
        assert dict(out.dtypes) == dict(ddf.dtypes)
        assert not out[["o", "cnt", "b"]].isna().any().any()
        assert list(out["o"].cat.categories) == ["low", "mid", "high", "top"] and out["o"].cat.ordered
        assert (out["cnt"] >= 0).all() and set(out["b"].unique()) <= {0, 1}
        # b = x2 exactly; Firth keeps that (imputations follow x2 almost always)
        agree = (out.loc[df["b"].isna(), "b"] == out.loc[df["b"].isna(), "x2"]).mean()
        assert agree > 0.95
        # polr under MCAR: imputed level proportions match the observed ones within sampling error
        imp_o = out.loc[miss_o, "o"].value_counts(normalize=True).sort_index()
        se = np.sqrt(obs_o * (1 - obs_o) / miss_o.sum())
        assert np.all(np.abs(imp_o - obs_o) < 4 * se + 0.01), (imp_o, obs_o)
        # poisson under MCAR: imputed mean within 4 SE of the observed mean
        mis_c = df["cnt"].isna().to_numpy()
        y = df["cnt"].dropna().to_numpy(float)
        assert abs(out.loc[mis_c, "cnt"].astype(float).mean() - y.mean()) < 4 * y.std() / np.sqrt(mis_c.sum())
        assert set(out["icd"].dropna().unique()) <= {"A", "B", "C", "R"}


# ---------------------------------------------------------------------------
# shrinkage of sparse polyreg targets


def _sparse_target(n=1500, seed=12):
    g = np.random.default_rng(seed)
    x1 = g.normal(size=n)
    x2 = (g.random(n) < 0.5).astype(float)
    eta = np.column_stack([np.zeros(n), 0.5 + 0.8 * x1, -0.3 * x2 + 0.2 * x1, -5.0 + 0.5 * x1])
    P = np.exp(eta) / np.exp(eta).sum(1, keepdims=True)
    k = (P.cumsum(1) < g.random(n)[:, None]).sum(1)
    df = pd.DataFrame({"x1": x1, "x2": x2, "k": pd.Categorical(np.array(["a", "b", "c", "d"])[k])})
    df.loc[g.random(n) < 0.2, "k"] = np.nan
    return df


def _map_direct(X, codes, prec, pen):
    """Penalised multinomial fit by scipy (independent of dmice's kernels)."""
    from scipy.optimize import minimize

    q, km1 = X.shape[1], 3

    def f(t):
        Bm = t.reshape(km1, q).T
        eta = np.column_stack([np.zeros(len(X)), X @ Bm])
        ll = eta[np.arange(len(X)), codes].sum() - np.logaddexp.reduce(eta, axis=1).sum()
        return -ll + 0.5 * prec * np.sum(t[pen] ** 2)

    return minimize(f, np.zeros(q * km1), method="BFGS", options={"gtol": 1e-9}).x


def test_shrinkage_fixed_prior_is_the_map():
    df = _sparse_target()
    model, X, _ = _fit(df, "k", shrinkage=0.7, newton_tol=1e-10, newton_accuracy=0.0)
    codes = df["k"].dropna().cat.codes.to_numpy()
    pen = np.ones(3 * X.shape[1], dtype=bool)
    pen[np.arange(3) * X.shape[1]] = False
    ref = _map_direct(X, codes, 1 / 0.49, pen)
    np.testing.assert_allclose(model._fits[0].beta, ref, rtol=1e-5, atol=1e-5)


def test_shrinkage_empirical_bayes_fixed_point_and_laplace_covariance():
    df = _sparse_target()
    assert min(S.combine_summaries([S.summarize_partition(df)], df.dtypes)[2].counts) < 10
    model, X, _ = _fit(df, "k", m=2, newton_tol=1e-10, newton_accuracy=0.0)  # shrinkage="auto"
    # before the first visit every chain holds the same data: the same prior variance
    np.testing.assert_allclose(model.prior_var[1], model.prior_var[0], rtol=1e-9)
    tau2 = model.prior_var[0]
    assert np.isfinite(tau2) and 1e-4 < tau2 < 1e4
    codes = df["k"].dropna().cat.codes.to_numpy()
    q = X.shape[1]
    pen = np.ones(3 * q, dtype=bool)
    pen[np.arange(3) * q] = False
    b = _map_direct(X, codes, 1 / tau2, pen)
    np.testing.assert_allclose(model._fits[0].beta, b, rtol=1e-4, atol=1e-4)
    # Laplace approximation: covariance (-Hessian of the log-likelihood + prior precision)^-1, the
    # Hessian from statsmodels' MNLogit at the same coefficients
    hess = sm.MNLogit(codes, X).hessian(b.reshape(3, q).T.reshape(-1, order="F"))
    V = np.linalg.inv(-hess + np.diag(pen / tau2))
    np.testing.assert_allclose(model._fits[0].cov, V, rtol=2e-3, atol=1e-6)
    # empirical Bayes: tau^2 = (|b|^2 + tr V) / k over the penalised coefficients (the stationary
    # point of the Laplace evidence with the curvature held fixed)
    expect = (b[pen] @ b[pen] + np.trace(V[np.ix_(pen, pen)])) / pen.sum()
    np.testing.assert_allclose(tau2, expect, rtol=0.02)


def test_polr_falls_back_to_polyreg_when_a_predictor_orders_the_levels():
    g = np.random.default_rng(13)
    n = 600
    x = g.normal(size=n)
    o = np.digitize(x, [-0.5, 0.5])  # x orders the levels perfectly: the polr slope diverges
    df = pd.DataFrame({"x": x, "w": g.normal(size=n),
                       "o": pd.Categorical(np.array(["l", "m", "h"])[o], categories=["l", "m", "h"],
                                           ordered=True)})
    df.loc[g.random(n) < 0.2, "o"] = np.nan
    model, X, events = _fit(df, "o", m=2)
    assert any("polr cannot be fitted" in e["event"] for e in events)
    assert model.method == "polyreg" and model.var.method == "polyreg"
    assert np.all(np.isfinite(model.beta)) and np.all(np.abs(model.beta) < 50)


def test_impute_end_to_end_sparse_polyreg_shrinkage(cluster_client):
    df = _sparse_target(n=2000)
    ddf = dd.from_pandas(df, npartitions=2)
    imp = dmice.impute(ddf, m=2, max_iter=2, seed=5, client=cluster_client)
    model = imp._engine.models[2]
    assert model.prior_var is not None and np.all(np.isfinite(model.prior_var))  # "auto" applied
    for k in (1, 2):
        out = imp.complete(k).compute()
        assert out["k"].dtype == ddf.dtypes["k"] and not out["k"].isna().any()
        # the sparse level d (about 1% of rows) is imputed about as often as it is observed
        obs_d = (df["k"] == "d").mean() / df["k"].notna().mean()
        n_mis = df["k"].isna().sum()
        imp_d = (out.loc[df["k"].isna(), "k"] == "d").mean()
        assert abs(imp_d - obs_d) < 4 * np.sqrt(obs_d * (1 - obs_d) / n_mis) + 0.005


def test_a_level_not_observed_in_a_stratum_is_not_imputed_there(cluster_client):
    """by=: in a group where a level of the imputed category is never observed (elsewhere it is
    seen twice), that level's probability there is about zero, as in mice run on the group alone;
    the separated intercept must not be drawn from a huge variance (it gave the level a third of
    the group's imputed cells)."""
    g = np.random.default_rng(5)
    n = 800
    site = g.choice(["east", "north", "south"], n)
    c = g.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2]).astype(object)
    c[np.nonzero(site == "east")[0][:2]] = "rare"
    c[np.nonzero(site == "south")[0][:2]] = "rare"
    x = g.normal(size=n) + (c == "b")
    df = pd.DataFrame({"x": x, "site": site, "c": pd.Categorical(c, categories=["a", "b", "c", "rare"])})
    holes = g.random(n) < 0.15
    holes[c == "rare"] = False
    df.loc[holes, "c"] = None
    df.loc[g.random(n) < 0.1, "x"] = np.nan
    for seed in (11, 13):
        imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=2, max_iter=3, seed=seed, by="site",
                           client=cluster_client, progress=False)
        for k in (1, 2):
            done = imp.complete(k).compute()
            got = done.loc[holes, ["site", "c"]]
            north = got[got["site"] == "north"]
            # p is about 1/n there: even 2 of the ~40 cells would be far out
            assert (north["c"] == "rare").sum() <= 1, (seed, k, north["c"].value_counts().to_dict())
            # 2 of about 230 rows elsewhere: a few per cent at most
            assert (got["c"] == "rare").mean() < 0.05, (seed, k)
        imp.close()
