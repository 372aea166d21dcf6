"""Diagnostic plots (mice's ``plot(imp)``, ``densityplot``, ``md.pattern``) and the summaries behind them.

Every figure is drawn from small summaries computed on the cluster, never from the
data brought to the client:

* trace plots from the chain statistics gathered during the run
  (:attr:`MultipleImputation.chain_stats`);
* density plots from binned counts: each partition computes, for every variable, a
  histogram of its observed cells and of its imputed cells in each imputation (level
  counts for categorical variables); the client sums them.  Bin edges span the
  smallest and largest observed value, found in a first pass over the input, widened
  (one more pass) for a variable whose imputed values fall outside (``norm``);
* the missing-data pattern from per-partition counts of the distinct rows of the
  missingness mask, summed on the client.

A cell is imputed exactly when it is missing in the input.  An opened output no longer
has the input, so :meth:`MultipleImputation.to_parquet` computes these summaries while
the input is still at hand and stores them in the manifest (``"distributions"``, at
:data:`STORED_BINS` bins, and ``"missing_pattern"``): opening and plotting a written
output then needs no pass over the data at all.  Densities of an opened output can be
drawn with any number of bins that divides :data:`STORED_BINS` (adjacent bins are
merged exactly).

matplotlib is imported only when a figure is drawn (``pip install 'dmice[plots]'``);
figures are plain :class:`matplotlib.figure.Figure` objects, not registered with pyplot,
so they work on any backend, Agg included.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

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
    import dask

    return dask.compute(*tasks)


# ---------------------------------------------------------------------------
# per-partition kernels (pandas/numpy only; run inside tasks)


def _cont_values(s: pd.Series) -> np.ndarray:
    return s.to_numpy(dtype=np.float64, na_value=np.nan)


def _partition_first(df: pd.DataFrame, cont: list[str], patterns: bool) -> dict[str, Any]:
    """First pass, over the input only: range of the observed values of ``cont``, missingness patterns."""
    ranges = np.full((len(cont), 2), np.nan)
    for a, name in enumerate(cont):
        x = _cont_values(df[name])
        x = x[np.isfinite(x)]
        if len(x):
            ranges[a] = x.min(), x.max()
    return {"ranges": ranges, "patterns": _partition_patterns(df) if patterns else None}


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
    """Counts of the observed cells (``df``) and of the imputed cells of each completed frame.

    Continuous variables also give the range of their imputed values: values outside the
    edges are not counted, and the caller recounts such variables with wider edges.
    """
    out: dict[str, Any] = {}
    for name, edges in cont.items():
        miss = df[name].isna().to_numpy(dtype=bool)
        obs = np.histogram(_cont_values(df[name])[~miss], bins=edges)[0]
        imp = np.zeros((len(frames), len(edges) - 1), dtype=np.int64)
        lo, hi = np.inf, -np.inf
        for k, f in enumerate(frames):
            x = _cont_values(f[name])[miss]
            imp[k] = np.histogram(x, bins=edges)[0]
            if len(x):
                lo, hi = min(lo, float(np.nanmin(x))), max(hi, float(np.nanmax(x)))
        out[name] = (obs, imp, lo, hi)
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
        return dd.from_pandas(data, npartitions=1, sort=False)
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
    from dmice.result import MultipleImputation

    if isinstance(data, MultipleImputation):
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


def _kinds(imp: Any) -> dict[str, tuple[str, list[str] | None]]:
    """Kind and level labels of each column, from the schema or the manifest."""
    if imp.schema is not None:
        return {v.name: (v.kind, None if v.levels is None else [_label(x) for x in v.levels])
                for v in imp.schema.variables}
    out = {}
    for v in (imp.manifest or {}).get("variables", []):
        out[v["name"]] = (v["kind"], None if v.get("levels") is None else [_label(x) for x in v["levels"]])
    return out


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


def _edges(lo: float, hi: float, bins: int, integer: bool = False) -> np.ndarray:
    """Equal-width edges from ``lo`` to ``hi``; for integer values, edges at half-integers and a
    whole number of values per bin (so no bin holds one value more than its neighbours)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if integer and float(lo).is_integer() and float(hi).is_integer():
        width = max(1.0, math.ceil((hi - lo + 1) / bins))
        return lo - 0.5 + width * np.arange(bins + 1)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def _compute_distributions(imp: Any, variables: list[str], bins: int, patterns: bool = False
                           ) -> tuple[dict[str, dict[str, Any]], dict[tuple[int, ...], int] | None]:
    """Observed and imputed counts of each variable (and the missingness patterns of the input).

    A first pass over the input finds the range of the observed values (and counts the
    patterns); a second pass over the completed data counts observed and imputed values
    with edges spanning that range.  Imputed values of predictive mean matching, ``sample``
    and the categorical methods are observed values, so they always fall inside; a variable
    with imputed values outside (``norm``) is counted again with edges spanning both.
    """
    from dask import delayed

    kinds = _kinds(imp)
    cont = [v for v in variables if kinds.get(v, ("",))[0] == CONTINUOUS]
    cat = [v for v in variables if v not in cont]
    integer = {v.name for v in imp.schema.variables if v.integer} if imp.schema is not None else set()
    parts = imp._ddf.to_delayed()
    frames = [imp.complete(k).to_delayed() for k in range(1, imp.m + 1)]
    per_part = [[f[i] for f in frames] for i in range(len(parts))]
    pattern_counts = None
    edges: dict[str, np.ndarray] = {}
    if cont or patterns:
        first = _compute(*[delayed(_partition_first)(p, cont, patterns) for p in parts])
        if patterns:
            pattern_counts = _sum_patterns([f["patterns"] for f in first])
        r = np.stack([f["ranges"] for f in first]) if first else np.full((0, len(cont), 2), np.nan)
        with np.errstate(all="ignore"):
            obs_lo, obs_hi = np.nanmin(r[:, :, 0], axis=0, initial=np.inf), \
                np.nanmax(r[:, :, 1], axis=0, initial=-np.inf)
        edges = {name: _edges(obs_lo[a], obs_hi[a], bins, name in integer) for a, name in enumerate(cont)}
    if not variables:
        return {}, pattern_counts
    hists = _compute(*[delayed(_partition_hist)(p, fs, edges, cat) for p, fs in zip(parts, per_part)])
    wider = {}
    for name, e in edges.items():
        lo = min([e[0]] + [h[name][2] for h in hists])
        hi = max([e[-1]] + [h[name][3] for h in hists])
        if lo < e[0] or hi > e[-1]:
            wider[name] = _edges(lo, hi, bins, name in integer and lo.is_integer() and hi.is_integer())
    if wider:
        again = _compute(*[delayed(_partition_hist)(p, fs, wider, []) for p, fs in zip(parts, per_part)])
        for h, g in zip(hists, again):
            h.update(g)
        edges.update(wider)
    out: dict[str, dict[str, Any]] = {}
    for name in variables:
        if name in edges:
            obs = sum((h[name][0] for h in hists), np.zeros(bins, dtype=np.int64))
            impc = sum((h[name][1] for h in hists), np.zeros((imp.m, bins), dtype=np.int64))
            out[name] = {"kind": CONTINUOUS, "edges": edges[name], "observed": obs, "imputed": impc}
        else:
            obs_d: dict[str, int] = {}
            imp_d: list[dict[str, int]] = [{} for _ in range(imp.m)]
            for h in hists:
                o, ims = h[name]
                for k, c in o.items():
                    obs_d[k] = obs_d.get(k, 0) + c
                for acc, d in zip(imp_d, ims):
                    for k, c in d.items():
                        acc[k] = acc.get(k, 0) + c
            levels = _order_levels(kinds.get(name, ("", None))[1], obs_d, *imp_d)
            out[name] = {"kind": "categorical", "levels": levels,
                         "observed": np.array([obs_d.get(lev, 0) for lev in levels], dtype=np.int64),
                         "imputed": np.array([[d.get(lev, 0) for lev in levels] for d in imp_d],
                                             dtype=np.int64).reshape(imp.m, len(levels))}
    return out, pattern_counts


