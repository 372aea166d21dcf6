"""The result of an imputation: m completed data sets, held on the cluster or read from disk."""

from __future__ import annotations

import datetime as _dt
import platform
import posixpath
from importlib import metadata
from typing import Any

import pandas as pd

from dmice import store
from dmice.errors import InputError
from dmice.schema import Schema


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("dmice", "dask", "distributed", "pandas", "numpy", "scipy", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class MultipleImputation:
    """m imputed versions of a data set (R mice's ``mids``).

    Created by :func:`dmice.impute` (imputed cells held on the cluster's workers) or
    :func:`dmice.open` (read lazily from a written output).

    Attributes
    ----------
    m : int
        Number of imputations.
    iterations : int
        Iterations of the chained loop run so far.
    seed : int
        Seed of every random draw.
    method : dict
        Method of each column (``""`` for columns not imputed).
    n_missing : dict
        Missing values of each column.
    visit_sequence : list of str
        Order in which the incomplete columns are visited in each iteration.
    logged_events : pandas.DataFrame
        Decisions taken during the run that a user should know about (mice's ``loggedEvents``).
    chain_stats : pandas.DataFrame
        Mean and standard deviation (or level proportions) of the imputed values of each
        variable, per iteration and chain (mice's ``chainMean``/``chainVar``).
    """

    def __init__(self, *, m: int, iterations: int, seed: int, columns: list[str],
                 method: dict[str, str], n_missing: dict[str, int], n_rows: int,
                 visit_sequence: list[str], logged_events: list[dict[str, Any]],
                 chain_stats: list[dict[str, Any]], dtypes: dict[str, str],
                 engine: Any = None, ddf: Any = None, schema: Schema | None = None,
                 cluster: Any = None, url: str | None = None,
                 storage_options: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None):
        self.m = m
        self.iterations = iterations
        self.seed = seed
        self.columns = columns
        self.method = method
        self.n_missing = n_missing
        self.n_rows = n_rows
        self.visit_sequence = visit_sequence
        self._events = logged_events
        self._chain = chain_stats
        self.dtypes = dtypes
        self._engine = engine
        self._ddf = ddf
        self.schema = schema
        self._cluster = cluster
        self.url = url
        self._storage_options = storage_options
        self.manifest = manifest

    # -- views ------------------------------------------------------------------------------
    @property
    def logged_events(self) -> pd.DataFrame:
        return pd.DataFrame(self._events, columns=["iteration", "variable", "event"])

    @property
    def chain_stats(self) -> pd.DataFrame:
        return pd.DataFrame(self._chain)

    @property
    def imputed_columns(self) -> list[str]:
        return [c for c in self.columns if self.method.get(c) and self.n_missing.get(c, 0)]

    def convergence(self, *, window: int | None = None) -> pd.DataFrame:
        """R-hat (rank-normalised split, Vehtari et al. 2021) and lag-1 autocorrelation of the
        chain statistics of every imputed variable (R mice's ``convergence()``)."""
        from dmice.diagnostics import convergence

        return convergence(self.chain_stats, window=window)

    def __repr__(self) -> str:
        where = f"from {self.url}" if self._engine is None and self.url else "on the cluster"
        lines = [f"<dmice.MultipleImputation m={self.m} iterations={self.iterations} seed={self.seed} "
                 f"rows={self.n_rows:,} columns={len(self.columns)} ({where})>"]
        imputed = self.imputed_columns
        if imputed:
            width = max([len("variable")] + [len(c) for c in imputed])
            lines.append(f"  {'variable':<{width}}  method    missing")
            for c in imputed:
                frac = self.n_missing[c] / self.n_rows if self.n_rows else 0.0
                lines.append(f"  {c:<{width}}  {self.method[c]:<8}  {self.n_missing[c]:,} "
                             f"({frac:.1%})")
        else:
            lines.append("  no incomplete columns to impute")
        if self._chain:
            from dmice.diagnostics import verdict

            lines.append(f"  {verdict(self.convergence())}")
        if self._events:
            lines.append(f"  {len(self._events)} logged events (see .logged_events)")
        return "\n".join(lines)

    # -- completed data ----------------------------------------------------------------------
    def _check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.m:
            raise InputError(f"imputation number must be an integer from 1 to m={self.m}, got {k!r}")
        return k

    def complete(self, k: int | str = 1) -> Any:
        """Completed data set ``k`` (1..m) as a lazy dask DataFrame.

        ``complete("long")`` stacks all m with an ``imputation`` column (mice's
        ``complete(imp, "long")``).  Columns and dtypes are those of the input.
        """
        import dask.dataframe as dd

        if k == "long":
            frames = [self.complete(i).assign(imputation=i) for i in range(1, self.m + 1)]
            return dd.concat(frames)
        k = self._check_k(k)
        if self._engine is not None:
            from dmice.engine import complete_frame

            return complete_frame(self._ddf, self._engine.blocks, self._engine.plan, k - 1)
        if self.url is None:
            raise InputError("this result holds no data")
        path = posixpath.join(self.url.rstrip("/"), f"imputation={k}")
        ddf = dd.read_parquet(path, storage_options=self._storage_options)
        ddf = ddf[self.columns]  # without the hive `imputation` column read from the path
        return ddf.map_partitions(store.restore_dtypes, self.dtypes, meta=ddf._meta.pipe(
            store.restore_dtypes, self.dtypes))

    # -- writing ----------------------------------------------------------------------------
    def manifest_dict(self, files: list[dict[str, Any]], partitions: int) -> dict[str, Any]:
        sch = self.schema
        return {
            "format": "dmice", "format_version": store.FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "m": self.m, "iterations": self.iterations, "seed": self.seed,
            "n_rows": self.n_rows, "partitions": partitions,
            "columns": self.columns, "dtypes": self.dtypes,
            "method": self.method, "n_missing": self.n_missing,
            "visit_sequence": self.visit_sequence,
            "variables": [v.to_dict() for v in sch.variables] if sch else [],
            "predictors": {v.name: [p.name for p in sch.variables if p.width and p.name != v.name]
                           for v in sch.imputed} if sch else {},
            "logged_events": self._events,
            "collapse": {v.name: v.collapse for v in sch.variables if v.collapse} if sch else {},
            "convergence": self._convergence_summary(),
            "files": files,
            "versions": _versions(),
        }

    def _convergence_summary(self) -> dict[str, Any]:
        from dmice.diagnostics import verdict

        conv = self.convergence()
        return {"verdict": verdict(conv),
                "rhat": {f"{r.variable} {r.statistic}": (None if pd.isna(r.rhat) else float(r.rhat))
                         for r in conv.itertuples()}}

    def to_parquet(self, url: str, *, overwrite: bool = False,
                   storage_options: dict[str, Any] | None = None) -> str:
        """Write the m completed data sets as partitioned Parquet (``imputation=k/part.N.parquet``).

        The manifest and the ``_SUCCESS`` marker are written last.  A non-empty target is
        refused unless ``overwrite=True``.  Returns ``url``.
        """
        if self._engine is None:
            raise InputError("this result was read from disk; it is already written at "
                             f"{self.url!r}")
        from dmice.engine import write_parquet

        store.prepare(url, storage_options, overwrite)
        per_part = write_parquet(self._engine.client, self._ddf, self._engine.blocks,
                                 self._engine.plan, url, storage_options)
        files = sorted((f for fs in per_part for f in fs), key=lambda f: (f["imputation"], f["partition"]))
        store.write_diagnostics(url, storage_options, self.chain_stats)
        store.commit(url, storage_options, self.manifest_dict(files, len(per_part)))
        return url

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the imputed cells and close the embedded cluster, if dmice started one."""
        eng, self._engine = self._engine, None
        if eng is not None:
            eng.blocks = []
        if self._cluster is not None:
            client = getattr(eng, "client", None)
            if client is not None:
                client.close()
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> MultipleImputation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def from_manifest(url: str, manifest: dict[str, Any],
                  storage_options: dict[str, Any] | None) -> MultipleImputation:
    return MultipleImputation(
        m=manifest["m"], iterations=manifest["iterations"], seed=manifest["seed"],
        columns=manifest["columns"], method=manifest["method"], n_missing=manifest["n_missing"],
        n_rows=manifest["n_rows"], visit_sequence=manifest["visit_sequence"],
        logged_events=manifest["logged_events"],
        chain_stats=store.read_diagnostics(url, storage_options).to_dict("records"),
        dtypes=manifest["dtypes"],
        url=url, storage_options=storage_options, manifest=manifest)
