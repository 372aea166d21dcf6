"""Passive variables: derived columns stay exactly consistent with the imputed inputs."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dmice
from dmice.errors import InputError

BMI = "weight / (height / 100) ** 2"


def _body(n=3000, seed=0, with_bmi=True):
    g = np.random.default_rng(seed)
    height = g.normal(170, 10, n)
    weight = 22 * (height / 100) ** 2 + g.normal(0, 8, n)
    sbp = 100 + 1.2 * weight / (height / 100) ** 2 + g.normal(0, 8, n)
    df = pd.DataFrame({"height": height, "weight": weight, "sbp": sbp})
    if with_bmi:
        df["bmi"] = df.weight / (df.height / 100) ** 2
    df.loc[g.random(n) < 0.2, "weight"] = np.nan
    df.loc[g.random(n) < 0.1, "height"] = np.nan
    df.loc[g.random(n) < 0.2, "sbp"] = np.nan
    if with_bmi:
        df.loc[df.weight.isna() | df.height.isna(), "bmi"] = np.nan
        df.loc[g.random(n) < 0.05, "bmi"] = np.nan  # missing although both inputs are observed
    return df


@pytest.mark.parametrize("with_bmi", [True, False])
def test_passive_bmi_is_consistent_in_every_completed_data_set(cluster_client, with_bmi):
    df = _body(with_bmi=with_bmi)
    imp = dmice.impute(dd.from_pandas(df, npartitions=3), m=4, max_iter=4, seed=3,
                       passive={"bmi": BMI}, progress=False)
    assert imp.method["bmi"] == "passive" and "bmi" not in imp.visit_sequence
    assert list(imp.columns) == ["height", "weight", "sbp", "bmi"]
    miss = df.weight.isna() | df.height.isna()
    for k in range(1, 5):
        c = imp.complete(k).compute()
        assert c.notna().all().all()
        np.testing.assert_allclose(c.bmi, c.weight / (c.height / 100) ** 2, rtol=1e-13)
        # observed inputs are untouched, so bmi there is the data's own value
        if with_bmi:
            keep = ~miss & df.bmi.notna()
            np.testing.assert_array_equal(c.bmi[keep], df.bmi[keep])
    ev = imp.logged_events
    assert {"weight", "height"} <= set(ev[ev.event.str.contains("passive 'bmi' removed")].variable)


def test_passive_bmi_predicts_other_variables(cluster_client):
    # sbp depends on bmi only; pmm of sbp from (height, weight, bmi) recovers the slope on bmi
    import statsmodels.api as sm

    df = _body(n=6000, seed=1)
    imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=5, max_iter=5, seed=1,
                       passive={"bmi": BMI}, progress=False)
    est, var = [], []
    for k in range(1, 6):
        c = imp.complete(k).compute()
        f = sm.OLS(c.sbp, sm.add_constant(c[["bmi"]])).fit()
        est.append(f.params["bmi"])
        var.append(f.bse["bmi"] ** 2)
    pooled = dmice.pool(np.array(est)[:, None], np.array(var)[:, None, None], dfcom=len(df) - 2).summary()
    assert abs(pooled.estimate[0] - 1.2) < 3 * pooled.std_error[0]


@pytest.mark.parametrize("passive, message", [
    ({"bmi": "weight / (height"}, "not valid"),
    ({"bmi": "weight / nothere"}, "unknown column 'nothere'"),
    ({"bmi": "__import__('os')"}, "not allowed"),
    ({"bmi": "bmi * 2"}, "itself"),
    ({"bmi": "weight.real"}, "not allowed"),
    ("weight", "dict"),
])
def test_bad_passive_expressions_are_refused(passive, message):
    with pytest.raises(InputError, match=message):
        dmice.impute(_body(200), passive=passive)