def _merge_bins(d: dict[str, Any], bins: int, name: str) -> dict[str, Any]:
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

    Parameters
    ----------
    imp : MultipleImputation
        In memory (computed now, two passes over the completed data on the cluster) or
        read with :func:`dmice.open` (read from the manifest, stored at write time).
    variables : list of str, optional
        Default: every imputed variable.
    bins : int, default 40
        Equal-width bins between the smallest and largest value, observed or imputed
        (integer-valued variables: edges at half-integers, a whole number of values per
        bin).  For a result read from disk it must divide :data:`STORED_BINS`.

    Returns
    -------
    dict
        Per variable, ``kind`` (``"continuous"`` or ``"categorical"``), ``observed``
        (counts over the observed cells) and ``imputed`` (array m x bins or m x levels:
        counts over the imputed cells of each imputation), plus ``edges`` (bins + 1) for
        continuous variables or ``levels`` (labels) for categorical ones.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise InputError(f"bins must be an integer >= 1, got {bins!r}")
    names = _select(imp, variables)
    if imp._engine is not None:
        return _compute_distributions(imp, names, bins)[0]
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
        if d["kind"] == CONTINUOUS:
            out[name] = _merge_bins({"kind": CONTINUOUS, "edges": np.asarray(d["edges"], dtype=float),
                                     "observed": np.asarray(d["observed"], dtype=np.int64),
                                     "imputed": np.asarray(d["imputed"], dtype=np.int64)}, bins, name)
        else:
            out[name] = {"kind": d["kind"], "levels": list(d["levels"]),
                         "observed": np.asarray(d["observed"], dtype=np.int64),
                         "imputed": np.asarray(d["imputed"], dtype=np.int64).reshape(
                             imp.m, len(d["levels"]))}
    return out


