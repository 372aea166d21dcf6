"""Bad input gets a clear error that names the column or parameter and never shows data values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import dmice
from dmice.errors import InputError

SECRET = 123456.789  # a data value that must never appear in a message


def _df(n=300):
    g = np.random.default_rng(0)
    df = pd.DataFrame({"a": g.normal(size=n), "b": g.normal(size=n),
                       "cat": pd.Categorical(g.choice(["u", "v", "w"], n))})
    df.loc[3, "a"] = SECRET
    df.loc[::5, "b"] = np.nan
    return df


@pytest.mark.parametrize("kwargs, match", [
    ({"m": 0}, "m must be an integer >= 1"),
    ({"m": 2.5}, "m must be an integer"),
    ({"max_iter": -1}, "max_iter"),
    ({"seed": -3}, "seed"),
    ({"method": {"nope": "pmm"}}, "unknown columns.*nope"),
    ({"method": {"b": "magic"}}, "method for column 'b' must be one of"),
    ({"method": {"cat": "norm"}}, "does not fit column 'cat'"),
    ({"method": {"b": "logreg"}}, "does not fit column 'b'"),
    ({"visit_sequence": "sideways"}, "visit_sequence"),
    ({"method": "pmm"}, "method must be a dict"),
])
def test_argument_errors(cluster_client, kwargs, match):
    with pytest.raises(InputError, match=match) as e:
        dmice.impute(_df(), **kwargs)
    assert str(SECRET) not in str(e.value)


def test_non_dataframe_input():
    with pytest.raises(InputError, match="data must be a dask or pandas DataFrame, got ndarray"):
        dmice.impute(np.zeros((3, 3)))


def test_all_missing_column(cluster_client):
    df = _df()
    df["empty"] = np.nan
    with pytest.raises(InputError, match="column 'empty' has every value missing"):
        dmice.impute(df)


def test_infinite_values(cluster_client):
    df = _df()
    df.loc[7, "a"] = np.inf
    with pytest.raises(InputError, match="column 'a' has 1 infinite values") as e:
        dmice.impute(df)
    assert str(SECRET) not in str(e.value)


def test_complete_number_out_of_range(cluster_client):
    imp = dmice.impute(_df(), m=2, max_iter=1, seed=1)
    with pytest.raises(InputError, match="from 1 to m=2"):
        imp.complete(3)


def test_too_few_observed_values_fall_back_to_ridge(cluster_client):
    df = _df()
    df.loc[4:, "a"] = np.nan  # 4 observed rows, 5 parameters
    imp = dmice.impute(df, m=2, max_iter=2, seed=1)
    ev = imp.logged_events
    assert ((ev["variable"] == "a") & ev["event"].str.contains("ridge fallback")).any()
    assert imp.complete(1).compute()["a"].notna().all()


def test_logs_hold_no_data_values(cluster_client, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="dmice")
    df = _df()
    df.loc[4:, "a"] = np.nan
    dmice.impute(df, m=2, max_iter=2, seed=1)
    text = caplog.text
    assert "iteration" in text
    assert str(SECRET) not in text and "123456" not in text
