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
            # open-ended first and last bins; no finite edge at the smallest or largest value
            edges = d["edges"]
            assert edges[0] == -np.inf and edges[-1] == np.inf
            full = np.concatenate([[-1e308], edges[1:-1], [1e308]])
            obs = df[name].to_numpy(dtype=float)[~miss]
            np.testing.assert_array_equal(d["observed"], np.histogram(obs, bins=full)[0])
            every = [obs]
            for k, comp in enumerate(completed):
                vals = comp[name].to_numpy(dtype=float)
                np.testing.assert_array_equal(vals[~miss], obs)  # observed cells kept
                np.testing.assert_array_equal(d["imputed"][k], np.histogram(vals[miss], bins=full)[0])
                every.append(vals[miss])
            every = np.concatenate(every)
            assert every.min() not in edges and every.max() not in edges
        else:
            levels = d["levels"]
            np.testing.assert_array_equal(d["observed"], _levels_counts(df[name][~miss], levels))
            for k, comp in enumerate(completed):
                np.testing.assert_array_equal(d["imputed"][k],
                                              _levels_counts(comp[name][miss].astype(object), levels))
        assert d["observed"].sum() == (~miss).sum()
        assert (d["imputed"].sum(axis=1) == miss.sum()).all()
        for row in [d["observed"], *d["imputed"]]:  # the small-cell rule
            assert ((row == 0) | (row >= 10)).all()


def test_distributions_in_memory_equal_numpy_histograms(run):
    df, ddf, imp, out = run
    dist = plots.distributions(imp, bins=25)
    assert list(dist) == ["x", "z", "c", "s", "u"]
    assert dist["x"]["kind"] == "continuous" and 8 <= len(dist["x"]["edges"]) <= 25 + 3
    assert dist["z"]["levels"] == ["0", "1"] and dist["c"]["levels"] == ["a", "b", "c"]
    completed = [imp.complete(k).compute() for k in range(1, M + 1)]
    _check_against_completed(dist, df, completed)
    # norm imputations of u go beyond the observed range (0, 1): the open-ended bins hold them
    u = dist["u"]
    assert u["edges"][1] >= 0 and u["edges"][-2] <= 1.01
    miss = df["u"].isna().to_numpy()
    vals = [c["u"].to_numpy(dtype=float)[miss] for c in completed]
    assert all((v < 0).sum() > 0 for v in vals)
    assert [int((v < u["edges"][1]).sum()) for v in vals] == u["imputed"][:, 0].tolist()


def test_grid_edges_are_round_and_inside_the_extremes():
    from dmice import disclosure

    x = np.arange(75.0, 183.0)  # integers 75..182
    g = disclosure.grid(disclosure.extremes(x, 10), 10, 40, integer=True)
    e = disclosure.inner_edges(g)
    # the 10th smallest (84) and largest (173) values, rounded outward to a grid of width 5
    # with edges at half-integers: a whole number of values per bin
    assert g["width"] == 5 and e[0] == 79.5 and e[-1] == 174.5
    assert set(np.histogram(x, bins=e)[0]) == {5}
    g = disclosure.grid(disclosure.extremes(np.array([0.1234, *np.linspace(3.0, 7.0, 50), 9.87]), 10),
                        10, 40, integer=False)
    e = disclosure.inner_edges(g)
    assert g["width"] == 0.1 and e[0] == 3.6 and 6.3 < e[-1] <= 6.5
    g = disclosure.grid(disclosure.extremes(np.full(30, 4.0), 10), 10, 2, integer=True)
    assert g["width"] == 1 and disclosure.inner_edges(g).tolist() == [3.5, 4.5]
    # open-ended bins: values outside the grid are counted in the first and last
    assert disclosure.bin_counts(np.array([-5.0, 3.5, 4.0, 4.5, 99.0]), np.array([3.5, 4.5])).tolist() == \
        [1, 2, 2]


def test_distributions_of_opened_output_equal_numpy_histograms(run):
    df, ddf, imp, out = run
    again = dmice.open(out)
    completed = [again.complete(k).compute() for k in range(1, M + 1)]
    for bins in (7, 40, 120):
        dist = plots.distributions(again, bins=bins)
        assert len(dist["x"]["edges"]) <= bins + 3
        _check_against_completed(dist, df, completed)
        # the same counts as in memory
        mem = plots.distributions(imp, bins=bins)
        for name in dist:
            np.testing.assert_array_equal(dist[name]["observed"], mem[name]["observed"])
            np.testing.assert_array_equal(dist[name]["imputed"], mem[name]["imputed"])
            if name in ("x", "u"):
                np.testing.assert_array_equal(dist[name]["edges"], mem[name]["edges"])
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