def stored_summaries(imp: Any) -> dict[str, Any]:
    """What :meth:`MultipleImputation.to_parquet` keeps in the manifest for plotting an opened output:
    the distributions of every imputed variable at :data:`STORED_BINS` bins and the
    missing-data pattern of the input (JSON-ready)."""
    dist, patterns = _compute_distributions(imp, imp.imputed_columns, STORED_BINS, patterns=True)
    enc = {}
    for name, d in dist.items():
        e = {"kind": d["kind"], "observed": d["observed"].tolist(), "imputed": d["imputed"].tolist()}
        if d["kind"] == CONTINUOUS:
            e["edges"] = d["edges"].tolist()
        else:
            e["levels"] = d["levels"]
        enc[name] = e
    return {"distributions": {"bins": STORED_BINS, "variables": enc},
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
    bars).  Computed from binned counts summed over the partitions (see :func:`distributions`).

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
        if d["kind"] == CONTINUOUS:
            edges = d["edges"]
            mids, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
            for row in d["imputed"]:
                tot = row.sum()
                if tot:
                    ax.plot(mids, row / (tot * width), color=IMPUTED, lw=0.9, alpha=0.8)
            tot = d["observed"].sum()
            if tot:
                ax.plot(mids, d["observed"] / (tot * width), color=OBSERVED, lw=2.0)
            used = np.nonzero(d["observed"] + d["imputed"].sum(axis=0))[0]
            if len(used):
                ax.set_xlim(edges[used[0]], edges[used[-1] + 1])
            ax.set_ylabel("density", fontsize=8)
        else:
            levels = d["levels"]
            groups = [d["observed"], *d["imputed"]]
            k = len(groups)
            w = 0.8 / k
            x = np.arange(len(levels))
            for g, counts in enumerate(groups):
                tot = counts.sum()
                ax.bar(x - 0.4 + w * (g + 0.5), counts / tot if tot else counts * 0.0, width=w,
                       color=OBSERVED if g == 0 else IMPUTED, alpha=1.0 if g == 0 else 0.75)
            ax.set_xticks(x, [str(lev)[:12] for lev in levels], fontsize=7,
                          rotation=45 if len(levels) > 4 else 0)
            ax.set_ylabel("proportion", fontsize=8)
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
