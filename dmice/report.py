"""A self-contained HTML diagnostics report of a written output (``dmice diagnose OUT``).

Written into ``OUT/_diagnostics/``: ``trace.png``, ``densities.png``, ``pattern.png`` and
``report.html`` (the same images embedded as base64, the R-hat table of
:meth:`MultipleImputation.convergence`, the logged events and the run metadata from the
manifest).  All of it comes from the manifest and the chain statistics, which follow the
small-cell rule of :mod:`dmice.disclosure`.  None of these files ends in ``.parquet``, so ``dask.dataframe.read_parquet(OUT)``
still reads the imputations only.
"""

from __future__ import annotations

import base64
import html
import io
import posixpath
from typing import Any

import pandas as pd

from dmice import store
from dmice.errors import DmiceError

#: folder of the report inside an output
REPORT_DIR = "_diagnostics"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _table(df: pd.DataFrame, floats: str = "{:.3f}") -> str:
    return df.to_html(index=False, border=0, classes="t", na_rep="",
                      float_format=lambda x: floats.format(x))


def _meta_rows(man: dict[str, Any]) -> list[tuple[str, str]]:
    keys = ["created", "m", "iterations", "seed", "n_rows", "partitions", "format_version"]
    rows = [(k, str(man.get(k, ""))) for k in keys if k in man]
    t = man.get("min_cell_count")
    rows.append(("small-cell rule", f"levels observed fewer than {t} times are not named; every count "
                 f"shown is 0 or at least {t}" if t else "none (written before the rule: histogram edges "
                 "may lie at the smallest and largest values)"))
    vis = man.get("visit_sequence") or []
    rows.append(("visit sequence", ", ".join(vis) if vis else "(none)"))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in (man.get("versions") or {}).items())))
    return rows


def build_report(url: str, *, storage_options: dict[str, Any] | None = None,
                 bins: int = 40, variables: list[str] | None = None) -> dict[str, str]:
    """Write the diagnostics of the output at ``url`` into ``url/_diagnostics/``.

    Parameters
    ----------
    url : str
        Directory written by :meth:`MultipleImputation.to_parquet` or ``dmice impute``.
    storage_options : dict, optional
        Passed to fsspec unchanged.
    bins : int, default 40
        Bins of the density plots (must divide :data:`dmice.plots.STORED_BINS`).
    variables : list of str, optional
        Variables of the trace and density plots (default: every imputed one).

    Returns
    -------
    dict
        Name (``trace``, ``densities``, ``pattern``, ``report``) -> path written.  A
        figure that cannot be drawn (e.g. densities of an output written without stored
        distributions) is left out and the reason is given in the report.

    Raises
    ------
    dmice.errors.OutputError
        When ``url`` is not a complete dmice output.
    """
    from dmice.api import open as _open
    from dmice.plots import _mpl, md_pattern, plot_densities, plot_pattern, plot_trace

    _mpl()  # a clear error before any work when matplotlib is missing
    imp = _open(url, storage_options=storage_options)
    man = imp.manifest or {}
    fs, root = store.filesystem(url, storage_options)
    out_dir = posixpath.join(root, REPORT_DIR)
    fs.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}
    images: list[tuple[str, str, bytes | None, str]] = []  # name, title, png, note
    figures = [("trace", "Trace plots of the chain statistics", lambda: plot_trace(imp, variables)),
               ("densities", "Observed and imputed values", lambda: plot_densities(imp, variables, bins)),
               ("pattern", "Missing-data pattern of the input", lambda: plot_pattern(imp))]
    for name, title, draw in figures:
        try:
            png = _png(draw())
        except DmiceError as e:
            images.append((name, title, None, str(e)))
            continue
        path = posixpath.join(out_dir, f"{name}.png")
        with fs.open(path, "wb") as f:
            f.write(png)
        written[name] = path
        images.append((name, title, png, ""))

    conv = imp.convergence()
    from dmice.diagnostics import RHAT_OK, verdict

    verdict_line = verdict(conv) if not conv.empty else "R-hat: not available"
    methods = pd.DataFrame([{"variable": c, "method": imp.method.get(c, ""),
                             "missing": imp.n_missing.get(c, 0),
                             "fraction": imp.n_missing.get(c, 0) / imp.n_rows if imp.n_rows else 0.0}
                            for c in imp.columns])
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>dmice diagnostics: {html.escape(url)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table.t{border-collapse:collapse;font-size:13px}table.t td,table.t th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}.note{color:#a00}</style>",
        "</head><body>",
        f"<h1>dmice diagnostics</h1><p>{html.escape(url)}</p>",
        "<h2>Run</h2>",
        _table(pd.DataFrame(_meta_rows(man), columns=["item", "value"])),
        "<h2>Variables</h2>",
        _table(methods),
        "<h2 id='convergence'>Convergence</h2>",
        f"<p><b>{html.escape(verdict_line)}</b> (threshold {RHAT_OK}; rank-normalised split R-hat of "
        "the chain statistics, ac1 = lag-1 autocorrelation)</p>",
        f"<div id='rhat'>{_table(conv)}</div>",
    ]
    for name, title, png, note in images:
        parts.append(f"<h2 id='{name}'>{html.escape(title)}</h2>")
        if png is None:
            parts.append(f"<p class='note'>not drawn: {html.escape(note)}</p>")
        else:
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{b64}'>")
    if "pattern" in written:
        try:
            pat = md_pattern(imp)
            parts.append(pat.to_html(border=0, classes="t"))
        except DmiceError:  # pragma: no cover - drawn above from the same source
            pass
    parts.append("<h2>Logged events</h2>")
    ev = imp.logged_events
    parts.append(_table(ev) if not ev.empty else "<p>none</p>")
    parts.append("</body></html>")
    path = posixpath.join(out_dir, "report.html")
    with fs.open(path, "w") as f:
        f.write("\n".join(parts))
    written["report"] = path
    return written
