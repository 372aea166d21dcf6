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
from conftest import fit_target
from scipy import stats as sps

from dmice import block as B
from dmice.methods import linear, newton


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
    X = np.concatenate([B.design(b, plan, b.obs[3], xcols)[0] for b in blocks])
    fitted = v.center + v.scale * (X @ f.coef)
    np.testing.assert_allclose(fitted, ols.fittedvalues, rtol=1e-9)
    np.testing.assert_allclose(f.rss * v.scale**2, ols.ssr, rtol=1e-9)
    assert f.df == ols.df_resid
    # the scaled coefficients and (X'X)^-1 equal OLS on the same scaled design
    ols_s = sm.OLS((obs["y"].to_numpy() - v.center) / v.scale, X).fit()
    np.testing.assert_allclose(f.coef, ols_s.params, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(f.V * ols_s.scale, ols_s.cov_params(), rtol=1e-8)


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
    X = np.concatenate([B.design(b, plan, b.obs[4], xcols)[0] for b in blocks])
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
    X = np.concatenate([B.design(b, plan, b.obs[5], xcols)[0] for b in blocks])
    codes = obs["k"].cat.codes.to_numpy()
    ref = sm.MNLogit(codes, X).fit(disp=0, method="newton", tol=1e-12, maxiter=100)
    np.testing.assert_allclose(model.beta[0], ref.params, rtol=1e-6, atol=1e-8)
    # statsmodels orders parameters level by level, as dmice does
    np.testing.assert_allclose(model._fits[0].cov, ref.cov_params(), rtol=1e-5, atol=1e-10)


def test_newton_warm_start_rule_lands_on_the_mle():
    """The engine's rule: warm-start from the previous estimate, step until a step is <= 0.2 SE.

    After imputation moves the data as one iteration does (30% of the rows of a predictor and of
    the outcome redrawn from the model), the estimate it accepts is within 1% of a standard error
    of the exact MLE, usually after a single step.
    """
    from dmice.stats import logistic

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
