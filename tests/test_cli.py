"""The dmice command: impute a CSV or Parquet input, refuse bad input with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
from conftest import mixed_frame

import dmice


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dmice.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_impute_csv_and_parquet(tmp_path):
    df = mixed_frame(1500, seed=21)
    csv = tmp_path / "in.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / "out"
    res = _run("impute", str(csv), str(out), "--m", "2", "--max-iter", "2", "--seed", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    imp = dmice.open(str(out))
    assert imp.m == 2 and imp.seed == 1
    done = imp.complete(2).compute()
    assert done.isna().sum().sum() == 0 and len(done) == len(df)
    # Parquet in, a method override
    pq = tmp_path / "in.parquet"
    df.to_parquet(pq)
    out2 = tmp_path / "out2"
    res = _run("impute", str(pq), str(out2), "--m", "1", "--max-iter", "1", "--seed", "2",
               "--method", "x=norm")
    assert res.returncode == 0, res.stderr[-3000:]
    assert dmice.open(str(out2)).method["x"] == "norm"
    # existing output refused with exit code 2, nothing removed
    res = _run("impute", str(pq), str(out2), "--m", "1", "--max-iter", "1")
    assert res.returncode == 2 and "not empty" in res.stderr
    assert os.path.exists(out2 / "_SUCCESS")


def test_cli_bad_method_exit_code(tmp_path):
    df = pd.DataFrame({"a": [1.0, np.nan, 3.0, 4.0], "b": [0.1, 0.2, 0.3, np.nan]})
    pq = tmp_path / "in.parquet"
    df.to_parquet(pq)
    res = _run("impute", str(pq), str(tmp_path / "o"), "--method", "zz=pmm")
    assert res.returncode == 2 and "zz" in res.stderr


def test_cli_analyze_prints_and_writes_the_pooled_table(tmp_path):
    import json

    df = mixed_frame(1200, seed=5)
    pq = tmp_path / "in.parquet"
    df.to_parquet(pq)
    out = tmp_path / "out"
    assert _run("impute", str(pq), str(out), "--m", "3", "--max-iter", "2", "--seed", "3").returncode == 0
    res = _run("analyze", str(out), "--formula", "y ~ x + z + C(c)", "--csv", str(tmp_path / "t.csv"),
               "--json", str(tmp_path / "t.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fmi" in res.stdout and "x" in res.stdout
    table = pd.read_csv(tmp_path / "t.csv")
    expect = dmice.analyze(str(out), "y ~ x + z + C(c)").summary()
    np.testing.assert_allclose(table["estimate"], expect["estimate"], rtol=1e-10)
    assert json.load(open(tmp_path / "t.json"))["m"] == 3
    bad = _run("analyze", str(out), "--formula", "y ~ nope")
    assert bad.returncode == 2 and "nope" in bad.stderr
