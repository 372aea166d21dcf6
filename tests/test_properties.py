"""Property tests over random schemas: every input either imputes correctly or is refused clearly.

Random frames are written as one Parquet file per partition (as per-site extracts are) and read back
with ``dd.read_parquet``: numeric and nullable dtypes, categories that differ per file, empty files,
constant and one-level columns, extreme values, unicode names.  For each, ``dmice.impute`` must either
return imputations in which every missing cell holds a valid value of its column's dtype and every
observed cell is unchanged, or raise :class:`dmice.errors.InputError` naming a column; never another
exception, a hang or a missing cell.  Examples are derandomized so that CI runs the same ones.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmice
from dmice.errors import InputError

pytestmark = pytest.mark.timeout(900)

NAMES = ["x", "größe", "体重", "a b", "x.y", "Ω_1", "1st", "b"]
KINDS = ["float", "Float64", "Int64", "intnan", "boolean", "category", "ordered", "string", "pyarrow",
         "constant", "onelevel", "extreme"]
SECRET_FLOAT = 98765.4321  # a value that must never appear in an error message


@st.composite
def frames(draw):
    """``(parts, kinds)``: the pandas frames of each file and each column's kind."""
    k = draw(st.integers(1, 4))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=k, max_size=k, unique=True))
    kinds = {n: draw(st.sampled_from(KINDS)) for n in names}
    if all(kinds[n] in ("constant", "onelevel") for n in names):
        kinds["x0"] = "float"  # something to predict with
    sizes = draw(st.lists(st.integers(0, 60), min_size=1, max_size=4).filter(lambda s: sum(s) >= 20))
    seed = draw(st.integers(0, 2**31 - 1))
    frac = draw(st.sampled_from([0.0, 0.1, 0.3, 0.7]))
    g = np.random.default_rng(seed)
    parts = []
    for i, n in enumerate(sizes):
        cols = {}
        for name, kind in kinds.items():
            cols[name] = _column(kind, n, i, g)
        df = pd.DataFrame(cols)
        for name in kinds:
            hole = g.random(n) < frac
            if hole.any():
                df.loc[hole, name] = None
        parts.append(df)
    return parts, kinds


def _column(kind: str, n: int, part: int, g: np.random.Generator) -> pd.Series:
    if kind == "float":
        return pd.Series(g.normal(size=n))
    if kind == "extreme":
        v = g.normal(size=n) * g.choice([1e-300, 1.0, 1e150, 1e200], n)
        return pd.Series(v)
    if kind == "Float64":
        return pd.Series(g.normal(size=n), dtype="Float64")
    if kind == "Int64":
        return pd.Series(g.integers(0, 7, n), dtype="Int64")
    if kind == "intnan":
        return pd.Series(g.integers(0, 5, n).astype(float))
    if kind == "boolean":
        return pd.Series(g.random(n) < 0.4, dtype="boolean")
    if kind in ("category", "ordered"):
        # each file knows its own set of levels (as per-site extracts do)
        levels = ["a", "b", "c", "d"][: 2 + part % 3]
        return pd.Series(pd.Categorical(g.choice(levels, n), categories=levels, ordered=kind == "ordered"))
    if kind == "string":
        return pd.Series(g.choice(["u", "v", "ü"], n), dtype=object)
    if kind == "pyarrow":
        return pd.Series(g.choice(["p", "q"], n), dtype="string[pyarrow]")
    if kind == "constant":
        return pd.Series(np.full(n, 3.0))
    if kind == "onelevel":
        return pd.Series(np.full(n, "only", dtype=object))
    raise AssertionError(kind)


def _missing(s: pd.Series) -> np.ndarray:
    return np.asarray(s.isna(), dtype=bool)


def _valid(kind: str, s: pd.Series, observed: pd.Series) -> bool:
    """Whether the imputed values ``s`` are valid values of the column (``observed``: its observed
    values over all files)."""
    if len(s) == 0:
        return True
    if kind in ("float", "Float64", "extreme", "intnan", "constant"):
        v = np.asarray(s, dtype=float)
        if not np.isfinite(v).all():
            return False
        if kind == "intnan":
            return bool((v == np.round(v)).all())
        return True
    if kind == "Int64":
        return str(s.dtype) == "Int64"
    if kind == "boolean":
        return set(s.astype(object)) <= {True, False}
    return set(s.astype(object)) <= set(observed.dropna().astype(object))


@settings(max_examples=int(os.environ.get("DMICE_PROPERTY_EXAMPLES", "20")), deadline=None,
          derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=frames())
def test_random_schema_imputes_or_names_a_column(cluster_client, data):
    import dask.dataframe as dd

    parts, kinds = data
    with tempfile.TemporaryDirectory() as tmp:
        for i, df in enumerate(parts):
            df.to_parquet(os.path.join(tmp, f"site-{i}.parquet"), index=False)
        ddf = dd.read_parquet(tmp)
        full = pd.concat(parts, ignore_index=True)
        try:
            imp = dmice.impute(ddf, m=2, max_iter=2, seed=4, progress=False)
        except InputError as e:
            msg = str(e)
            assert any(repr(n) in msg or n in msg for n in kinds), f"no column named in: {msg}"
            assert str(SECRET_FLOAT) not in msg
            return
        with imp:
            for k in (1, 2):
                out = imp.complete(k).compute().reset_index(drop=True)
                assert list(out.columns) == list(full.columns)
                assert len(out) == len(full)
                for name, kind in kinds.items():
                    before, after = full[name], out[name]
                    miss = _missing(before)
                    assert not _missing(after).any(), f"missing cells left in {name!r} ({kind})"
                    obs = ~miss
                    a = after[obs].reset_index(drop=True).astype(object)
                    b = before[obs].reset_index(drop=True).astype(object)
                    assert a.equals(b) or all(_same(x, y) for x, y in zip(a, b)), \
                        f"observed cells of {name!r} ({kind}) changed"
                    assert _valid(kind, after[miss], before[obs]), f"invalid imputed values in {name!r}"


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y
