"""Diagnostic plots, the distributed summaries behind them, and `dmice diagnose`.

References: numpy histograms and pandas counts of the completed data brought to the test
(small data), pandas value_counts of the missingness mask, and R mice's md.pattern
(tests/fixtures/make_pattern_golden.R).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import mixed_frame

import dmice
from dmice import plots
from dmice.errors import InputError, OutputError
from dmice.plots import _label

FIXTURES = Path(__file__).parent / "fixtures"
M = 2


@pytest.fixture(scope="module")
def run(cluster_client, tmp_path_factory):
    df = mixed_frame(1200, seed=5)
    g = np.random.default_rng(6)
    df["u"] = np.where(g.random(len(df)) < 0.3, np.nan, g.random(len(df)))  # uniform on (0, 1)
    ddf = dd.from_pandas(df, npartitions=3)
    # norm draws of u leave the observed range (0, 1); pmm draws of x are observed values
    imp = dmice.impute(ddf, m=M, max_iter=5, seed=3, method={"u": "norm"})
    out = str(tmp_path_factory.mktemp("plots") / "imputed")
    imp.to_parquet(out)
    return df, ddf, imp, out


def _levels_counts(values: pd.Series, levels: list[str]) -> np.ndarray:
    lab = values.map(_label)
    return np.array([(lab == lev).sum() for lev in levels])


def _check_against_completed(dist, df, completed):
    mask = df.isna()
    for name, d in dist.items():
        miss = mask[name].to_numpy()
        if d["kind"] == "continuous":
            edges = d["edges"]
            obs = df[name].to_numpy(dtype=float)[~miss]
            np.testing.assert_array_equal(d["observed"], np.histogram(obs, bins=edges)[0])
            every = [obs]
            for k, comp in enumerate(completed):
                vals = comp[name].to_numpy(dtype=float)
                np.testing.assert_array_equal(vals[~miss], obs)  # observed cells kept
                np.testing.assert_array_equal(d["imputed"][k], np.histogram(vals[miss], bins=edges)[0])
                every.append(vals[miss])
            every = np.concatenate(every)
            assert edges[0] == every.min() and edges[-1] == every.max()
        else:
            levels = d["levels"]
            np.testing.assert_array_equal(d["observed"], _levels_counts(df[name][~miss], levels))
            for k, comp in enumerate(completed):
                np.testing.assert_array_equal(d["imputed"][k],
                                              _levels_counts(comp[name][miss].astype(object), levels))
        assert d["observed"].sum() == (~miss).sum()
        assert (d["imputed"].sum(axis=1) == miss.sum()).all()


def test_distributions_in_memory_equal_numpy_histograms(run):
    df, ddf, imp, out = run
    dist = plots.distributions(imp, bins=25)
    assert list(dist) == ["x", "z", "c", "s", "u"]
    assert dist["x"]["kind"] == "continuous" and len(dist["x"]["edges"]) == 26
    assert dist["z"]["levels"] == ["0", "1"] and dist["c"]["levels"] == ["a", "b", "c"]
    completed = [imp.complete(k).compute() for k in range(1, M + 1)]
    _check_against_completed(dist, df, completed)
    # pmm imputes observed values: edges span the observed range; norm imputations of u go
    # beyond it: the edges were widened to hold them
    assert dist["x"]["edges"][0] == df["x"].min() and dist["x"]["edges"][-1] == df["x"].max()
    assert dist["u"]["edges"][0] < df["u"].min() and dist["u"]["edges"][-1] > df["u"].max()


def test_integer_edges_hold_a_whole_number_of_values():
    e = plots._edges(75.0, 182.0, 40, integer=True)
    assert len(e) == 41 and e[0] == 74.5 and e[-1] >= 182.5
    counts = np.histogram(np.arange(75, 183), bins=e)[0]
    assert set(counts[: -(-(182 - 75 + 1) // 3)]) == {3}  # 3 integers in every bin up to the last value
    np.testing.assert_array_equal(plots._edges(0.5, 2.0, 3), [0.5, 1.0, 1.5, 2.0])
    np.testing.assert_array_equal(plots._edges(4.0, 4.0, 2), [3.5, 4.0, 4.5])


def test_distributions_of_opened_output_equal_numpy_histograms(run):
    df, ddf, imp, out = run
    again = dmice.open(out)
    completed = [again.complete(k).compute() for k in range(1, M + 1)]
    for bins in (40, 120):
        dist = plots.distributions(again, bins=bins)
        assert len(dist["x"]["edges"]) == bins + 1
        _check_against_completed(dist, df, completed)
    mem = plots.distributions(imp, bins=40)
    np.testing.assert_allclose(dist["x"]["edges"][::3], mem["x"]["edges"], rtol=1e-12)
    for name in ("z", "c", "s"):
        np.testing.assert_array_equal(dist[name]["imputed"], mem[name]["imputed"])
    with pytest.raises(InputError, match="bins must divide 120"):
        plots.distributions(again, bins=7)
    with pytest.raises(InputError, match="'y', which was not imputed"):
        plots.distributions(again, variables=["y"])


def test_md_pattern_equals_pandas_counts(run):
    df, ddf, imp, out = run
    pat = dmice.md_pattern(ddf)
    rows, total = pat.iloc[:-1], pat.loc["total"]
    names = [c for c in pat.columns if c not in ("count", "n_missing")]
    assert sorted(names) == sorted(df.columns)
    # reference: pandas value_counts of the whole mask
    ref = df[names].notna().astype(int).value_counts()
    got = rows.set_index(names)["count"]
    assert len(got) == len(ref)
    for key, cnt in ref.items():
        assert got.loc[key] == cnt
    assert (rows["n_missing"] == (1 - rows[names]).sum(axis=1)).all()
    assert total["count"] == len(df)
    for c in names:
        assert total[c] == df[c].isna().sum()
    assert total["n_missing"] == df.isna().sum().sum()
    nmis = [total[c] for c in names]
    assert nmis == sorted(nmis)  # columns in increasing order of missing values
    # the same pattern from the manifest of the written output, and from a pandas frame
    pd.testing.assert_frame_equal(dmice.md_pattern(dmice.open(out)), pat, check_dtype=False)
    pd.testing.assert_frame_equal(dmice.md_pattern(df), pat)
    pd.testing.assert_frame_equal(dmice.md_pattern(imp), pat)


def test_md_pattern_hand_checked_and_r_golden(cluster_client):
    tiny = pd.DataFrame({"a": [1.0, None, 3.0, None, 5.0], "b": ["u", "v", None, None, "w"],
                         "c": [1, 2, 3, 4, 5]})
    pat = dmice.md_pattern(dd.from_pandas(tiny, npartitions=2))
    # patterns: complete (rows 0, 4), a missing (1), b missing (2), both (3); a and b tie at 2
    # missing values, so they keep their column order after the complete c
    expected = pd.DataFrame([[2, 1, 1, 1, 0], [1, 1, 1, 0, 1], [1, 1, 0, 1, 1], [1, 1, 0, 0, 2],
                             [5, 0, 2, 2, 4]], columns=["count", "c", "a", "b", "n_missing"],
                            index=[0, 1, 2, 3, "total"])
    pd.testing.assert_frame_equal(pat, expected, check_dtype=False)

    golden = json.loads((FIXTURES / "pattern_golden.json").read_text())
    for case in golden.values():
        data = pd.DataFrame({k: pd.array(v, dtype="Float64") for k, v in case["data"].items()})
        pat = dmice.md_pattern(dd.from_pandas(data, npartitions=3))
        assert [c for c in pat.columns if c not in ("count", "n_missing")] == case["columns"]
        assert pat["count"].iloc[:-1].tolist() == case["counts"]
        mat = np.asarray(case["matrix"])
        np.testing.assert_array_equal(pat.drop(columns="count").to_numpy(dtype=int), mat)


def _axes_with_data(fig):
    return [ax for ax in fig.axes if ax.has_data()]


def test_figures_have_one_panel_per_statistic_and_decode(run, tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    from matplotlib.colors import to_hex

    df, ddf, imp, out = run
    again = dmice.open(out)
    # continuous: mean and sd; categorical: one panel per level (z 2, c 3, s 2)
    fig = again.plot_trace()
    assert len(_axes_with_data(fig)) == 2 + 2 + 3 + 2 + 2
    assert all(len(ax.lines) == M for ax in _axes_with_data(fig))
    fig = imp.plot_trace(["x"])
    assert [ax.get_title() for ax in fig.axes] == ["x: mean", "x: sd"]
    fig = again.plot_densities(bins=30)
    axes = _axes_with_data(fig)
    assert [ax.get_title() for ax in axes] == ["x", "z", "c", "s", "u"]
    assert len(axes[0].lines) == M + 1  # observed and each imputation
    assert len(axes[2].patches) == 3 * (M + 1)  # a bar per level for observed and each imputation
    colours = [to_hex(line.get_color()).upper() for line in axes[0].lines]
    assert colours == [plots.IMPUTED] * M + [plots.OBSERVED]  # red imputations, blue observed
    fig3 = dmice.plot_pattern(ddf)
    assert len(_axes_with_data(fig3)) == 2  # pattern grid and missing fractions
    for name, f in (("trace", fig), ("densities", fig), ("pattern", fig3)):
        path = tmp_path / f"{name}.png"
        f.savefig(path, dpi=60)
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(InputError, match="unknown column 'nope'"):
        imp.plot_densities(["nope"])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"plots.*dmice\[plots\]"):
        plots._mpl()


def _run(*args, capsys):
    """``dmice ARGS`` in this process (the entry point is ``sys.exit(main())``)."""
    from dmice.cli import main

    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_diagnose_writes_pngs_and_html(run, capsys):
    mpimg = pytest.importorskip("matplotlib.image")
    df, ddf, imp, out = run
    code, stdout, stderr = _run("diagnose", out, "--variable", "x", "--variable", "c", "--bins", "30",
                                capsys=capsys)
    assert code == 0, stderr[-3000:]
    rep = os.path.join(out, "_diagnostics")
    assert stdout.strip() == os.path.join(rep, "report.html")
    assert sorted(os.listdir(rep)) == ["densities.png", "pattern.png", "report.html", "trace.png"]
    page = open(os.path.join(rep, "report.html")).read()
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(embedded) == 3
    for b64, name in zip(embedded, ("trace", "densities", "pattern")):
        assert base64.b64decode(b64) == open(os.path.join(rep, f"{name}.png"), "rb").read()
        assert mpimg.imread(os.path.join(rep, f"{name}.png")).ndim == 3
    conv = imp.convergence()
    table = page[page.index("<div id='rhat'>"):]
    table = table[:table.index("</div>")]
    assert table.count("<tr") == len(conv) + 1  # header and one row per statistic
    for r in conv.itertuples():
        assert f"<td>{r.statistic}</td>" in table
        assert f"{r.rhat:.3f}" in table
    assert f"seed</td>\n      <td>{imp.seed}" in page
    # the report does not disturb reading the imputations
    back = dd.read_parquet(out)
    assert len(back) == M * len(df) and "imputation" in back.columns


def test_cli_diagnose_refuses_missing_or_incomplete_output(run, tmp_path, capsys):
    df, ddf, imp, out = run
    code, _, stderr = _run("diagnose", str(tmp_path / "nothing"), capsys=capsys)
    assert code == 2 and "not a complete dmice output" in stderr
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    os.remove(broken / "_SUCCESS")
    shutil.rmtree(broken / "_diagnostics", ignore_errors=True)
    code, _, stderr = _run("diagnose", str(broken), capsys=capsys)
    assert code == 2 and "_SUCCESS" in stderr
    assert not (broken / "_diagnostics").exists()


def test_output_without_stored_distributions(run, tmp_path):
    pytest.importorskip("matplotlib")
    df, ddf, imp, out = run
    plain = str(tmp_path / "plain")
    imp.to_parquet(plain, distributions=False)
    again = dmice.open(plain)
    with pytest.raises(OutputError, match="no stored distributions"):
        again.plot_densities()
    with pytest.raises(OutputError, match="no stored missing-data pattern"):
        dmice.md_pattern(again)
    from dmice.report import build_report

    written = build_report(plain, variables=["x"])
    assert set(written) == {"trace", "report"}
    page = open(written["report"]).read()
    assert page.count("not drawn:") == 2 and page.count("data:image/png") == 1


def test_report_of_complete_data_draws_the_pattern_only(cluster_client, tmp_path):
    pytest.importorskip("matplotlib")
    from dmice.report import build_report

    df = pd.DataFrame({"a": np.arange(50.0), "b": np.arange(50) % 3})
    out = str(tmp_path / "complete")
    dmice.impute(df, m=1, max_iter=1, seed=1).to_parquet(out)
    pat = dmice.md_pattern(dmice.open(out))
    assert pat["count"].tolist() == [50, 50] and pat.loc["total", "n_missing"] == 0
    written = build_report(out)
    assert set(written) == {"pattern", "report"}
    assert open(written["report"]).read().count("not drawn:") == 2
