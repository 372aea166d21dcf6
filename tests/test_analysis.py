"""dmice.analyze: per-imputation GLM fits equal statsmodels; pooling; inputs; errors."""

from __future__ import annotations

import dask.dataframe as dd
import formulaic
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from conftest import mixed_frame

import dmice
from dmice.errors import InputError

N = 1200
LEVELS = ["a", "b", "c", "d"]
FORMULA_RHS = "x * z + C(grp, contr.treatment('b')) + I(x ** 2)"


def _frame(seed: int) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    x = g.normal(size=N)
    z = g.normal(size=N)
    # level "d" only occurs in the last rows: absent from the first partition
    grp = np.where(np.arange(N) >= N - 60, "d", g.choice(LEVELS[:3], N))
    eta = 0.2 + 0.5 * x - 0.4 * z + 0.3 * (grp == "c") - 0.2 * (grp == "d")
    return pd.DataFrame({
        "x": x, "z": z, "grp": grp,
        "w": g.uniform(0.5, 2.0, N), "off": g.normal(0.0, 0.3, N),
        "y": eta + g.normal(size=N),
        "e": (g.random(N) < 1 / (1 + np.exp(-eta))).astype(float),
        "cnt": g.poisson(np.exp(eta)).astype(np.int64),
    })


@pytest.fixture(scope="module")
def frames():
    return [_frame(s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def dask_frames(frames):
    return [dd.from_pandas(f, npartitions=3, sort=False) for f in frames]


LINKS = {"logit": sm.families.links.Logit, "probit": sm.families.links.Probit,
         "cloglog": sm.families.links.CLogLog}


def _statsmodels(df, formula, family, link, weights, offset, cov_type):
    """statsmodels GLM on one whole completed data set; returns (terms, params, bse)."""
    df = df.assign(grp=pd.Categorical(df["grp"], categories=LEVELS)) if "grp" in df else df
    mm = formulaic.model_matrix(formula, df)
    if family == "gaussian":
        fam = sm.families.Gaussian()
    elif family == "poisson":
        fam = sm.families.Poisson()
    else:
        fam = sm.families.Binomial(link=LINKS[link or "logit"]())
    X = np.asarray(mm.rhs, dtype=float)
    mod = sm.GLM(np.asarray(mm.lhs, dtype=float)[:, 0], X, family=fam,
                 var_weights=df[weights].to_numpy() if weights else None,
                 offset=df[offset].to_numpy() if offset else None)
    res = mod.fit(cov_type="HC0" if cov_type == "HC1" else cov_type, tol=1e-13, maxiter=200)
    cov = np.asarray(res.cov_params())
    if cov_type == "HC1":  # statsmodels' GLM has no small-sample factor for HC1
        n, p = X.shape
        cov = cov * n / (n - p)
    return list(mm.rhs.columns), np.asarray(res.params), np.sqrt(np.diag(cov))


CASES = [
    # family, link, outcome, weights, offset, cov_type
    ("gaussian", None, "y", None, None, "nonrobust"),
    ("gaussian", None, "y", "w", "off", "nonrobust"),
    ("gaussian", None, "y", "w", None, "HC0"),
    ("gaussian", None, "y", None, "off", "HC1"),
    ("binomial", "logit", "e", None, None, "nonrobust"),
    ("binomial", "logit", "e", "w", None, "HC0"),
    ("binomial", "logit", "e", None, "off", "HC1"),
    ("binomial", "probit", "e", None, None, "nonrobust"),
    ("binomial", "probit", "e", "w", "off", "HC0"),
    ("binomial", "cloglog", "e", None, None, "nonrobust"),
    ("binomial", "cloglog", "e", None, "off", "HC1"),
    ("poisson", None, "cnt", None, None, "nonrobust"),
    ("poisson", None, "cnt", None, "off", "nonrobust"),
    ("poisson", None, "cnt", "w", None, "HC0"),
    ("poisson", None, "cnt", "w", "off", "HC1"),
]


@pytest.mark.parametrize("family,link,outcome,weights,offset,cov_type", CASES)
def test_each_imputation_equals_statsmodels(cluster_client, frames, dask_frames, family, link,
                                            outcome, weights, offset, cov_type):
    formula = f"{outcome} ~ {FORMULA_RHS}"
    res = dmice.analyze(dask_frames, formula, family=family, link=link, weights=weights,
                        offset=offset, cov_type=cov_type, client=cluster_client)
    assert res.m == 3 and res.nobs == N
    assert res.link == (link or {"gaussian": "identity", "poisson": "log"}[family])
    for k, df in enumerate(frames):
        terms, params, bse = _statsmodels(df, formula, family, link, weights, offset, cov_type)
        assert res.terms == terms
        np.testing.assert_allclose(res.fits[k].params.to_numpy(), params, rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(res.fits[k].bse.to_numpy(), bse, rtol=1e-6)


def test_formula_terms_reference_level_interaction_and_transform(cluster_client, dask_frames):
    res = dmice.analyze(dask_frames, f"y ~ {FORMULA_RHS}")
    assert res.terms == ["Intercept", "x", "z", "C(grp, contr.treatment('b'))[T.a]",
                         "C(grp, contr.treatment('b'))[T.c]", "C(grp, contr.treatment('b'))[T.d]",
                         "I(x ** 2)", "x:z"]
    p = len(res.terms)
    assert res.dfcom == N - p


def test_pooled_is_rubins_rules_of_the_fits(cluster_client, dask_frames):
    res = dmice.analyze(dask_frames, f"e ~ {FORMULA_RHS}", family="binomial")
    est = np.array([f.params.to_numpy() for f in res.fits])
    var = np.array([np.diag(f.cov.to_numpy()) for f in res.fits])
    pooled = res.pooled
    assert list(pooled["term"]) == res.terms
    np.testing.assert_allclose(pooled["estimate"].to_numpy(), est.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled["ubar"].to_numpy(), var.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled["b"].to_numpy(), est.var(axis=0, ddof=1), rtol=1e-10)
    direct = dmice.pool(est, np.array([f.cov.to_numpy() for f in res.fits]), dfcom=res.dfcom,
                        terms=res.terms)
    pd.testing.assert_frame_equal(res.summary(), direct.summary())
    odds = res.summary(exponentiate=True)
    np.testing.assert_allclose(odds["estimate"], np.exp(est.mean(axis=0)), rtol=1e-12)
    assert "conf_low" not in res.summary(conf_int=False)
    text = repr(res)
    assert "AnalysisResult" in text and "I(x ** 2)" in text and "std_error" in text


def test_dfcom_given(cluster_client, dask_frames):
    res = dmice.analyze(dask_frames, "y ~ x", dfcom=50)
    assert res.dfcom == 50 and set(res.pooled["dfcom"]) == {50}


@pytest.fixture(scope="module")
def imputed(cluster_client):
    df = mixed_frame(600, seed=4)
    imp = dmice.impute(df, m=3, max_iter=2, seed=1)
    yield imp
    imp.close()


MI_FORMULA = "y ~ x + z + C(c, contr.treatment('b')) + s"


def test_multiple_imputation_path_and_pandas_list(cluster_client, imputed, tmp_path):
    res = dmice.analyze(imputed, MI_FORMULA)
    completed = [imputed.complete(k).compute() for k in range(1, imputed.m + 1)]
    for k, df in enumerate(completed):
        mm = formulaic.model_matrix(MI_FORMULA, df.assign(s=pd.Categorical(df["s"], ["u", "v"])))
        assert res.terms == list(mm.rhs.columns)
        fit = sm.GLM(np.asarray(mm.lhs)[:, 0], np.asarray(mm.rhs)).fit()
        np.testing.assert_allclose(res.fits[k].params.to_numpy(), fit.params, rtol=1e-6)
        np.testing.assert_allclose(res.fits[k].bse.to_numpy(), fit.bse, rtol=1e-6)
    assert res.terms[-1] == "s[T.v]"

    from_list = dmice.analyze(completed, MI_FORMULA)
    out = imputed.to_parquet(str(tmp_path / "imp"))
    from_path = dmice.analyze(out, MI_FORMULA)
    for other in (from_list, from_path):
        assert other.terms == res.terms and other.nobs == res.nobs
        np.testing.assert_allclose(other.pooled["estimate"], res.pooled["estimate"], rtol=1e-9)
        np.testing.assert_allclose(other.pooled["t"], res.pooled["t"], rtol=1e-9)


def test_fit_glm_still_works(cluster_client, frames, dask_frames):
    from dmice.analysis import fit_glm

    def design(df):
        return np.column_stack([np.ones(len(df)), df["x"], df["z"]]), df["e"].to_numpy(float)

    fit = fit_glm(dask_frames, design, ["const", "x", "z"], family="binomial", client=cluster_client)
    X, y = design(frames[0])
    ref = sm.GLM(y, X, family=sm.families.Binomial()).fit(tol=1e-13)
    np.testing.assert_allclose(fit.params[0], ref.params, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.cov[0])), ref.bse, rtol=1e-6)
    assert fit.nobs == N and fit.df_resid == N - 3


def test_errors_name_the_problem(cluster_client, frames, dask_frames):
    with pytest.raises(InputError, match="nope"):
        dmice.analyze(dask_frames, "y ~ x + nope")
    with pytest.raises(InputError, match="nope"):
        dmice.analyze(dask_frames, "nope ~ x")
    with pytest.raises(InputError, match="formula"):
        dmice.analyze(dask_frames, "y ~ x +* (")
    with pytest.raises(InputError, match="formula"):
        dmice.analyze(dask_frames, "y + x")
    with pytest.raises(InputError, match="wt"):
        dmice.analyze(dask_frames, "y ~ x", weights="wt")
    with pytest.raises(InputError, match="family"):
        dmice.analyze(dask_frames, "y ~ x", family="gamma")
    with pytest.raises(InputError, match="link"):
        dmice.analyze(dask_frames, "e ~ x", family="binomial", link="log")
    with pytest.raises(InputError, match="cov_type"):
        dmice.analyze(dask_frames, "y ~ x", cov_type="HC3")
    with pytest.raises(InputError, match="data"):
        dmice.analyze(42, "y ~ x")
    with pytest.raises(InputError, match="binomial outcome"):
        dmice.analyze(dask_frames, "y ~ x", family="binomial")
    holes = frames[0].copy()
    holes.loc[5, "x"] = np.nan
    with pytest.raises(InputError, match="'x'"):
        dmice.analyze([holes, frames[1]], "y ~ x")
