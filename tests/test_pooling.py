"""Tests of dmice.pooling.pool (Rubin's rules as in R mice's pool())."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from dmice.pooling import (
    chi2_d2,
    pool,
    pool_r_squared,
    pool_scalar,
    recommended_m,
    wald_chi2,
    wald_d1,
)

GOLDEN = Path(__file__).parent / "fixtures" / "pool_golden.json"
TESTS_GOLDEN = Path(__file__).parent / "fixtures" / "tests_golden.json"
TEST_COLUMNS = ["test", "statistic", "df1", "df2", "dfcom", "p_value", "riv"]
POOLED_COLUMNS = [
    "term",
    "m",
    "estimate",
    "ubar",
    "b",
    "t",
    "dfcom",
    "df",
    "riv",
    "lambda",
    "fmi",
]
SUMMARY_COLUMNS = [
    "term",
    "estimate",
    "std_error",
    "statistic",
    "df",
    "p_value",
    "conf_low",
    "conf_high",
]

# Two terms, m = 3 imputations: "a" varies, "c" is identical in every imputation.
Q = np.array([[1.0, 3.0], [2.0, 3.0], [4.0, 3.0]])
U = np.array([[0.5, 1.0], [0.7, 2.0], [0.6, 3.0]])


# ----------------------------------------------------------------- by hand


def test_pooled_by_hand_with_dfcom():
    res = pool(Q, U, dfcom=10, terms=["a", "c"])
    pooled = res.pooled.set_index("term")
    assert list(res.pooled.columns) == POOLED_COLUMNS

    # term "a": Q = 1, 2, 4; U = 0.5, 0.7, 0.6; m = 3
    qbar = (1 + 2 + 4) / 3  # 7/3
    ubar = (0.5 + 0.7 + 0.6) / 3  # 0.6
    b = ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / (3 - 1)  # 7/3
    t = ubar + (1 + 1 / 3) * b  # 0.6 + 28/9
    riv = (1 + 1 / 3) * b / ubar
    lam = (1 + 1 / 3) * b / t
    dfold = (3 - 1) / lam**2
    dfobs = (10 + 1) / (10 + 3) * 10 * (1 - lam)
    df = dfold * dfobs / (dfold + dfobs)
    fmi = (riv + 2 / (df + 3)) / (riv + 1)
    expected_a = dict(
        m=3, estimate=qbar, ubar=ubar, b=b, t=t, dfcom=10, df=df, riv=riv, fmi=fmi
    )
    expected_a["lambda"] = lam
    for col, value in expected_a.items():
        assert pooled.loc["a", col] == pytest.approx(value, rel=1e-12), col
    assert b == pytest.approx(7 / 3) and t == pytest.approx(0.6 + 28 / 9)

    # term "c": Q = 3, 3, 3 so b = 0 and lambda = 0; mice floors lambda at
    # 1e-4 in the df computation only.
    ubar_c = (1 + 2 + 3) / 3
    dfold_c = (3 - 1) / 1e-4**2
    dfobs_c = (10 + 1) / (10 + 3) * 10 * (1 - 1e-4)
    df_c = dfold_c * dfobs_c / (dfold_c + dfobs_c)
    assert pooled.loc["c", "estimate"] == 3.0
    assert pooled.loc["c", "b"] == 0.0
    assert pooled.loc["c", "lambda"] == 0.0
    assert pooled.loc["c", "riv"] == 0.0
    assert pooled.loc["c", "t"] == pytest.approx(ubar_c, rel=1e-12)
    assert pooled.loc["c", "df"] == pytest.approx(df_c, rel=1e-12)
    assert pooled.loc["c", "fmi"] == pytest.approx(2 / (df_c + 3), rel=1e-12)


def test_pooled_by_hand_large_sample():
    res = pool(Q, U, terms=["a", "c"])
    lam = (4 / 3) * (7 / 3) / (0.6 + 28 / 9)
    assert (res.pooled["dfcom"] == np.inf).all()
    assert res.pooled["df"].iloc[0] == pytest.approx(2 / lam**2, rel=1e-12)
    assert res.pooled["df"].iloc[1] == pytest.approx(2 / 1e-4**2, rel=1e-12)


def test_summary_by_hand():
    res = pool(Q, U, dfcom=10, terms=["a", "c"])
    row = res.pooled.iloc[0]
    smry = res.summary(conf_level=0.9)
    assert list(smry.columns) == SUMMARY_COLUMNS

    se = math.sqrt(0.6 + 28 / 9)
    statistic = (7 / 3) / se
    p_value = 2 * stats.t.sf(abs(statistic), row["df"])
    half = stats.t.ppf(0.95, row["df"]) * se
    got = smry.iloc[0]
    assert got["std_error"] == pytest.approx(se, rel=1e-12)
    assert got["statistic"] == pytest.approx(statistic, rel=1e-12)
    assert got["p_value"] == pytest.approx(p_value, rel=1e-12)
    assert got["conf_low"] == pytest.approx(7 / 3 - half, rel=1e-12)
    assert got["conf_high"] == pytest.approx(7 / 3 + half, rel=1e-12)

    expo = res.summary(conf_level=0.9, exponentiate=True).iloc[0]
    assert expo["estimate"] == pytest.approx(math.exp(7 / 3), rel=1e-12)
    assert expo["conf_low"] == pytest.approx(math.exp(7 / 3 - half), rel=1e-12)
    assert expo["conf_high"] == pytest.approx(math.exp(7 / 3 + half), rel=1e-12)
    assert expo["std_error"] == got["std_error"]
    assert expo["p_value"] == got["p_value"]

    no_ci = res.summary(conf_int=False)
    assert list(no_ci.columns) == SUMMARY_COLUMNS[:-2]


def test_covariance_by_hand():
    cov = np.array(
        [
            [[0.5, 0.1], [0.1, 1.0]],
            [[0.7, 0.2], [0.2, 2.0]],
            [[0.6, 0.3], [0.3, 3.0]],
        ]
    )
    q = np.array([[1.0, 0.0], [2.0, 1.0], [4.0, 5.0]])
    res = pool(q, cov, terms=["a", "c"])
    # B[a, c] = sum((Qa - 7/3)(Qc - 2)) / 2
    #         = ((-4/3)(-2) + (-1/3)(-1) + (5/3)(3)) / 2 = 4
    b_ac = ((1 - 7 / 3) * (0 - 2) + (2 - 7 / 3) * (1 - 2) + (4 - 7 / 3) * (5 - 2)) / 2
    b_cc = ((0 - 2) ** 2 + (1 - 2) ** 2 + (5 - 2) ** 2) / 2  # 7
    expected = np.array(
        [
            [0.6 + 4 / 3 * (7 / 3), 0.2 + 4 / 3 * b_ac],
            [0.2 + 4 / 3 * b_ac, 2.0 + 4 / 3 * b_cc],
        ]
    )
    assert b_ac == pytest.approx(4.0)
    np.testing.assert_allclose(res.covariance.to_numpy(), expected, rtol=1e-12)
    assert list(res.covariance.index) == ["a", "c"] == list(res.covariance.columns)
    np.testing.assert_allclose(np.diag(expected), res.pooled["t"], rtol=1e-12)
    assert len(res.covariances) == 3


# ---------------------------------------------------------- input formats


def test_labelled_inputs_are_aligned_by_term():
    expected = pool(Q, U, dfcom=10, terms=["a", "c"]).pooled
    est = [pd.Series(row, index=["a", "c"]) for row in Q]
    est[1] = est[1][["c", "a"]]  # order within one imputation does not matter
    var = [pd.Series(row[::-1], index=["c", "a"]) for row in U]
    pd.testing.assert_frame_equal(pool(est, var, dfcom=10).pooled, expected)

    frame = pd.DataFrame(Q, columns=["a", "c"])
    pd.testing.assert_frame_equal(
        pool(frame, pd.DataFrame(U, columns=["a", "c"]), dfcom=10).pooled, expected
    )

    covs = [
        pd.DataFrame(np.diag(row), index=["a", "c"], columns=["a", "c"]).loc[
            ["c", "a"], ["c", "a"]
        ]
        for row in U
    ]
    res = pool(est, covs, dfcom=10)
    pd.testing.assert_frame_equal(res.pooled, expected)
    assert res.m == 3 and res.dfcom == 10 and res.terms == ["a", "c"]
    assert res.estimates.shape == (3, 2) and res.variances.shape == (3, 2)


def test_terms_select_and_order_labelled_estimates():
    est = pd.DataFrame(Q, columns=["a", "c"])
    res = pool(est, U, dfcom=10, terms=["c"])
    assert res.terms == ["c"]
    assert res.pooled["ubar"].iloc[0] == pytest.approx(2.0)
    assert res.pooled["b"].iloc[0] == 0.0


def test_one_dimensional_input_is_one_term():
    res = pool([1.0, 2.0, 4.0], [0.5, 0.7, 0.6])
    assert res.terms == ["term0"]
    assert res.pooled["estimate"].iloc[0] == pytest.approx(7 / 3)


def test_repr_is_readable():
    text = repr(pool(Q, U, dfcom=10, terms=["a", "c"]))
    assert text.startswith("PooledResult(m=3, dfcom=10, conf_level=0.95)")
    assert "estimate" in text and "fmi" in text


# ------------------------------------------------------ golden from R mice


def _golden_cases() -> list[dict]:
    return json.loads(GOLDEN.read_text())["cases"]


def _floats(values) -> np.ndarray:
    # jsonlite writes Inf as the string "Inf"
    return np.array([float(v) for v in np.atleast_1d(values)])


def test_golden_metadata():
    golden = json.loads(GOLDEN.read_text())
    assert golden["r_version"].startswith("R version")
    assert golden["mice_version"]


@pytest.mark.parametrize(
    "use_covariances", [False, True], ids=["variances", "covariances"]
)
@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["name"])
def test_matches_r_mice(case, use_covariances):
    variances = case["covariances"] if use_covariances else case["variances"]
    res = pool(
        np.array(case["estimates"]),
        np.array(variances),
        dfcom=float(case["dfcom"]),
        terms=case["terms"],
    )
    assert list(res.pooled["term"]) == case["terms"]
    assert (res.pooled["dfcom"] == float(case["dfcom"])).all()
    for col, values in case["pooled"].items():
        np.testing.assert_allclose(
            res.pooled[col].to_numpy(float),
            _floats(values),
            rtol=1e-8,
            atol=0,
            err_msg=col,
        )

    smry = res.summary(
        conf_int=True, exponentiate=case["exponentiate"], conf_level=case["conf_level"]
    )
    for col, values in case["summary"].items():
        np.testing.assert_allclose(
            smry[col].to_numpy(float), _floats(values), rtol=1e-8, atol=0, err_msg=col
        )


# ------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(2, 10),
    fit=st.integers(1, 5).flatmap(
        lambda p: st.tuples(
            arrays(np.float64, p, elements=st.floats(-1e6, 1e6)),
            arrays(np.float64, p, elements=st.floats(1e-6, 1e6)),
        )
    ),
)
def test_identical_fits_have_no_between_variance(m, fit):
    q, u = fit
    res = pool(np.tile(q, (m, 1)), np.tile(u, (m, 1)))
    pooled = res.pooled
    assert (pooled["b"] == 0).all()
    np.testing.assert_array_equal(pooled["estimate"].to_numpy(), q)
    assert (pooled["riv"] == 0).all() and (pooled["lambda"] == 0).all()
    np.testing.assert_allclose(pooled["t"], u, rtol=1e-12)
    # lambda floored at 1e-4 in Barnard-Rubin df (dfcom infinite)
    np.testing.assert_allclose(pooled["df"], (m - 1) / 1e-8, rtol=1e-12)


# ------------------------------------------------------------------ m = 1


def test_single_imputation_warns_and_keeps_fit():
    with pytest.warns(UserWarning, match="pooling needs m >= 2"):
        res = pool(Q[:1], U[:1], dfcom=10, terms=["a", "c"])
    pooled = res.pooled
    np.testing.assert_array_equal(pooled["estimate"], Q[0])
    np.testing.assert_array_equal(pooled["t"], U[0])
    assert (pooled["b"] == 0).all() and (pooled["df"] == 10).all()

    with pytest.warns(UserWarning, match="pooling needs m >= 2"):
        res = pool(Q[:1], U[:1])
    assert (res.pooled["df"] == np.inf).all()
    smry = res.summary()
    np.testing.assert_allclose(
        smry["conf_high"], Q[0] + stats.norm.ppf(0.975) * np.sqrt(U[0]), rtol=1e-12
    )


# ------------------------------------------------------------- bad inputs


def test_dfcom_below_one_is_raised_to_one_like_mice():
    assert pool(Q, U, dfcom=0.5).dfcom == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(estimates=np.empty((0, 2)), variances=np.empty((0, 2))), "estimates"),
        (dict(estimates=np.ones((2, 2, 2)), variances=U), "estimates"),
        (dict(estimates=[[1.0, "x"], [2.0, 3.0]], variances=U[:2]), "estimates"),
        (dict(estimates=Q, variances=U[:2]), "variances"),
        (dict(estimates=Q, variances=U[:, :1]), "variances"),
        (dict(estimates=Q, variances=np.ones((3, 2, 3))), "variances"),
        (
            dict(estimates=np.where(Q == 4, np.nan, Q), variances=U),
            "estimates must be finite",
        ),
        (
            dict(estimates=Q, variances=np.where(U == 2, np.inf, U)),
            "variances must be finite",
        ),
        (dict(estimates=Q, variances=-U), "variances must be non-negative"),
        (
            dict(estimates=Q, variances=np.array([[[1.0, 0.5], [0.0, 1.0]]] * 3)),
            "symmetric",
        ),
        (dict(estimates=Q, variances=U, dfcom=0), "dfcom"),
        (dict(estimates=Q, variances=U, dfcom=float("nan")), "dfcom"),
        (dict(estimates=Q, variances=U, dfcom="many"), "dfcom"),
        (dict(estimates=Q, variances=U, conf_level=1.5), "conf_level"),
        (dict(estimates=Q, variances=U, terms=["a"]), "terms"),
        (dict(estimates=Q, variances=U, terms=["a", "a"]), "terms"),
        (dict(estimates=Q, variances=U, terms="ac"), "terms"),
        (
            dict(
                estimates=pd.DataFrame(Q, columns=["a", "c"]), variances=U, terms=["z"]
            ),
            "terms",
        ),
        (
            dict(
                estimates=[
                    pd.Series([1.0, 2.0], index=["a", "c"]),
                    pd.Series([1.0, 2.0], index=["a", "z"]),
                ],
                variances=U[:2],
            ),
            "estimates",
        ),
        (
            dict(
                estimates=pd.DataFrame(Q, columns=["a", "c"]),
                variances=pd.DataFrame(U, columns=["a", "z"]),
            ),
            "variances",
        ),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pool(**kwargs)


def test_bad_summary_conf_level():
    with pytest.raises(ValueError, match="conf_level"):
        pool(Q, U).summary(conf_level=0)


# ========================================= D1 / D2 / R^2 / scalar pooling


def _tests_golden() -> dict:
    return json.loads(TESTS_GOLDEN.read_text())


def _check_row(got: pd.DataFrame, expected: dict, rtol: float = 1e-6) -> None:
    assert list(got.columns) == TEST_COLUMNS and len(got) == 1
    row = got.iloc[0]
    for col, value in expected.items():
        if value is None:  # R NA / NULL dfcom
            continue
        assert row[col] == pytest.approx(float(value), rel=rtol, abs=0), col


def test_tests_golden_metadata():
    golden = _tests_golden()
    assert golden["r_version"].startswith("R version")
    assert golden["mice_version"] and golden["mitml_version"]


@pytest.mark.parametrize("case", _tests_golden()["tests"], ids=lambda c: c["name"])
def test_d1_d2_match_r_mice(case):
    q = np.array(case["estimates"])
    u = np.array(case["covariances"])
    tested = case["terms_tested"]
    # D1(fit1, fit0): mice passes the residual df of fit1 as dfcom
    got = wald_d1(q, u, tested, terms=case["terms"], dfcom=case["dfcom"])
    _check_row(got, case["d1"])
    assert got["dfcom"].iloc[0] == case["dfcom"]
    # mitml::testModels(method = "D1") without df.com
    if "d1_no_dfcom" in case:
        got = wald_d1(q, u, tested, terms=case["terms"])
        _check_row(got, case["d1_no_dfcom"])
        assert got["dfcom"].iloc[0] == np.inf
    # D2(fit1, fit0), use = "wald"
    chi2 = wald_chi2(q, u, tested, terms=case["terms"])
    np.testing.assert_allclose(chi2, case["wald_chi2"], rtol=1e-6)
    got = chi2_d2(chi2, len(tested))
    _check_row(got, case["d2"])
    assert np.isnan(got["dfcom"].iloc[0])


def test_d1_labelled_inputs_and_positions():
    case = _tests_golden()["tests"][0]
    terms = case["terms"]
    est = pd.DataFrame(case["estimates"], columns=terms)
    covs = [pd.DataFrame(c, index=terms, columns=terms) for c in case["covariances"]]
    expected = case["d1"]
    _check_row(wald_d1(est, covs, case["terms_tested"], dfcom=21), expected)
    positions = [terms.index(t) for t in case["terms_tested"]]
    # order of the tested terms does not matter
    got = wald_d1(
        np.array(case["estimates"]),
        np.array(case["covariances"]),
        positions[::-1],
        dfcom=21,
    )
    _check_row(got, expected)


@pytest.mark.parametrize("case", _tests_golden()["r_squared"], ids=lambda c: c["name"])
def test_pool_r_squared_matches_r_mice(case):
    got = pool_r_squared(case["r_squared"], case["nobs"])
    assert list(got.index) == ["R^2"]
    assert list(got.columns) == ["est", "lo_95", "hi_95", "fmi"]
    for col, value in case["pooled"].items():
        assert got[col].iloc[0] == pytest.approx(value, rel=1e-6), col
    got = pool_r_squared(case["adj_r_squared"], case["nobs"], adjusted=True)
    assert list(got.index) == ["adj R^2"]
    for col, value in case["pooled_adjusted"].items():
        assert got[col].iloc[0] == pytest.approx(value, rel=1e-6), col


@pytest.mark.parametrize("case", _tests_golden()["scalar"], ids=lambda c: c["name"])
def test_pool_scalar_matches_r_mice(case):
    got = pool_scalar(
        case["estimates"],
        case["variances"],
        float(case["n"]),
        case["k"],
        rule=case["rule"],
    )
    for key, value in case["result"].items():
        if value is None:
            assert np.isnan(getattr(got, key)), key
        else:
            assert getattr(got, key) == pytest.approx(value, rel=1e-6), key
    np.testing.assert_array_equal(got.qhat, case["estimates"])


# ------------------------------------------------- by-hand formula checks


def test_d1_by_hand_single_term_is_squared_t():
    # k = 1: D1's statistic is the squared pooled t statistic qbar^2 / t
    # with the (1 + riv) ubar total variance, riv = (1 + 1/m) b / ubar.
    q = np.array([[1.0], [2.0], [4.0]])
    u = np.array([[[0.5]], [[0.7]], [[0.6]]])
    got = wald_d1(q, u).iloc[0]
    qbar, ubar, b, m = 7 / 3, 0.6, 7 / 3, 3
    riv = (1 + 1 / m) * b / ubar
    assert got["riv"] == pytest.approx(riv, rel=1e-12)
    assert got["statistic"] == pytest.approx(qbar**2 / ((1 + riv) * ubar), rel=1e-12)
    t = 1 * (m - 1)  # <= 4: small-t branch
    df2 = t * (1 + 1) * (1 + 1 / riv) ** 2 / 2
    assert got["df2"] == pytest.approx(df2, rel=1e-12)
    assert got["p_value"] == pytest.approx(
        stats.f.sf(got["statistic"], 1, df2), rel=1e-12
    )
    assert got["df1"] == 1 and got["test"] == "term0 = 0"


def test_d1_by_hand_two_terms_large_t():
    rng = np.random.default_rng(1)
    m, k = 6, 2
    q = rng.normal(size=(m, k)) + [1.0, -0.5]
    a = rng.normal(size=(m, k, k))
    u = np.einsum("mij,mkj->mik", a, a) + np.eye(k)
    qbar, ubar = q.mean(0), u.mean(0)
    bmat = (q - qbar).T @ (q - qbar) / (m - 1)
    riv = (1 + 1 / m) * np.trace(bmat @ np.linalg.inv(ubar)) / k
    stat = qbar @ np.linalg.inv((1 + riv) * ubar) @ qbar / k
    t = k * (m - 1)
    df2 = 4 + (t - 4) * (1 + (1 - 2 / t) / riv) ** 2
    got = wald_d1(q, u).iloc[0]
    assert got["statistic"] == pytest.approx(stat, rel=1e-10)
    assert got["riv"] == pytest.approx(riv, rel=1e-10)
    assert got["df2"] == pytest.approx(df2, rel=1e-10)
    # Reiter's small-sample df approaches the large-sample df as dfcom grows
    big = wald_d1(q, u, dfcom=1e12).iloc[0]
    assert big["df2"] == pytest.approx(df2, rel=1e-6)
    assert wald_d1(q, u, dfcom=30).iloc[0]["df2"] < df2


def test_d1_identical_imputations_gives_chi_square_limit():
    q = np.tile([1.0, 2.0], (4, 1))
    u = np.tile(np.eye(2), (4, 1, 1))
    got = wald_d1(q, u).iloc[0]
    assert got["riv"] == 0 and got["df2"] == np.inf
    assert got["statistic"] == pytest.approx(5 / 2)
    assert got["p_value"] == pytest.approx(stats.chi2.sf(5.0, 2), rel=1e-12)


def test_d2_by_hand():
    d = np.array([3.0, 5.0, 4.0, 8.0])
    k, m = 2, 4
    riv = (1 + 1 / m) * np.var(np.sqrt(d), ddof=1)
    stat = (d.mean() / k - (m + 1) / (m - 1) * riv) / (1 + riv)
    df2 = k ** (-3 / m) * (m - 1) * (1 + 1 / riv) ** 2
    got = chi2_d2(d, k).iloc[0]
    assert got["statistic"] == pytest.approx(stat, rel=1e-12)
    assert got["df2"] == pytest.approx(df2, rel=1e-12)
    assert got["riv"] == pytest.approx(riv, rel=1e-12)
    assert got["p_value"] == pytest.approx(stats.f.sf(stat, k, df2), rel=1e-12)


def test_wald_chi2_by_hand():
    q = np.array([[1.0, 2.0], [0.5, 1.0]])
    u = np.array([np.diag([1.0, 4.0]), np.diag([0.25, 1.0])])
    np.testing.assert_allclose(wald_chi2(q, u), [1 + 1, 1 + 1], rtol=1e-12)
    np.testing.assert_allclose(wald_chi2(q, u, [1]), [1.0, 1.0], rtol=1e-12)


def test_pool_scalar_by_hand():
    got = pool_scalar([1.0, 2.0, 4.0], [0.5, 0.7, 0.6], n=13, k=3)
    ref = pool(Q, U, dfcom=10, terms=["a", "c"]).pooled.iloc[0]
    for key, col in [
        ("qbar", "estimate"),
        ("ubar", "ubar"),
        ("b", "b"),
        ("t", "t"),
        ("df", "df"),
        ("r", "riv"),
        ("fmi", "fmi"),
    ]:
        assert getattr(got, key) == pytest.approx(ref[col], rel=1e-12), key
    rei = pool_scalar([1.0, 2.0, 4.0], [0.5, 0.7, 0.6], rule="reiter2003")
    assert rei.t == pytest.approx(0.6 + (7 / 3) / 3)
    assert rei.df == pytest.approx(2 * (1 + 0.6 / ((7 / 3) / 3)) ** 2)
    assert np.isnan(rei.fmi)


def test_pool_r_squared_by_hand():
    r2, n = np.array([0.25, 0.36, 0.49]), 23
    z = np.arctanh(np.sqrt(r2))
    qbar, ubar, b = z.mean(), 1 / 20, np.var(z, ddof=1)
    t = ubar + 4 / 3 * b
    got = pool_r_squared(r2, n).iloc[0]
    assert got["est"] == pytest.approx(np.tanh(qbar) ** 2, rel=1e-12)
    assert got["lo_95"] == pytest.approx(np.tanh(qbar - 1.96 * t**0.5) ** 2)
    assert got["hi_95"] == pytest.approx(np.tanh(qbar + 1.96 * t**0.5) ** 2)
    with pytest.warns(RuntimeWarning, match="negative"):
        assert np.isnan(pool_r_squared([-0.1, 0.2], 30)["est"].iloc[0])


def test_recommended_m_quadratic_rule():
    # von Hippel (2020): m = 1 + 1/2 (fmi / cv)^2, rounded up
    assert recommended_m(0.5) == 51
    assert recommended_m(0.5, target_cv=0.1) == 14  # 1 + 12.5
    np.testing.assert_array_equal(recommended_m([0.0, 0.1, 0.3]), [1, 3, 19])
    upper = 1 / (1 + np.exp(-(0.0 + stats.norm.ppf(0.975) * np.sqrt(2 / 20))))
    assert recommended_m(0.5, m_pilot=20) == math.ceil(1 + 0.5 * (upper / 0.05) ** 2)
    with pytest.raises(ValueError, match="fmi"):
        recommended_m(1.5)


def test_mc_error_by_hand():
    q = np.array([[1.0, 3.0], [2.0, 3.5], [4.0, 2.0], [3.0, 2.5]])
    u = np.array([[0.5, 1.0], [0.7, 2.0], [0.6, 3.0], [0.4, 1.5]])
    res = pool(q, u, dfcom=20, terms=["a", "c"])
    mc = res.mc_error()
    assert list(mc["term"]) == ["a", "c"]
    b = res.pooled["b"].to_numpy()
    np.testing.assert_allclose(mc["mc_se_estimate"], np.sqrt(b / 4), rtol=1e-12)
    # jackknife over imputations: pool without imputation i
    m = 4
    reps = np.stack(
        [
            pool(np.delete(q, i, 0), np.delete(u, i, 0), dfcom=20)
            .summary()[["estimate", "std_error", "p_value"]]
            .to_numpy()
            for i in range(m)
        ]
    )
    jk = np.sqrt((m - 1) / m * ((reps - reps.mean(0)) ** 2).sum(0))
    np.testing.assert_allclose(mc["mc_se_estimate"], jk[:, 0], rtol=1e-10)
    np.testing.assert_allclose(mc["mc_se_std_error"], jk[:, 1], rtol=1e-10)
    np.testing.assert_allclose(mc["mc_se_p_value"], jk[:, 2], rtol=1e-10)
    np.testing.assert_array_equal(
        mc["recommended_m"], recommended_m(res.pooled["fmi"].to_numpy())
    )
    # m = 2: no jackknife
    small = pool(q[:2], u[:2]).mc_error()
    assert small["mc_se_std_error"].isna().all()
    assert small["mc_se_estimate"].notna().all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: wald_d1(Q, U), "covariances"),
        (lambda: wald_d1(Q, np.tile(np.eye(2), (3, 1, 1)), ["zz"]), "terms_tested"),
        (lambda: wald_d1(Q[:1], np.eye(2)[None]), "m >= 2"),
        (lambda: wald_d1(Q, np.tile(np.eye(2), (3, 1, 1)), [0, 0]), "twice"),
        (lambda: chi2_d2([1.0], 1), "m >= 2"),
        (lambda: chi2_d2([1.0, -2.0], 1), "non-negative"),
        (lambda: chi2_d2([1.0, 2.0], 0), "df"),
        (lambda: pool_scalar([1.0, 2.0], [1.0]), "variances"),
        (lambda: pool_scalar([1.0, 2.0], [1.0, 1.0], n=3, k=3), "n - k"),
        (lambda: pool_scalar([1.0, 2.0], [1.0, 1.0], rule="x"), "rule"),
        (lambda: pool_r_squared([0.2, 1.0], 30), "below 1"),
        (lambda: pool_r_squared([0.2, 0.3], 3), "n must"),
    ],
)
def test_new_functions_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------- D3 (mitml)

COMPARE_GOLDEN = Path(__file__).parent / "fixtures" / "compare_golden.json"


@pytest.mark.parametrize(
    "case", json.loads(COMPARE_GOLDEN.read_text())["cases"], ids=lambda c: c["name"]
)
def test_lr_d3_matches_mitml(case):
    # log-likelihoods from R (mitml's .evaluateUserLogLik for lm; logLik / dbinom /
    # dpois for glm), D3 from mitml::testModels(method = "D3") or its code
    from dmice.pooling import lr_d3

    got = lr_d3(
        case["loglik_full"],
        case["loglik_reduced"],
        case["loglik_full_pooled"],
        case["loglik_reduced_pooled"],
        case["k"],
    )
    assert list(got.columns) == TEST_COLUMNS
    row = got.iloc[0]
    want = case["d3"]
    for col in ("statistic", "df1", "df2", "p_value", "riv"):
        assert row[col] == pytest.approx(want[col], rel=1e-10), col
    assert math.isnan(row["dfcom"])


def test_lr_d3_by_hand_and_positive_riv():
    from dmice.pooling import lr_d3

    ll1 = np.array([-100.0, -101.0, -99.0])
    ll0 = np.array([-104.0, -106.0, -103.0])
    ll1p = np.array([-100.5, -101.2, -99.4])
    ll0p = np.array([-104.1, -106.3, -103.3])
    k, m = 2, 3
    dbar = np.mean(-2 * (ll0 - ll1))
    dtilde = np.mean(-2 * (ll0p - ll1p))
    r = (m + 1) / (k * (m - 1)) * (dbar - dtilde)
    stat = dtilde / (k * (1 + r))
    t = k * (m - 1)  # 4: the small-t branch
    v = t * (1 + 1 / k) * (1 + 1 / r) ** 2 / 2
    row = lr_d3(ll1, ll0, ll1p, ll0p, k).iloc[0]
    assert row["statistic"] == pytest.approx(stat, rel=1e-12)
    assert row["df2"] == pytest.approx(v, rel=1e-12)
    assert row["p_value"] == pytest.approx(stats.f.sf(stat, k, v), rel=1e-12)
    # pooled fits closer than the own fits: negative riv, truncated with ariv="positive"
    neg = lr_d3(ll1, ll0, ll1, ll0 - 1.0, k)
    assert neg["riv"].iloc[0] < 0
    pos = lr_d3(ll1, ll0, ll1, ll0 - 1.0, k, ariv="positive").iloc[0]
    assert pos["riv"] == 0.0
    assert pos["statistic"] == pytest.approx(np.mean(-2 * (ll0 - 1.0 - ll1)) / k, rel=1e-12)
