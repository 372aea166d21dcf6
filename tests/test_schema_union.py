"""One schema across partitions: per-site Parquet files whose categorical columns carry different
category sets (or orders), string columns whose levels differ per file, empty partitions and
nullable dtypes are imputed with every missing cell filled and one dtype in every partition; a
missing cell left in an imputed column is caught when writing and by ``verify``."""

from __future__ import annotations

import json
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dmice
from dmice import schema as S
from dmice.cli import main
from dmice.errors import InputError, OutputError


def write_sites(d: Path, cats: list[list[str]], ordered: bool = False, n: int = 400, seed: int = 0,
                strings: bool = False) -> Path:
    """One Parquet file per site; column ``g`` holds each site's own categories (or strings)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, c in enumerate(cats):
        x = rng.normal(size=n)
        codes = rng.integers(0, len(c), n)
        g = pd.Categorical(np.asarray(c, dtype=object)[codes], categories=c, ordered=ordered)
        df = pd.DataFrame({"x": x + codes, "g": g if not strings else np.asarray(g, dtype=object)})
        df.loc[rng.random(n) < 0.3, "g"] = None
        df.loc[rng.random(n) < 0.2, "x"] = np.nan
        df.to_parquet(d / f"site-{i}.parquet")
    return d


def _check_complete(imp, column: str, categories: list[str] | None, ordered: bool = False) -> None:
    """Every imputation: no missing value in ``column``, one dtype in every partition."""
    for k in range(1, imp.m + 1):
        ddf = imp.complete(k)
        parts = [p.compute() for p in ddf.to_delayed()]
        for p in parts:
            assert p[column].isna().sum() == 0
            if categories is not None:
                assert list(p[column].cat.categories) == categories
                assert p[column].cat.ordered == ordered
        whole = ddf.compute()
        assert whole[column].isna().sum() == 0


def test_categories_differ_per_site(cluster_client, tmp_path):
    inp = write_sites(tmp_path / "in", [["a", "b"], ["a", "b", "c"]])
    ddf = dd.read_parquet(str(inp))
    imp = dmice.impute(ddf, m=3, max_iter=2, seed=1)
    var = imp.schema["g"]
    assert var.categories == ["a", "b", "c"] and var.levels == ["a", "b", "c"]
    _check_complete(imp, "g", ["a", "b", "c"])
    # the dask meta of a completed set knows the categories
    assert list(imp.complete(1)._meta["g"].cat.categories) == ["a", "b", "c"]
    # imputed values in site 0 can be the level only site 1 has: the model is the pooled one
    out = imp.to_parquet(str(tmp_path / "out"))
    back = dmice.open(out)
    _check_complete(back, "g", ["a", "b", "c"])
    assert main(["verify", out]) == 0


def test_ordered_categories_in_compatible_orders(cluster_client, tmp_path):
    inp = write_sites(tmp_path / "in", [["lo", "hi"], ["lo", "mid", "hi"]], ordered=True)
    imp = dmice.impute(dd.read_parquet(str(inp)), m=2, max_iter=2, seed=2)
    assert imp.schema["g"].categories == ["lo", "mid", "hi"] and imp.schema["g"].ordered
    assert imp.method["g"] == "polr"
    _check_complete(imp, "g", ["lo", "mid", "hi"], ordered=True)


def test_ordered_categories_in_conflicting_orders_are_refused(cluster_client, tmp_path):
    inp = write_sites(tmp_path / "in", [["lo", "hi"], ["hi", "lo"]], ordered=True)
    with pytest.raises(InputError, match="column 'g'.*order"):
        dmice.impute(dd.read_parquet(str(inp)), m=2, max_iter=1, seed=2)


def test_ordered_and_unordered_partitions_are_refused():
    a = S.summarize_partition(pd.DataFrame({"g": pd.Categorical(["a", "b"], ordered=True)}))
    b = S.summarize_partition(pd.DataFrame({"g": pd.Categorical(["a", "b"], ordered=False)}))
    with pytest.raises(InputError, match="column 'g'"):
        S.combine_summaries([a, b], pd.Series({"g": pd.CategoricalDtype()}))


def test_union_of_orders():
    assert S.union_order([["a", "c"], ["a", "b", "c"], ["c", "d"]], "g") == ["a", "b", "c", "d"]
    assert S.union_order([["a", "b"], ["a", "b"]], "g") == ["a", "b"]
    with pytest.raises(InputError, match="'g'"):
        S.union_order([["a", "b"], ["b", "a"]], "g")
    with pytest.raises(InputError, match="'g'"):  # no order between b and c
        S.union_order([["a", "b"], ["a", "c"]], "g")


def test_string_levels_differ_per_site(cluster_client, tmp_path):
    inp = write_sites(tmp_path / "in", [["a", "b"], ["a", "b", "c"], ["b", "c", "d"]], strings=True)
    ddf = dd.read_parquet(str(inp))
    imp = dmice.impute(ddf, m=2, max_iter=2, seed=3)
    for k in (1, 2):
        d = imp.complete(k).compute()
        assert d["g"].isna().sum() == 0
        assert set(d["g"]) <= {"a", "b", "c", "d"}
        assert all(isinstance(v, str) for v in d["g"])


def _job(path: Path, inp: Path, out: Path, layout: str) -> Path:
    path.write_text(f'version: 1\ninput: {{url: "{inp}", format: parquet}}\n'
                    f'output: {{url: "{out}", layout: {layout}}}\n'
                    "imputation: {m: 3, max_iter: 2, seed: 5}\n")
    return path


@pytest.mark.parametrize("layout", ["full", "cells"])
def test_job_with_categories_differing_per_file(cluster_client, tmp_path, layout):
    inp = write_sites(tmp_path / "in", [["a", "b"], ["a", "b", "c"]])
    out = tmp_path / "out"
    assert main(["run", str(_job(tmp_path / "job.yaml", inp, out, layout))]) == 0
    assert main(["verify", str(out)]) == 0
    imp = dmice.open(str(out))
    _check_complete(imp, "g", ["a", "b", "c"])


def test_empty_partition_and_nullable_dtypes(cluster_client):
    rng = np.random.default_rng(4)
    n = 600
    df = pd.DataFrame({
        "i": pd.array(rng.integers(0, 50, n), dtype="Int64"),
        "f": pd.array(rng.normal(size=n), dtype="Float64"),
        "b": pd.array(rng.random(n) < 0.4, dtype="boolean"),
        "s": pd.array(rng.choice(["u", "v", "w"], n), dtype="string[pyarrow]"),
    })
    for c in df.columns:
        df.loc[rng.random(n) < 0.2, c] = pd.NA
    ddf = dd.from_pandas(df, npartitions=3, sort=False)
    ddf = dd.from_delayed([ddf.to_delayed()[0], ddf.head(0, compute=False).to_delayed()[0],
                           *ddf.to_delayed()[1:]], meta=ddf._meta, verify_meta=False)
    imp = dmice.impute(ddf, m=2, max_iter=2, seed=6)
    for k in (1, 2):
        d = imp.complete(k).compute()
        assert d.isna().sum().sum() == 0
        assert {c: str(t) for c, t in d.dtypes.items()} == {c: str(t) for c, t in df.dtypes.items()}
        obs = df.notna()
        for c in df.columns:
            assert (d[c].reset_index(drop=True)[obs[c]] == df[c][obs[c]]).all()


# ---------------------------------------------------------------------------------------------
# a missing cell left in an imputed column: caught when writing and by verify


def _leave_holes(imp):
    """Corrupt the resident chains: the first imputed cells of 'x' become NaN (a stand-in for
    any bug that leaves imputed cells missing)."""
    from dmice import block as B

    eng = imp._engine
    j = imp.schema.index("x")

    def corrupt(b):
        imp_ = dict(b.imp)
        a = imp_[j].copy()
        a[:, :3] = np.nan
        imp_[j] = a
        from dataclasses import replace

        return replace(b, imp=imp_)

    eng.blocks = [eng.client.submit(corrupt, b, pure=False) for b in eng.blocks]
    return B


def test_writer_refuses_missing_imputed_cells(cluster_client, tmp_path):
    df = pd.DataFrame({"x": np.r_[np.nan, np.arange(1.0, 200.0)], "y": np.arange(200.0) % 7})
    imp = dmice.impute(df, m=2, max_iter=1, seed=1)
    _leave_holes(imp)
    with pytest.raises(OutputError, match="column 'x'.*missing"):
        imp.to_parquet(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.parametrize("layout", ["full", "cells"])
def test_verify_detects_missing_imputed_cells(cluster_client, tmp_path, layout):
    """An output whose files match their checksums but hold missing values in imputed cells (as
    the per-site categories left them) fails verification with exit 4."""
    inp = write_sites(tmp_path / "in", [["a", "b"], ["a", "b", "c"]])
    out = tmp_path / "out"
    assert main(["run", str(_job(tmp_path / "job.yaml", inp, out, layout))]) == 0
    pointer = json.loads((out / "_SUCCESS").read_text())
    man_path = out / pointer["manifest"]
    man = json.loads(man_path.read_text())
    # rewrite one data file with holes in g, and its manifest entry and the pointer to match
    import hashlib

    import pyarrow.parquet as pq

    f = man["files"][0]
    t = pq.read_table(out / f["path"]).to_pandas()
    col = "g" if layout == "full" else "value"
    s = t[col].copy()
    s.iloc[:5] = None
    t[col] = s
    t.to_parquet(out / f["path"])
    data = (out / f["path"]).read_bytes()
    f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    raw = json.dumps(man, indent=1).encode()
    man_path.write_bytes(raw)
    pointer["sha256"] = hashlib.sha256(raw).hexdigest()
    (out / "_SUCCESS").write_text(json.dumps(pointer))
    assert main(["verify", str(out)]) == 4
