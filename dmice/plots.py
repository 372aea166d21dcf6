"""Diagnostic plots (mice's ``plot(imp)``, ``densityplot``, ``md.pattern``) and the summaries behind them.

Every figure is drawn from small summaries computed on the cluster, never from the
data brought to the client:

* trace plots from the chain statistics gathered during the run
  (:attr:`MultipleImputation.chain_stats`);
* density plots from binned counts: each partition computes, for every variable, a
  histogram of its observed cells and of its imputed cells in each imputation (level
  counts for categorical variables); the client sums them.  Bin edges lie on a grid of
  round numbers spanning the ``min_cell_count``-th smallest to the ``min_cell_count``-th
  largest observed value (found by a reduction on the cluster: only the rounded grid
  reaches the client), with open-ended first and last bins; then the small-cell rule of
  :mod:`dmice.disclosure` merges bins and levels until every count is 0 or at least
  ``min_cell_count`` and leaves rare levels unnamed;
* the missing-data pattern from per-partition counts of the distinct rows of the
  missingness mask, summed on the client.

A cell is imputed exactly when it is missing in the input.  An opened output no longer
has the input, so :meth:`MultipleImputation.to_parquet` computes these summaries while
the input is still at hand and stores them in the manifest (``"distributions"``, on a
grid of at most about :data:`STORED_BINS` bins, and ``"missing_pattern"``): opening and
plotting a written output then needs no pass over the data at all.  Fewer bins are drawn
by merging adjacent stored bins exactly, in memory and from disk alike.

matplotlib is imported only when a figure is drawn (``pip install 'dmice[plots]'``);
figures are plain :class:`matplotlib.figure.Figure` objects, not registered with pyplot,
so they work on any backend, Agg included.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from dmice import disclosure
from dmice.errors import InputError, OutputError

#: mice's colours (``mdc(1)``, ``mdc(2)``): observed blue, imputed red
OBSERVED = "#006CC2"
IMPUTED = "#B61A51"
#: histogram resolution stored with a written output; displayed bins must divide it
STORED_BINS = 120
DEFAULT_BINS = 40
#: missing-data patterns kept in the manifest (the most frequent ones)
STORED_PATTERNS = 500
#: levels of one categorical variable shown in a trace plot (the most frequent ones)
MAX_TRACE_LEVELS = 8
CONTINUOUS = "continuous"


def _mpl() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("dmice plots need matplotlib: install the `plots` extra, "
                          "pip install 'dmice[plots]'") from e
    return matplotlib, Figure


def _compute(*tasks: Any) -> tuple[Any, ...]:
    """Compute dask tasks on the active client (or dask's default scheduler)."""
    from dmice.runtime.passes import compute

    return compute(None, *tasks)


# ---------------------------------------------------------------------------
# per-partition kernels (pandas/numpy only; run inside tasks)


def _cont_values(s: pd.Series) -> np.ndarray:
    return s.to_numpy(dtype=np.float64, na_value=np.nan)


def _partition_first(df: pd.DataFrame, cont: list[str], k: int, patterns: bool) -> dict[str, Any]:
    """First pass, over the input only: the ``k`` smallest and largest observed values of each of
    ``cont`` (reduced on the cluster to a grid, see :func:`_grids`), missingness patterns."""
    return {"extremes": [disclosure.extremes(_cont_values(df[name]), k) for name in cont],
            "patterns": _partition_patterns(df) if patterns else None}


def _merge_extremes(a: list[Any], b: list[Any], k: int) -> list[Any]:
    return [disclosure.merge_extremes(x, y, k) for x, y in zip(a, b)]


def _grids(ext: list[Any], k: int, bins: int, integer: list[bool]) -> list[dict[str, Any]]:
    """Task: the histogram grid of each variable from its reduced extremes."""
    return [disclosure.grid(e, k, bins, i) for e, i in zip(ext, integer)]


def _tree(items: list[Any], func: Any, *args: Any) -> Any:
    """Pairwise reduction of delayed ``items`` by ``func`` (tasks on the cluster)."""
    from dask import delayed

    while len(items) > 1:
        items = [delayed(func)(items[i], items[i + 1], *args) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _label(v: Any) -> str:
    """Label of a level: integer-valued floats without their ``.0`` (a 0/1 column reads as 0.0/1.0)."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _level_counts(s: pd.Series) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in s.dropna().value_counts(sort=False).items():
        if v:
            out[_label(k)] = out.get(_label(k), 0) + int(v)
    return out


def _partition_hist(df: pd.DataFrame, frames: list[pd.DataFrame], cont: dict[str, np.ndarray],
                    cat: list[str]) -> dict[str, Any]:
    """Counts of the observed cells (``df``) and of the imputed cells of each completed frame:
    in the open-ended bins of the finite edges ``cont[name]`` for continuous variables, per
    level for the others."""
    out: dict[str, Any] = {}
    for name, edges in cont.items():
        miss = df[name].isna().to_numpy(dtype=bool)
        obs = disclosure.bin_counts(_cont_values(df[name])[~miss], edges)
        imp = np.zeros((len(frames), len(edges) + 1), dtype=np.int64)
        for k, f in enumerate(frames):
            imp[k] = disclosure.bin_counts(_cont_values(f[name])[miss], edges)
        out[name] = (obs, imp)
    for name in cat:
        miss = df[name].isna().to_numpy(dtype=bool)
        out[name] = (_level_counts(df[name][~miss]), [_level_counts(f[name][miss]) for f in frames])
    return out


def _partition_patterns(df: pd.DataFrame) -> dict[tuple[int, ...], int]:
    """Row counts of each distinct missingness pattern, keyed by the positions of the missing columns."""
    n = len(df)
    if not n:
        return {}
    mask = df.isna().to_numpy(dtype=bool)
    idx = np.nonzero(mask.any(axis=0))[0]
    if not len(idx):
        return {(): n}
    packed = np.packbits(mask[:, idx], axis=1)
    uniq, counts = np.unique(packed, axis=0, return_counts=True)
    out = {}
    for row, c in zip(uniq, counts):
        bits = np.unpackbits(row)[:len(idx)].astype(bool)
        out[tuple(int(i) for i in idx[bits])] = int(c)
    return out


# ---------------------------------------------------------------------------
# missing-data pattern


def _as_dask(data: Any) -> Any:
    import dask.dataframe as dd

    if isinstance(data, dd.DataFrame):
        return data
    if isinstance(data, pd.DataFrame):
        from dmice.runtime.passes import from_pandas

        return from_pandas(data)
    raise InputError(f"data must be a dask or pandas DataFrame or a MultipleImputation, "
                     f"got {type(data).__name__}")


def _pattern_counts(ddf: Any) -> tuple[list[str], dict[tuple[int, ...], int]]:
    from dask import delayed

    columns = [str(c) for c in ddf.columns]
    parts = _compute(*[delayed(_partition_patterns)(p) for p in ddf.to_delayed()])
    return columns, _sum_patterns(parts)


def _sum_patterns(parts: list[dict[tuple[int, ...], int]]) -> dict[tuple[int, ...], int]:
    total: dict[tuple[int, ...], int] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def _pattern_frame(columns: list[str], counts: dict[tuple[int, ...], int]) -> pd.DataFrame:
    """R's md.pattern layout from pattern counts keyed by missing column positions."""
    p = len(columns)
    keys = list(counts)
    mat = np.zeros((len(keys), p), dtype=np.int64)  # 1 = missing
    for r, k in enumerate(keys):
        mat[r, list(k)] = 1
    cnt = np.array([counts[k] for k in keys], dtype=np.int64)
    nmis = (mat * cnt[:, None]).sum(axis=0)
    order = np.argsort(nmis, kind="stable")  # columns by number of missing values
    mat, nmis = mat[:, order], nmis[order]
    names = [columns[i] for i in order]
    pat = ["".join(map(str, row)) for row in mat]
    rows = sorted(range(len(keys)), key=lambda r: pat[r])  # rows by their pattern string, as R
    obs = 1 - mat[rows]
    frame = pd.DataFrame(obs, columns=names)
    frame.insert(0, "count", cnt[rows])
    frame["n_missing"] = mat[rows].sum(axis=1)
    total = pd.DataFrame([[int(cnt.sum()), *nmis.tolist(), int(nmis.sum())]], columns=frame.columns,
                         index=["total"])
    return pd.concat([frame, total])


def md_pattern(data: Any) -> pd.DataFrame:
    """Missing-data patterns (R mice's ``md.pattern``), counted in one distributed pass.

    Parameters
    ----------
    data : dask.dataframe.DataFrame, pandas.DataFrame or MultipleImputation
        The incomplete data.  For a result read with :func:`dmice.open`, the pattern
        stored in its manifest at write time (at most the :data:`STORED_PATTERNS` most
        frequent patterns, with the exact per-variable totals).

    Returns
    -------
    pandas.DataFrame
        One row per distinct pattern, sorted as R does: ``count`` (rows with the
        pattern), one column per variable in increasing order of missing values
        (1 observed, 0 missing) and ``n_missing`` (variables missing in the pattern).
        The last row, labelled ``"total"``, holds the number of rows, the missing values
        of each variable and the total number of missing cells.
    """
    import dask.dataframe as dd

    # a MultipleImputation (recognised by what it has: plots sit beside dmice.result and do
    # not import it)
    if not isinstance(data, (pd.DataFrame, dd.DataFrame)) and hasattr(data, "manifest") \
            and hasattr(data, "imputed_columns"):
        if data._engine is not None:
            return md_pattern(data._ddf)
        stored = (data.manifest or {}).get("missing_pattern")
        if stored is None:
            raise OutputError(f"{data.url!r} has no stored missing-data pattern (written by an older "
                              "dmice or with distributions=False)")
        return _stored_pattern_frame(stored)
    ddf = _as_dask(data)
    columns, counts = _pattern_counts(ddf)
    return _pattern_frame(columns, counts)


def _stored_pattern(columns: list[str], counts: dict[tuple[int, ...], int]) -> dict[str, Any]:
    nmis = np.zeros(len(columns), dtype=np.int64)
    for k, c in counts.items():
        nmis[list(k)] += c
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:STORED_PATTERNS]
    return {"columns": columns, "n_missing": nmis.tolist(), "n_rows": int(sum(counts.values())),
            "n_patterns": len(counts),
            "patterns": [[list(k), c] for k, c in top]}


def _stored_pattern_frame(stored: dict[str, Any]) -> pd.DataFrame:
    columns = stored["columns"]
    frame = _pattern_frame(columns, {tuple(k): c for k, c in stored["patterns"]})
    # totals are exact even when rare patterns were left out
    nmis = dict(zip(columns, stored["n_missing"]))
    frame.loc["total", "count"] = stored["n_rows"]
    for c in columns:
        frame.loc["total", c] = nmis[c]
    frame.loc["total", "n_missing"] = int(sum(stored["n_missing"]))
    frame.attrs["n_patterns"] = stored["n_patterns"]
    return frame


# ---------------------------------------------------------------------------
# observed and imputed distributions


def _kinds(imp: Any) -> dict[str, tuple[str, list[str] | None, bool]]:
    """Kind, level labels and whether the levels are ordered, of each column, from the schema or
    the manifest."""
    if imp.schema is not None:
        return {v.name: (v.kind, None if v.levels is None else [_label(x) for x in v.levels], v.ordered)
                for v in imp.schema.variables}
    out = {}
    for v in (imp.manifest or {}).get("variables", []):
        out[v["name"]] = (v["kind"], None if v.get("levels") is None else [_label(x) for x in v["levels"]],
                          bool(v.get("ordered")))
    return out


def min_cell_count(imp: Any) -> int:
    """The small-cell threshold of a result: recorded at :func:`dmice.impute` (and in the
    manifest), else the default."""
    t = (imp.parameters or {}).get("min_cell_count") or (imp.manifest or {}).get("min_cell_count")
    return int(t) if t else disclosure.MIN_CELL_COUNT


def _select(imp: Any, variables: list[str] | str | None) -> list[str]:
    if variables is None:
        return imp.imputed_columns
    if isinstance(variables, str):
        variables = [variables]
    for v in variables:
        if v not in imp.columns:
            raise InputError(f"variables names unknown column {v!r}")
        if v not in imp.imputed_columns:
            raise InputError(f"variables names column {v!r}, which was not imputed")
    return list(variables)


def _order_levels(levels: list[str] | None, *counts: dict[str, int]) -> list[str]:
    seen = set().union(*[set(c) for c in counts])
    known = list(levels or [])
    return known + sorted(seen - set(known))


def _safe_continuous(obs: np.ndarray, imp: np.ndarray, inner: np.ndarray, g: dict[str, Any],
                     t: int) -> dict[str, Any]:
    """The small-cell rule on the open-ended bins of one continuous variable."""
    rows = np.vstack([obs[None, :], imp]).astype(np.int64)
    act = disclosure.active_rows(rows, t)
    groups = disclosure.merge_runs(rows[act], t) if act.any() else [(0, rows.shape[1])]
    full = np.concatenate([[-np.inf], inner, [np.inf]])
    edges = np.array([full[a] for a, _ in groups] + [np.inf])
    merged = np.stack([rows[:, a:b].sum(axis=1) for a, b in groups], axis=1)
    return {"kind": CONTINUOUS, "edges": edges, "grid": g,
            "observed": merged[0] if act[0] else None,
            "imputed": merged[1:] if act[1:].all() else None}


def _safe_categorical(labels: list[str], obs: dict[str, int], imp: list[dict[str, int]], t: int,
                      ordered: bool) -> dict[str, Any]:
    """The small-cell rule on the level counts of one categorical variable: levels observed
    fewer than ``t`` times are not named, and small counts are merged."""
    rows = np.array([[obs.get(lev, 0) for lev in labels]] + [[d.get(lev, 0) for lev in labels] for d in imp],
                    dtype=np.int64).reshape(1 + len(imp), len(labels))
    act = disclosure.active_rows(rows, t)
    rare = [int(c) < t for c in rows[0]]
    names, members = disclosure.merge_levels(labels, rows[act], t, ordered, rare)
    merged = np.stack([rows[:, g].sum(axis=1) for g in members], axis=1) if members else \
        np.zeros((rows.shape[0], 0), dtype=np.int64)
    return {"kind": "categorical", "levels": names,
            "observed": merged[0] if act[0] else None,
            "imputed": merged[1:] if act[1:].all() else None}


def _compute_distributions(imp: Any, variables: list[str], bins: int, patterns: bool = False
                           ) -> tuple[dict[str, dict[str, Any]], dict[tuple[int, ...], int] | None]:
    """Observed and imputed counts of each variable (and the missingness patterns of the input),
    safe to write (:mod:`dmice.disclosure`).

    A first pass over the input reduces the ``min_cell_count`` smallest and largest observed
    values of each continuous variable, on the cluster, to a grid of round numbers (and counts
    the patterns); a second pass over the completed data counts observed and imputed values in
    its open-ended bins (values outside the grid, e.g. of ``norm``, fall in the first or last).
    """
    from dask import delayed

    t = min_cell_count(imp)
    kinds = _kinds(imp)
    cont = [v for v in variables if kinds.get(v, ("",))[0] == CONTINUOUS]
    cat = [v for v in variables if v not in cont]
    integer = {v.name for v in imp.schema.variables if v.integer} if imp.schema is not None else set()
    parts = imp._ddf.to_delayed()
    frames = [imp.complete(k).to_delayed() for k in range(1, imp.m + 1)]
    per_part = [[f[i] for f in frames] for i in range(len(parts))]
    pattern_counts = None
    grids: list[dict[str, Any]] = []
    if (cont or patterns) and parts:
        first = [delayed(_partition_first)(p, cont, t, patterns) for p in parts]
        ext = _tree([f["extremes"] for f in first], _merge_extremes, t)
        grid_task = delayed(_grids)(ext, t, bins, [name in integer for name in cont])
        pats = [f["patterns"] for f in first] if patterns else []
        grids, *pats = _compute(grid_task, *pats)
        if patterns:
            pattern_counts = _sum_patterns(pats)
    if not variables:
        return {}, pattern_counts
    inner = {name: disclosure.inner_edges(g) for name, g in zip(cont, grids)}
    hists = _compute(*[delayed(_partition_hist)(p, fs, inner, cat) for p, fs in zip(parts, per_part)])
    out: dict[str, dict[str, Any]] = {}
    for name in variables:
        if name in inner:
            k = len(inner[name]) + 1
            obs = sum((h[name][0] for h in hists), np.zeros(k, dtype=np.int64))
            impc = sum((h[name][1] for h in hists), np.zeros((imp.m, k), dtype=np.int64))
            out[name] = _safe_continuous(obs, impc, inner[name], grids[cont.index(name)], t)
        else:
            obs_d: dict[str, int] = {}
            imp_d: list[dict[str, int]] = [{} for _ in range(imp.m)]
            for h in hists:
                o, ims = h[name]
                for key, c in o.items():
                    obs_d[key] = obs_d.get(key, 0) + c
                for acc, d in zip(imp_d, ims):
                    for key, c in d.items():
                        acc[key] = acc.get(key, 0) + c
            kind = kinds.get(name, ("", None, False))
            levels = _order_levels(kind[1], obs_d, *imp_d)
            out[name] = _safe_categorical(levels, obs_d, imp_d, t, kind[0] == "ordinal")
    return out, pattern_counts


def _coarsen(d: dict[str, Any], bins: int) -> dict[str, Any]:
    """Stored bins merged into about ``bins`` bins: from the left, a stored edge is kept when it
    lies at least ``f`` grid widths beyond the last kept one (``f`` the smallest factor giving at
    most ``bins`` grid bins); the first and last finite edges are always kept.  Merging cells
    that follow the small-cell rule keeps to it."""
    g = d["grid"]
    f = math.ceil(g["bins"] / bins)
    edges = d["edges"]
    inner = edges[1:-1]
    if f <= 1 or len(inner) <= 2:
        return d
    step = f * g["width"] * (1 - 1e-9)
    keep = [0]
    for i in range(1, len(inner) - 1):
        if inner[i] - inner[keep[-1]] >= step and inner[-1] - inner[i] >= step:
            keep.append(i)
    keep.append(len(inner) - 1)
    kept = inner[keep]
    cell = np.searchsorted(kept, edges[:-1], side="right")  # new cell of each stored cell

    def merge(counts: np.ndarray | None) -> np.ndarray | None:
        if counts is None:
            return None
        c = np.atleast_2d(counts)
        out = np.zeros((c.shape[0], len(kept) + 1), dtype=np.int64)
        for r in range(c.shape[0]):
            np.add.at(out[r], cell, c[r])
        return out if counts.ndim == 2 else out[0]

    return {**d, "edges": np.concatenate([[-np.inf], kept, [np.inf]]),
            "observed": merge(d["observed"]), "imputed": merge(d["imputed"])}


def _merge_bins(d: dict[str, Any], bins: int, name: str) -> dict[str, Any]:
    """Bins of an output written before the small-cell rule (equal bins between the extremes)."""
    stored = len(d["observed"])
    if bins == stored:
        return d
    if stored % bins:
        raise InputError(f"bins must divide {stored} for a result read from disk (its histograms of "
                         f"{name!r} were stored at write time with {stored} bins), got {bins}")
    f = stored // bins
    return {"kind": CONTINUOUS, "edges": d["edges"][::f],
            "observed": d["observed"].reshape(bins, f).sum(axis=1),
            "imputed": d["imputed"].reshape(d["imputed"].shape[0], bins, f).sum(axis=2)}


def distributions(imp: Any, variables: list[str] | str | None = None,
                  bins: int = DEFAULT_BINS) -> dict[str, dict[str, Any]]:
    """Binned counts of the observed and the imputed values of each imputed variable.

    Every count follows the small-cell rule of :mod:`dmice.disclosure` (with the result's
    ``min_cell_count``): it is 0 or at least ``min_cell_count``; levels observed fewer times
    are counted in a group ``"other (k levels)"``.

    Parameters
    ----------
    imp : MultipleImputation
        In memory (computed now, two passes over the completed data on the cluster) or
        read with :func:`dmice.open` (read from the manifest, stored at write time); both give
        the same counts.
    variables : list of str, optional
        Default: every imputed variable.
    bins : int, default 40
        At most about this many bins of a round width (integer-valued variables: edges at
        half-integers, a whole number of values per bin), between edges rounded outward from
        the ``min_cell_count``-th smallest and largest observed value, plus an open-ended
        first and last bin; adjacent bins with small counts are merged.

    Returns
    -------
    dict
        Per variable, ``kind`` (``"continuous"`` or ``"categorical"``), ``observed``
        (counts over the observed cells) and ``imputed`` (array m x bins or m x levels:
        counts over the imputed cells of each imputation), either None when its total is
        below ``min_cell_count``; plus ``edges`` (bins + 1, the first ``-inf`` and the last
        ``inf``) and ``grid`` for continuous variables or ``levels`` (labels) for
        categorical ones.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise InputError(f"bins must be an integer >= 1, got {bins!r}")
    names = _select(imp, variables)
    if imp._engine is not None:
        dist = _compute_distributions(imp, names, STORED_BINS)[0]
        return {k: (_coarsen(d, bins) if d["kind"] == CONTINUOUS else d) for k, d in dist.items()}
    stored = (imp.manifest or {}).get("distributions")
    if stored is None:
        raise OutputError(f"{imp.url!r} has no stored distributions of the imputed values (written by "
                          "an older dmice or with distributions=False); densities need to know which "
                          "cells were imputed, which only the input data tells")
    out = {}
    for name in names:
        d = stored["variables"].get(name)
        if d is None:
            raise OutputError(f"{imp.url!r} has no stored distribution of column {name!r}")
        obs = None if d["observed"] is None else np.asarray(d["observed"], dtype=np.int64)
        width = len(d["edges"]) - 1 if d["kind"] == CONTINUOUS else len(d["levels"])
        impc = None if d["imputed"] is None else \
            np.asarray(d["imputed"], dtype=np.int64).reshape(imp.m, width)
        if d["kind"] == CONTINUOUS and "grid" in d:
            edges = np.array([np.nan if e is None else e for e in d["edges"]], dtype=float)
            edges[0], edges[-1] = -np.inf, np.inf
            out[name] = _coarsen({"kind": CONTINUOUS, "edges": edges, "grid": d["grid"],
                                  "observed": obs, "imputed": impc}, bins)
        elif d["kind"] == CONTINUOUS:
            out[name] = _merge_bins({"kind": CONTINUOUS, "edges": np.asarray(d["edges"], dtype=float),
                                     "observed": obs, "imputed": impc}, bins, name)
        else:
            out[name] = {"kind": d["kind"], "levels": list(d["levels"]), "observed": obs, "imputed": impc}
    return out


def _json_edges(e: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(x) else float(x) for x in e]


def stored_summaries(imp: Any) -> dict[str, Any]:
    """What :meth:`MultipleImputation.to_parquet` keeps in the manifest for plotting an opened output:
    the distributions of every imputed variable on a grid of about :data:`STORED_BINS` bins and
    the missing-data pattern of the input (JSON-ready), following the small-cell rule."""
    dist, patterns = _compute_distributions(imp, imp.imputed_columns, STORED_BINS, patterns=True)
    enc = {}
    for name, d in dist.items():
        e = {"kind": d["kind"],
             "observed": None if d["observed"] is None else d["observed"].tolist(),
             "imputed": None if d["imputed"] is None else d["imputed"].tolist()}
        if d["kind"] == CONTINUOUS:
            e["edges"] = _json_edges(d["edges"])
            e["grid"] = d["grid"]
        else:
            e["levels"] = d["levels"]
        enc[name] = e
    return {"distributions": {"bins": STORED_BINS, "min_cell_count": min_cell_count(imp), "variables": enc},
            "missing_pattern": _stored_pattern(list(imp.columns), patterns or {})}


# ---------------------------------------------------------------------------
# figures


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def plot_trace(imp: Any, variables: list[str] | str | None = None) -> Any:
    """Trace plots of the chain statistics (mice's ``plot(imp)``).

    Continuous variables get two panels, the mean and the standard deviation of their
    imputed values against the iteration, one line per chain; categorical variables get
    one panel per level (at most :data:`MAX_TRACE_LEVELS`, the most frequent) with the
    proportion of imputed values in that level.  Chains that mix well overlap and show no
    trend.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _, Figure = _mpl()
    names = _select(imp, variables)
    cs = imp.chain_stats
    if cs.empty:
        raise InputError("no chain statistics to plot (the chained loop ran no iterations)")
    panels: list[tuple[str, str, pd.DataFrame]] = []  # (variable, title, chain x iteration)
    for name in names:
        g = cs[cs["variable"] == name]
        if g.empty:
            continue
        if "mean" in g and g["mean"].notna().any():
            for stat in ("mean", "sd"):
                panels.append((name, f"{name}: {stat}", g.pivot_table(index="chain", columns="iteration",
                                                                      values=stat)))
        else:
            gl = g[g["level"].notna()]
            means = gl.groupby("level", sort=False)["proportion"].mean()
            keep = set(means.sort_values(ascending=False).index[:MAX_TRACE_LEVELS])
            for lev in gl["level"].drop_duplicates():
                if lev in keep:
                    tab = gl[gl["level"] == lev].pivot_table(index="chain", columns="iteration",
                                                             values="proportion")
                    panels.append((name, f"{name}: P({lev})", tab))
    if not panels:
        raise InputError("no chain statistics for the selected variables")
    nrows, ncols = _grid(len(panels), 2)
    fig = Figure(figsize=(4.2 * ncols, 2.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (_, title, tab) in zip(axes, panels):
        for chain, row in tab.iterrows():
            ax.plot(row.index, row.to_numpy(), lw=1.2, label=f"chain {chain}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels):]:
        fig.delaxes(ax)
    if imp.m <= 10:
        axes[0].legend(fontsize=6, frameon=False)
    fig.suptitle(f"Chain statistics of the imputed values (m={imp.m}, {imp.iterations} iterations)",
                 fontsize=10)
    return fig


def plot_densities(imp: Any, variables: list[str] | str | None = None, bins: int = DEFAULT_BINS) -> Any:
    """Observed (blue) against imputed (red) distributions (mice's ``densityplot``/``bwplot``).

    One panel per variable: for continuous variables the density of the observed values
    (thick blue) and of the imputed values of each imputation (thin red), drawn from
    histograms with ``bins`` bins; for categorical variables the proportion of each level
    among the observed values (blue bar) and the imputed values of each imputation (red
    bars).  Computed from binned counts summed over the partitions (see :func:`distributions`),
    which follow the small-cell rule; the shares of the open-ended first and last bins are
    written in the panel, and counts too small to show are said to be left out.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _, Figure = _mpl()
    dist = distributions(imp, variables, bins=bins)
    if not dist:
        raise InputError("no imputed variables to plot")
    nrows, ncols = _grid(len(dist), 3)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, d) in zip(axes, dist.items()):
        notes = []
        if d["kind"] == CONTINUOUS:
            edges = d["edges"]
            rows = [(r, IMPUTED, 0.9, 0.8) for r in (d["imputed"] if d["imputed"] is not None else [])]
            if d["observed"] is not None:
                rows.append((d["observed"], OBSERVED, 2.0, 1.0))
            # open-ended first and last bins: not drawn as densities, their shares noted
            inner = slice(1, len(edges) - 2)
            mids = (edges[1:-2] + edges[2:-1]) / 2
            width = np.diff(edges[1:-1])
            for counts, colour, lw, alpha in rows:
                tot = counts.sum()
                if tot and len(mids):
                    ax.plot(mids, counts[inner] / (tot * width), color=colour, lw=lw, alpha=alpha)
            if d["observed"] is not None:
                tot = d["observed"].sum()
                for end, where in ((0, "<"), (-1, "\u2265")):
                    if tot and d["observed"][end] and len(edges) > 2:
                        notes.append(f"{where} {edges[1] if end == 0 else edges[-2]:g}: "
                                     f"{100 * d['observed'][end] / tot:.2g}% observed")
            counts_all = sum(r[0] for r in rows) if rows else np.zeros(len(edges) - 1)
            used = np.nonzero(counts_all[1:-1])[0]
            if len(used):
                ax.set_xlim(edges[1 + used[0]], edges[2 + used[-1]])
            ax.set_ylabel("density", fontsize=8)
        else:
            levels = d["levels"]
            groups = [g for g in [d["observed"], *(d["imputed"] if d["imputed"] is not None else [])]
                      if g is not None]
            k = max(len(groups), 1)
            w = 0.8 / k
            x = np.arange(len(levels))
            first_is_obs = d["observed"] is not None
            for g, counts in enumerate(groups):
                tot = counts.sum()
                obs = g == 0 and first_is_obs
                ax.bar(x - 0.4 + w * (g + 0.5), counts / tot if tot else counts * 0.0, width=w,
                       color=OBSERVED if obs else IMPUTED, alpha=1.0 if obs else 0.75)
            ax.set_xticks(x, [str(lev)[:12] for lev in levels], fontsize=7,
                          rotation=45 if len(levels) > 4 else 0)
            ax.set_ylabel("proportion", fontsize=8)
        t = min_cell_count(imp)
        if d["observed"] is None:
            notes.append(f"observed: fewer than {t} cells, not shown")
        if d["imputed"] is None:
            notes.append(f"imputed: fewer than {t} cells, not shown")
        if notes:
            ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, fontsize=6, va="top")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(dist):]:
        fig.delaxes(ax)
    fig.suptitle(f"Observed (blue) and imputed (red, {imp.m} imputations) values", fontsize=10)
    return fig


def plot_pattern(data: Any, max_patterns: int = 40) -> Any:
    """Missing-data pattern plot (R mice's ``md.pattern(plot = TRUE)``).

    Left: one row per pattern (the ``max_patterns`` most frequent), one column per
    variable in increasing order of missing values, blue where observed and red where
    missing; the number of rows with the pattern on the left, the number of missing
    variables on the right, the missing values of each variable on top.  Right: the
    fraction of missing values of each variable.

    Parameters
    ----------
    data : dask.dataframe.DataFrame, pandas.DataFrame or MultipleImputation
        As for :func:`md_pattern`.
    max_patterns : int, default 40

    Returns
    -------
    matplotlib.figure.Figure
    """
    matplotlib, Figure = _mpl()
    from matplotlib.colors import ListedColormap

    pat = md_pattern(data)
    rows, total = pat.iloc[:-1], pat.iloc[-1]
    n_patterns = pat.attrs.get("n_patterns", len(rows))
    if len(rows) > max_patterns:
        keep = rows["count"].nlargest(max_patterns).index
        rows = rows.loc[[i for i in rows.index if i in set(keep)]]
    names = [c for c in pat.columns if c not in ("count", "n_missing")]
    grid = rows[names].to_numpy(dtype=float)
    n_rows = int(total["count"])
    frac = np.array([total[c] / n_rows if n_rows else 0.0 for c in names])
    nr, nv = len(rows), len(names)
    fig = Figure(figsize=(max(4.5, 0.5 * nv + 2.5), max(3.6, 0.22 * nr + 3.0)), layout="constrained")
    ax, bx = fig.subplots(2, 1, height_ratios=[max(2.0, 0.22 * nr), 1.2], sharex=True)
    ax.imshow(grid, cmap=ListedColormap([IMPUTED, OBSERVED]), vmin=0, vmax=1, aspect="auto",
              interpolation="nearest")
    ax.set_yticks(np.arange(nr), [f"{int(c):,}" for c in rows["count"]], fontsize=7)
    ax.set_ylabel("rows with the pattern", fontsize=8)
    ax.set_xticks(np.arange(nv) - 0.5, minor=True)
    ax.set_yticks(np.arange(nr) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=0.8)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(axis="x", labelbottom=False)
    top = ax.secondary_xaxis("top")
    top.set_xticks(np.arange(nv), [f"{int(total[c]):,}" for c in names], rotation=60, fontsize=7)
    right = ax.secondary_yaxis("right")
    right.set_yticks(np.arange(nr), [str(int(v)) for v in rows["n_missing"]], fontsize=7)
    right.set_ylabel("missing variables", fontsize=8)
    shown = f"{nr} of {n_patterns} patterns" if nr < n_patterns else f"{nr} patterns"
    ax.set_title(f"Missing-data pattern ({shown}, {n_rows:,} rows; blue observed, red missing)",
                 fontsize=9)
    bx.bar(np.arange(nv), frac, color=IMPUTED, width=0.8)
    bx.set_xticks(np.arange(nv), names, rotation=60, ha="right", fontsize=7)
    bx.set_ylim(0, max(0.05, float(frac.max()) * 1.15) if nv else 1)
    bx.set_ylabel("fraction missing", fontsize=8)
    bx.tick_params(labelsize=7)
    return fig
