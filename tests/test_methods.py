"""Conditional models against independent references (statsmodels on the same rows, closed forms).

The models are run through the same worker kernels (dmice.block) and client code
(dmice.methods) the engine uses, on one in-memory partition, so these tests cover
the whole arithmetic path except the scheduler.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from conftest import chain_design_stack, fit_target
from scipy import stats as sps

from dmice import block as B
from dmice.glm import newton
from dmice.methods import linear


def _data(n=4000, seed=0):
    g = np.random.default_rng(seed)
    x1 = g.normal(10, 3, n)
    x2 = g.integers(0, 2, n).astype(float)
    c = g.choice(3, n, p=[0.5, 0.3, 0.2])
    y = 2 + 0.5 * x1 - 1.0 * x2 + 0.8 * (c == 1) - 0.4 * (c == 2) + g.normal(0, 2, n)
    b = (g.random(n) < 1 / (1 + np.exp(-(-3 + 0.25 * x1 + 0.7 * x2)))).astype(float)
    k = np.where(g.random(n) < 0.5, g.choice(3, n), np.clip((x1 > 11) + (x2 > 0), 0, 2))
    df = pd.DataFrame({"x1": x1, "x2": x2, "cat": pd.Categorical(np.array(["a", "b", "c"])[c]),
                       "y": y, "b": b, "k": pd.Categorical(np.array(["p", "q", "r"])[k])})
    return df


def _raw_design(df, cols):
    X = pd.get_dummies(df[cols], drop_first=True, dtype=float)
    return sm.add_constant(X.to_numpy(dtype=float))


@pytest.mark.parametrize("parts", [1, 3])
def test_norm_fit_equals_ols(parts):
    df = _data()
    miss = np.random.default_rng(1).random(len(df)) < 0.3
    df.loc[miss, "y"] = np.nan
    model, plan, blocks, xcols, _ = fit_target(df, "y", method={"y": "norm"}, parts=parts, ridge=0.0)
    obs = df[~miss]
    ols = sm.OLS(obs["y"].to_numpy(), _raw_design(obs, ["x1", "x2", "cat", "b", "k"])).fit()
    f = model._fits[0]
    v = plan.variables[3]
    # fitted values are parametrisation-free: compare on the original scale
    X = np.concatenate([chain_design_stack(b, plan, b.obs[3], xcols)[0] for b in blocks])
    fitted = v.center + v.scale * (X @ f.coef)
    np.testing.assert_allclose(fitted, ols.fittedvalues, rtol=1e-9)
    np.testing.assert_allclose(f.rss * v.scale**2, ols.ssr, rtol=1e-9)
    assert f.df == ols.df_resid
    # the scaled coefficients and (X'X)^-1 equal OLS on the same scaled design
    ols_s = sm.OLS((obs["y"].to_numpy() - v.center) / v.scale, X).fit()
    np.testing.assert_allclose(f.coef, ols_s.params, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(f.V * ols_s.scale, ols_s.cov_params(), rtol=1e-8)


@pytest.mark.parametrize("parts", [1, 3])
def test_pmm_donor_predictions_equal_the_dense_design(parts):
    """Type-1 matching predicts the donors with each chain's beta_hat.  The client keeps the
    donors' fixed design from the first visit and completes it with the imputed cells each round
    brings, also when screening drops a predictor in a later visit."""
    from conftest import encoded_blocks

    from dmice.models import make_model

    df = _data()
    df["x2copy"] = df["x2"]  # collinear with x2: screening drops one of them
    g = np.random.default_rng(5)
    for col in ("x1", "cat", "b"):
        df.loc[g.random(len(df)) < 0.2, col] = np.nan
    df.loc[g.random(len(df)) < 0.3, "y"] = np.nan
    variables, plan, blocks, pools = encoded_blocks(df, {"y": "pmm"}, m=3, parts=parts)
    j = [v.name for v in variables].index("y")
    own = set(range(*variables[j].cols))
    xcols = np.array([c for c in range(plan.n_cols) if c not in own])
    model = make_model(j, variables[j], xcols, m=3, seed=plan.seed, sample_pool=pools[j], screen=False)
    for visit in range(2):
        if visit == 1:
            model.screen = True  # the drop happens on a visit whose donors' design is already kept
        req = model.request()
        assert req["pool"] == ("base" if visit == 0 else "cells")
        outs = [B.get_out(B.visit(b, plan, None, req)) for b in blocks]
        assert model.update(B.combine(outs), visit + 1, [])
        order = model.order(visit + 1)
        for c in range(plan.m):
            X = np.concatenate([chain_design_stack(b, plan, b.obs[j][b.pool[j]], model.xcols)[c] for b in blocks])
            y = np.concatenate([b.values[j][b.obs[j][b.pool[j]]] for b in blocks])
            yh = X @ model._fits[c].coef
            srt = np.argsort(yh, kind="stable")
            np.testing.assert_allclose(order["donor_yhat"][c], yh[srt], rtol=1e-12, atol=1e-12)
            # the same (prediction, value) pairs: donors whose predictions tie to rounding may
            # come in either order
            dy = B.donor_y(order, c)
            got = np.lexsort((dy, np.round(order["donor_yhat"][c], 9)))
            want = np.lexsort((y, np.round(yh, 9)))
            np.testing.assert_array_equal(dy[got], y[want])
        # the imputations move the predictors' imputed cells between visits
        blocks = [B.visit(b, plan, dict(order, var=j), None) for b in blocks]
        other = {"var": 0, "method": "sample", "values": pools[0], "iteration": visit + 1, "xcols": xcols}
        blocks = [B.visit(b, plan, other, None) for b in blocks]
    assert len(model.xcols) == len(xcols) - 1 and model.dropped


def test_norm_default_ridge_is_mices():
    g = np.random.default_rng(5)
    X = np.column_stack([np.ones(500), g.normal(size=(500, 3))])
    y = X @ [1, 2, 3, 4] + g.normal(size=500)
    G = np.block([[X.T @ X, (X.T @ y)[:, None]], [(X.T @ y)[None, :], np.array([[y @ y]])]])
    f = linear.fit(G, 500)
    xtx = X.T @ X
    expect = np.linalg.solve(xtx + np.diag(np.diag(xtx)) * 1e-5, X.T @ y)
    np.testing.assert_allclose(f.coef, expect, rtol=1e-12)


def test_norm_draws_follow_the_posterior():
    """beta* ~ multivariate t: mean beta_hat, covariance s^2 (X'X)^-1 (n-q)/(n-q-2)."""
    g = np.random.default_rng(6)
    n, q = 40, 3
    X = np.column_stack([np.ones(n), g.normal(size=(n, q - 1))])
    y = X @ [1.0, -2.0, 0.5] + g.normal(size=n)
    Z = np.column_stack([X, y])
    f = linear.fit(Z.T @ Z, n, ridge=0.0)
    rng = np.random.default_rng(7)
    R = 20000
    draws = np.array([linear.draw(f, rng)[0] for _ in range(R)])
    sig2 = np.array([linear.draw(f, rng)[1] ** 2 for _ in range(R)])
    s2 = f.rss / (n - q)
    cov = s2 * np.linalg.inv(X.T @ X) * (n - q) / (n - q - 2)
    se_mean = np.sqrt(np.diag(cov) / R)
    assert np.all(np.abs(draws.mean(0) - f.coef) < 4 * se_mean)
    # sample covariance within sampling error (relative SE of a variance ~ sqrt(2/R), heavier tails)
    np.testing.assert_allclose(np.cov(draws.T), cov, rtol=8 * np.sqrt(2 / R) * 2, atol=1e-12)
    # sigma*^2 = RSS / chi2(n - q): E = RSS / (n - q - 2)
    expect = f.rss / (n - q - 2)
    sd = expect * np.sqrt(2 / (n - q - 4))
    assert abs(sig2.mean() - expect) < 4 * sd / np.sqrt(R)


@pytest.mark.parametrize("parts", [1, 2])
def test_logreg_equals_statsmodels(parts):
    df = _data()
    miss = np.random.default_rng(2).random(len(df)) < 0.25
    df.loc[miss, "b"] = np.nan
    model, plan, blocks, xcols, _ = fit_target(df, "b", parts=parts, newton_tol=1e-10, newton_accuracy=0.0)
    obs = df[~miss]
    X = np.concatenate([chain_design_stack(b, plan, b.obs[4], xcols)[0] for b in blocks])
    ref = sm.Logit(obs["b"].to_numpy(), X).fit(disp=0, tol=1e-12)
    beta = model.beta[0]
    np.testing.assert_allclose(beta, ref.params, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(model._fits[0].cov, ref.cov_params(), rtol=1e-6)
    # predicted probabilities on the raw design are parametrisation-free
    raw = sm.Logit(obs["b"].to_numpy(), _raw_design(obs, ["x1", "x2", "cat", "y", "k"])).fit(disp=0)
    np.testing.assert_allclose(1 / (1 + np.exp(-X @ beta)), raw.predict(), rtol=1e-6)


def test_polyreg_equals_mnlogit():
    df = _data()
    miss = np.random.default_rng(3).random(len(df)) < 0.25
    df.loc[miss, "k"] = np.nan
    model, plan, blocks, xcols, _ = fit_target(df, "k", newton_tol=1e-10, newton_accuracy=0.0)
    obs = df[~miss]
    X = np.concatenate([chain_design_stack(b, plan, b.obs[5], xcols)[0] for b in blocks])
    codes = obs["k"].cat.codes.to_numpy()
    ref = sm.MNLogit(codes, X).fit(disp=0, method="newton", tol=1e-12, maxiter=100)
    np.testing.assert_allclose(model.beta[0], ref.params, rtol=1e-6, atol=1e-8)
    # statsmodels orders parameters level by level, as dmice does
    np.testing.assert_allclose(model._fits[0].cov, ref.cov_params(), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("shifted", [False, True])
def test_multinomial_and_logistic_kernels_equal_statsmodels(shifted, monkeypatch):
    """Score, information and log-likelihood of the kernels against statsmodels' MNLogit and
    Logit at the same coefficients (``shifted``: the overflow-safe path of large predictors)."""
    from dmice.glm import kernels as stats

    if shifted:
        monkeypatch.setattr(stats, "_SAFE_ETA", -np.inf)
    monkeypatch.setattr(stats, "ROW_BLOCK", 700)  # several blocks of rows, the last one partial
    g = np.random.default_rng(8)
    n, q = 3000, 4
    X = np.column_stack([np.ones(n), g.normal(size=(n, q - 1))])
    codes = g.integers(0, 3, n)
    Bm = g.normal(size=(q, 2)) * 0.5
    ref = sm.MNLogit(codes, X)
    flat = Bm.reshape(-1, order="F")  # level by level, as dmice stacks them
    got = stats.multinomial(X, codes.astype(float), Bm, loglik=True)
    np.testing.assert_allclose(got["g"], ref.score(flat), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(got["H"], -ref.hessian(flat), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(got["ll"], ref.loglike(flat), rtol=1e-12)
    assert "ll" not in stats.multinomial(X, codes.astype(float), Bm)
    y = (codes > 0).astype(float)
    lref = sm.Logit(y, X)
    got = stats.logistic(X, y, Bm[:, 0], loglik=True)
    np.testing.assert_allclose(got["g"], lref.score(Bm[:, 0]), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(got["H"], -lref.hessian(Bm[:, 0]), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(got["ll"], lref.loglike(Bm[:, 0]), rtol=1e-12)


def test_newton_warm_start_rule_lands_on_the_mle():
    """The engine's rule: warm-start from the previous estimate, step until a step is <= 0.2 SE.

    After imputation moves the data as one iteration does (30% of the rows of a predictor and of
    the outcome redrawn from the model), the estimate it accepts is within 1% of a standard error
    of the exact MLE, usually after a single step.
    """
    from dmice.glm.kernels import logistic

    g = np.random.default_rng(11)
    n = 20000
    X = np.column_stack([np.ones(n), g.normal(size=(n, 4))])
    truth = np.array([-1, 0.5, -0.5, 0.3, 0.0])
    y = (g.random(n) < 1 / (1 + np.exp(-(X @ truth)))).astype(float)

    def mle(X, y):
        b = np.zeros(X.shape[1])
        for _ in range(50):
            s = logistic(X, y, b)
            st = newton.step(b, s["g"], s["H"])
            b = st.beta
        return b, st.cov

    b0, _ = mle(X, y)
    X2, y2 = X.copy(), y.copy()
    rows = g.random(n) < 0.3
    X2[rows, 1] = g.normal(size=rows.sum())
    y2[rows] = (g.random(rows.sum()) < 1 / (1 + np.exp(-(X2[rows] @ b0)))).astype(float)
    b1, cov1 = mle(X2, y2)
    se = np.sqrt(np.diag(cov1))
    b, steps = b0, 0
    while True:
        s = logistic(X2, y2, b)
        st = newton.step(b, s["g"], s["H"])
        b, steps = st.beta, steps + 1
        if st.step_se <= 0.2:
            break
    assert np.max(np.abs(b0 - b1) / se) > 0.2  # the data did move the estimate
    assert np.max(np.abs(b - b1) / se) < 0.01
    assert steps <= 2


def test_newton_chains_stop_on_their_own():
    """Each chain's fit stops by the rule on its own steps: a round after a visit's first asks
    only for the chains still iterating, and every chain ends within the accuracy of its MLE."""
    df = _data()
    g = np.random.default_rng(4)
    df.loc[g.random(len(df)) < 0.25, "k"] = np.nan
    df.loc[g.random(len(df)) < 0.3, "x1"] = np.nan  # imputed predictor: each chain has its own MLE
    model, plan, blocks, xcols, _ = fit_target(df, "k", m=3, newton_tol=1e-10, newton_accuracy=0.0)
    mle = model.beta.copy()
    se = model._unflat(np.stack([np.sqrt(np.diag(f.cov)) for f in model._fits]))
    model.newton_tol, model.newton_accuracy = 0.2, 0.05
    model._curvature = 0.05  # the rule then takes one step for errors up to 1 SE
    start = mle + 0.05 * se
    start[0] = mle[0] + 2.5 * se[0]  # chain 0 starts far from its MLE, the others near theirs
    model.beta = start
    asked, rounds = [], 0
    while True:
        req = model.request()
        asked.append(req.get("chains"))
        outs = [B.get_out(B.visit(b, plan, None, req)) for b in blocks]
        if "chains" in req:
            assert B.combine(outs)["sum"]["H"].shape[0] == len(req["chains"])
        rounds += 1
        if model.update(B.combine(outs), 2, []):
            break
    assert asked[0] is None and list(asked[1]) == [0]
    assert rounds >= 2
    for c in range(3):
        np.testing.assert_array_less(np.abs(model.beta[c] - mle[c]) / se[c], 0.05)


def test_ridge_fallback_with_too_few_observations():
    df = _data(200)
    df.loc[5:, "y"] = np.nan  # 5 observed rows for 8 parameters
    model, *_, events = fit_target(df, "y", method={"y": "norm"})
    assert any("ridge fallback" in e["event"] and e["variable"] == "y" for e in events)
    assert np.all(np.isfinite(model._fits[0].coef))


def test_logreg_draws_spread_matches_covariance():
    df = _data()
    df.loc[np.random.default_rng(2).random(len(df)) < 0.25, "b"] = np.nan
    model, *_ = fit_target(df, "b", newton_tol=1e-10, newton_accuracy=0.0)
    f = model._fits[0]
    rng = np.random.default_rng(0)
    R = 5000
    d = np.array([newton.draw(f.beta, f.cov, rng) for _ in range(R)])
    se = np.sqrt(np.diag(f.cov))
    assert np.all(np.abs(d.mean(0) - f.beta) < 4 * se / np.sqrt(R))
    # variance: chi2 sampling distribution of the sample variance
    lo, hi = sps.chi2.ppf([1e-4, 1 - 1e-4], R - 1) / (R - 1)
    ratio = d.var(0, ddof=1) / np.diag(f.cov)
    assert np.all((ratio > lo) & (ratio < hi))
