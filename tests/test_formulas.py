"""Formulas per imputed variable: designs recomputed from the chains, and the congeniality claims."""

from __future__ import annotations

import dask.dataframe as dd
import formulaic
import numpy as np
import pandas as pd
import pytest

import dmice
from dmice.analysis import fit_glm
from dmice.errors import InputError

M = 20


def _interaction_data(n, b1, b3, seed):
    """y = 0.5 + b1 x + 0.5 z + b3 x z + e, z a binary moderator; x missing at random given y."""
    g = np.random.default_rng(seed)
    z = (g.random(n) < 0.5).astype(float)
    x = g.normal(size=n)
    y = 0.5 + b1 * x + 0.5 * z + b3 * x * z + 0.5 * g.normal(size=n)
    df = pd.DataFrame({"x": x, "z": z, "y": y})
    df.loc[g.random(n) < 1 / (1 + np.exp(0.5 - 0.8 * y)), "x"] = np.nan
    return df


def _analysis(df):
    return np.column_stack([np.ones(len(df)), df.x, df.z, df.x * df.z]), df.y.to_numpy(float)


def _pooled_interaction(df, **kw):
    imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=M, max_iter=2, seed=2, method={"x": "norm"},
                       progress=False, **kw)
    fit = fit_glm([imp.complete(k) for k in range(1, M + 1)], _analysis, ["1", "x", "z", "x:z"],
                  family="gaussian")
    res = dmice.pool(fit.params, fit.cov, dfcom=fit.df_resid).summary()
    return res.estimate[3], res.std_error[3]


def test_interaction_in_the_formula_is_needed_and_enough_when_residual_variance_is_equal(cluster_client):
    # slopes -1 and +1 in the two groups: x | y, z has the same residual variance in both
    df = _interaction_data(6000, b1=-1.0, b3=2.0, seed=1)
    est, se = _pooled_interaction(df)
    assert (2.0 - est) / se > 5, (est, se)  # without the interaction: biased toward zero
    est, se = _pooled_interaction(df, formulas={"x": "x ~ y * z"})
    assert abs(est - 2.0) < 3 * se, (est, se)


def test_interaction_in_the_formula_is_biased_when_residual_variance_differs(cluster_client):
    # slopes 0.5 and 2.5: x | y, z has a much smaller residual variance where z = 1, which one
    # common residual variance cannot represent
    df = _interaction_data(6000, b1=0.5, b3=2.0, seed=1)
    est, se = _pooled_interaction(df, formulas={"x": "x ~ y * z"})
    assert (2.0 - est) / se > 3, (est, se)


def test_formula_designs_follow_the_chains(cluster_client):
    """Every visit's design equals formulaic's on that chain's completed data."""
    from dmice import block as _block

    g = np.random.default_rng(0)
    n = 600
    df = pd.DataFrame({"a": g.normal(size=n), "b": pd.Categorical(g.choice(["p", "q", "r"], n)),
                       "t": g.normal(size=n)})
    df.loc[g.random(n) < 0.3, "a"] = np.nan
    df.loc[g.random(n) < 0.3, "b"] = None
    df.loc[g.random(n) < 0.3, "t"] = np.nan
    rhs = "a * b + bs(a, df=3) + I(a ** 2)"
    imp = dmice.impute(df, m=2, max_iter=2, seed=1, formulas={"t": f"t ~ {rhs}"}, progress=False)
    eng = imp._engine
    blk = eng.client.gather(eng.blocks[0])
    fm = eng.plan.formulas[2]
    assert fm.columns[0] == "Intercept" and any("bs(a" in c for c in fm.columns)
    # a cubic B-spline without inner knots spans a and a**2: the screening drops them (logged)
    ev = imp.logged_events
    assert (ev.variable.eq("t") & ev.event.str.contains("dropped")).sum() == 2
    for c in range(2):
        done = imp.complete(c + 1).compute()
        ref = fm.spec.get_model_matrix(done.iloc[blk.obs[2]], output="numpy")
        got = list(_block.formula_designs(blk, eng.plan, 2, blk.obs[2], "obs"))[c]
        np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-12, atol=1e-12)
        G = _block._formula_gram(blk, eng.plan, 2)[c]
        v = eng.plan.variables[2]
        y = (done.t.to_numpy()[blk.obs[2]] - v.center) / v.scale
        Z = np.column_stack([np.asarray(ref), y])
        np.testing.assert_allclose(G, Z.T @ Z, rtol=1e-10, atol=1e-10 * np.abs(G).max())
    # the encoding was fitted once (on a sample), then replayed: same columns as formulaic's own fit
    mm = formulaic.model_matrix(rhs, df.dropna(subset=["a", "b"]))
    assert tuple(map(str, mm.columns)) == fm.columns


