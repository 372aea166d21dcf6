"""Parquet output: layout, manifest, commit marker, refusal to overwrite, round trip of dtypes."""

from __future__ import annotations

import json
import os

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import mixed_frame

import dmice
from dmice.errors import OutputError


@pytest.fixture(scope="module")
def written(cluster_client, tmp_path_factory):
    df = mixed_frame(2500, seed=12)
    df["grade"] = pd.Categorical(np.where(df["y"] > 1, "high", "low"), categories=["low", "high"],
                                 ordered=True)
    df["n"] = pd.array(np.arange(len(df)) % 7, dtype="Int64")
    df.loc[::9, "n"] = pd.NA
    ddf = dd.from_pandas(df, npartitions=3)
    imp = dmice.impute(ddf, m=3, max_iter=2, seed=4)
    out = str(tmp_path_factory.mktemp("out") / "imputed")
    imp.to_parquet(out)
    return ddf, imp, out


def test_layout_and_manifest(written):
    ddf, imp, out = written
    names = sorted(os.listdir(out))
    assert names == ["_SUCCESS", "_diagnostics.arrow", "_manifest.json", "_state", "imputation=1",
                     "imputation=2", "imputation=3"]
    assert sorted(os.listdir(f"{out}/_state")) == ["chains.arrow", "models.npz", "part.0.npz",
                                                   "part.1.npz", "part.2.npz", "state.json"]
    for k in (1, 2, 3):
        assert sorted(os.listdir(f"{out}/imputation={k}")) == [f"part.{i}.parquet" for i in range(3)]
    man = json.load(open(f"{out}/_manifest.json"))
    assert man["m"] == 3 and man["iterations"] == 2 and man["seed"] == 4
    assert man["n_rows"] == len(ddf) and man["partitions"] == 3
    assert man["method"]["x"] == "pmm" and man["method"]["c"] == "polyreg"
    assert man["n_missing"]["n"] == int(ddf["n"].isna().sum().compute())
    assert "y" in man["predictors"]["x"] and "x" not in man["predictors"]["x"]
    assert len(man["files"]) == 9 and all(f["bytes"] > 0 for f in man["files"])
    assert "dask" in man["versions"] and "pandas" in man["versions"]
    # the commit marker is the newest file
    assert os.path.getmtime(f"{out}/_SUCCESS") >= max(
        os.path.getmtime(f"{out}/imputation={k}/part.{i}.parquet") for k in (1, 2, 3) for i in range(3))


def test_round_trip_keeps_values_dtypes_and_categories(written):
    ddf, imp, out = written
    again = dmice.open(out)
    assert again.m == 3 and again.method == imp.method
    for k in (1, 2, 3):
        a = imp.complete(k).compute().reset_index(drop=True)
        b = again.complete(k).compute().reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)
    assert list(b["c"].cat.categories) == list(ddf["c"].dtype.categories)
    assert b["grade"].cat.ordered
    assert "imputation" in repr(again) or "from" in repr(again)


def test_read_parquet_sees_all_imputations(written):
    _, imp, out = written
    allsets = dd.read_parquet(out).compute()
    assert len(allsets) == 3 * imp.n_rows
    assert sorted(allsets["imputation"].astype(int).unique()) == [1, 2, 3]


def test_refuses_non_empty_output_and_overwrites_when_asked(written, tmp_path):
    _, imp, out = written
    with pytest.raises(OutputError, match="not empty"):
        imp.to_parquet(out)
    target = tmp_path / "other"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(OutputError):
        imp.to_parquet(str(target))
    assert (target / "keep.txt").exists()  # nothing lost
    imp.to_parquet(str(target), overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "_SUCCESS").exists()


def test_open_refuses_output_without_success_marker(written, tmp_path):
    import shutil

    _, _, out = written
    copy = tmp_path / "partial"
    shutil.copytree(out, copy)
    os.remove(copy / "_SUCCESS")
    with pytest.raises(OutputError, match="_SUCCESS"):
        dmice.open(str(copy))
