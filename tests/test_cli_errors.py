"""One error path for every dmice command: bad input exits 2 naming the column, file or option,
never a value; an unexpected error exits 1 with one line holding the exception's type only
(the traceback with DMICE_DEBUG=1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import mixed_frame
from test_job import errors

import dmice
from dmice.cli import main

SECRET = "Zq7-patient-Smith"


def _csv_files(d, n_files=3, rows=300):
    d.mkdir()
    df = mixed_frame(n_files * rows, seed=4)
    parts = [df.iloc[i * rows:(i + 1) * rows].reset_index(drop=True) for i in range(n_files)]
    for i, p in enumerate(parts):
        p.to_csv(d / f"part-{i}.csv", index=False)
    return parts


def test_a_string_in_a_numeric_column_of_a_later_csv_file(cluster_client, tmp_path, capsys):
    parts = _csv_files(tmp_path / "in")
    bad = parts[2].astype({"y": object})
    bad.loc[17, "y"] = SECRET
    bad.to_csv(tmp_path / "in" / "part-2.csv", index=False)
    code = main(["impute", str(tmp_path / "in" / "*.csv"), str(tmp_path / "out"), "--m", "1",
                 "--max-iter", "1", "--seed", "1"])
    cap = capsys.readouterr()
    assert code == 2, cap.err[-2000:]
    (err,) = errors(cap.err)
    assert "'y'" in err and "part-2.csv" in err and "cannot be read as float64" in err
    assert SECRET not in cap.err + cap.out and "Traceback" not in cap.err
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_csv_glob_is_read_with_the_first_file_s_dtypes(cluster_client, tmp_path, capsys):
    parts = _csv_files(tmp_path / "in")
    for i, p in enumerate(parts):
        p["n"] = pd.array(np.arange(300) % 4, dtype="Int64")
        if i == 2:
            p.loc[::7, "n"] = pd.NA  # gaps in a later file of an integer column
        p.to_csv(tmp_path / "in" / f"part-{i}.csv", index=False)
    out = tmp_path / "out"
    assert main(["impute", str(tmp_path / "in" / "*.csv"), str(out), "--m", "1", "--max-iter", "1",
                 "--seed", "1"]) == 0
    done = dmice.open(str(out)).complete(1).compute().reset_index(drop=True)
    ref = pd.concat(parts, ignore_index=True)
    assert len(done) == len(ref) and str(done["n"].dtype) == "Int64" and done.isna().sum().sum() == 0
    seen = ref["y"].notna()
    np.testing.assert_array_equal(done["y"][seen].to_numpy(), ref["y"][seen].to_numpy())


def test_bad_method_option(tmp_path, capsys):
    inp = tmp_path / "in.parquet"
    mixed_frame(100, seed=1).to_parquet(inp)
    assert main(["impute", str(inp), str(tmp_path / "o"), "--method", "x"]) == 2
    (err,) = errors(capsys.readouterr().err)
    assert "--method" in err and "COLUMN=METHOD" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["missing.csv", "missing.parquet", "nothing/*.csv"])
def test_missing_input_file(tmp_path, capsys, name):
    assert main(["impute", str(tmp_path / name), str(tmp_path / "o")]) == 2
    cap = capsys.readouterr()
    (err,) = errors(cap.err)
    assert name in err and "Traceback" not in cap.err
    assert not (tmp_path / "o").exists()


def test_analyze_and_diagnose_of_a_missing_output(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "none"), "--formula", "y ~ x"]) == 2
    assert "_SUCCESS" in errors(capsys.readouterr().err)[0]
    assert main(["diagnose", str(tmp_path / "none")]) == 2
    assert "_SUCCESS" in errors(capsys.readouterr().err)[0]


def test_unexpected_errors_are_one_line_without_values(tmp_path, capsys, monkeypatch):
    import dmice.api

    inp = tmp_path / "in.parquet"
    mixed_frame(100, seed=1).to_parquet(inp)

    def boom(*a, **k):
        raise KeyError(SECRET)

    monkeypatch.setattr(dmice.api, "impute", boom)
    monkeypatch.delenv("DMICE_DEBUG", raising=False)
    assert main(["impute", str(inp), str(tmp_path / "o")]) == 1
    cap = capsys.readouterr()
    (err,) = errors(cap.err)
    assert "KeyError" in err and "DMICE_DEBUG" in err
    assert SECRET not in cap.err + cap.out and "Traceback" not in cap.err
    monkeypatch.setenv("DMICE_DEBUG", "1")
    assert main(["impute", str(inp), str(tmp_path / "o")]) == 1
    cap = capsys.readouterr()
    assert "Traceback" in cap.err and SECRET in cap.err  # asked for


def test_value_errors_from_analyze_do_not_leak(tmp_path, capsys, monkeypatch):
    import dmice.analysis

    def boom(*a, **k):
        raise ValueError(f"could not convert string to float: {SECRET!r}")

    monkeypatch.setattr(dmice.analysis, "analyze", boom)
    monkeypatch.delenv("DMICE_DEBUG", raising=False)
    assert main(["analyze", str(tmp_path), "--formula", "y ~ x"]) == 1
    cap = capsys.readouterr()
    assert "ValueError" in errors(cap.err)[0] and SECRET not in cap.err + cap.out