@pytest.mark.parametrize("formulas, message", [
    ({"x": "y ~ z"}, "left of '~'"),
    ({"x": "x ~ z * (y"}, "not valid"),
    ({"nope": "nope ~ z"}, "unknown column 'nope'"),
    ({"x": "x ~ z + w"}, "cannot be evaluated.*`w`"),
    ({"x": "x ~ x + z"}, "on the right"),
    ({"z": "z ~ x"}, "not imputed"),
])
def test_bad_formulas_are_refused(cluster_client, formulas, message):
    df = _interaction_data(300, 1.0, 1.0, 0)
    with pytest.raises(InputError, match=message):
        dmice.impute(df, m=2, max_iter=1, formulas=formulas, progress=False)


# --- SMC-FCS ----------------------------------------------------------------------------------


def _cc_data(n, seed, family="gaussian"):
    """Continuous-by-continuous interaction; x missing at random given z."""
    from scipy.special import expit

    g = np.random.default_rng(seed)
    z = g.normal(size=n)
    x = 0.3 * z + g.normal(size=n)
    eta = 1 + x + 0.5 * z + x * z
    if family == "gaussian":
        y = eta + g.normal(size=n)
    else:
        eta = -0.5 + 0.8 * x + 0.5 * z + 0.8 * x * z
        y = (g.random(n) < expit(eta)).astype(float)
    full = pd.DataFrame({"x": x, "z": z, "y": y})
    df = full.copy()
    df.loc[g.random(n) < expit(-0.5 + z), "x"] = np.nan
    return full, df


def _pooled(imp, family):
    fit = fit_glm([imp.complete(k) for k in range(1, imp.m + 1)], _analysis_cc, ["1", "x", "z", "x:z"],
                  family=family)
    return dmice.pool(fit.params, fit.cov, dfcom=fit.df_resid).summary()


def _analysis_cc(df):
    return np.column_stack([np.ones(len(df)), df.x, df.z, df.x * df.z]), df.y.to_numpy(float)


def _full_fit(full, family):
    import statsmodels.api as sm

    X, y = _analysis_cc(full)
    fam = sm.families.Gaussian() if family == "gaussian" else sm.families.Binomial()
    return sm.GLM(y, X, family=fam).fit().params


def test_smcfcs_keeps_a_continuous_interaction_that_formula_imputation_loses(cluster_client):
    # the reference is the analysis of the data before any value was deleted
    full, df = _cc_data(4000, seed=1)
    ref = _full_fit(full, "gaussian")
    ddf = dd.from_pandas(df, npartitions=2)
    formula = _pooled(dmice.impute(ddf, m=M, max_iter=5, seed=2, method={"x": "norm"},
                                   formulas={"x": "x ~ y * z"}, progress=False), "gaussian")
    assert (ref[3] - formula.estimate[3]) / formula.std_error[3] > 5, formula
    imp = dmice.impute(ddf, m=M, max_iter=5, seed=2, substantive="y ~ x * z", progress=False)
    assert imp.method["x"] == "smcfcs"
    smc = _pooled(imp, "gaussian")
    np.testing.assert_array_less(np.abs(smc.estimate - ref), 3 * smc.std_error)


def test_smcfcs_with_a_logistic_substantive_model(cluster_client):
    full, df = _cc_data(4000, seed=3, family="binomial")
    ref = _full_fit(full, "binomial")
    imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=M, max_iter=5, seed=4,
                       substantive="y ~ x * z", substantive_family="binomial", progress=False)
    smc = _pooled(imp, "binomial")
    np.testing.assert_array_less(np.abs(smc.estimate - ref), 3 * smc.std_error)


@pytest.mark.parametrize("kw, message", [
    ({"substantive": "y ~ x * z", "substantive_family": "poisson"}, "substantive_family"),
    ({"substantive": "q ~ x"}, "unknown outcome column 'q'"),
    ({"substantive": "x ~ y + z"}, "outcome 'x' has"),
    ({"substantive": "z ~ x"}, "binomial outcome must be binary|gaussian outcome"),
])
def test_bad_substantive_models_are_refused(cluster_client, kw, message):
    _, df = _cc_data(300, 0)
    df["z"] = (df.z > 0).astype(float) if "z ~" in kw["substantive"] else df.z
    with pytest.raises(InputError, match=message):
        dmice.impute(df, m=2, max_iter=1, progress=False, **kw)
