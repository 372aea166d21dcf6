"""The result of an imputation: m completed data sets, held on the cluster or read from disk."""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import posixpath
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd

from dmice import store
from dmice.errors import InputError, check_int
from dmice.schema import Schema, _jsonable

log = logging.getLogger("dmice")


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
                 session: Any = None, ddf: Any = None, schema: Schema | None = None,
                 url: str | None = None, storage_options: dict[str, Any] | None = None,
                 manifest: dict[str, Any] | None = None, reopen: Callable[..., Any] | None = None):
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
        self._session = session  # dmice.runtime.session.Session: the chains on the cluster
        self._ddf = ddf
        self.schema = schema
        self.url = url
        self._storage_options = storage_options
        self.manifest = manifest
        self.parameters: dict[str, Any] = dict((manifest or {}).get("parameters") or {})
        self._reopen = reopen  # rebuilds the chains of a written output (given by dmice.open)

    @property
    def _engine(self) -> Any:
        """The engine of the chains held on the cluster (None for a result read from disk)."""
        return self._session.engine if self._session is not None else None

    # -- views ------------------------------------------------------------------------------
    @property
    def logged_events(self) -> pd.DataFrame:
        """What the run decided on its own (methods, dropped predictors, separation, fallbacks,
        donor scarcity): one row per event with its ``iteration``, ``variable`` and ``event``."""
        return pd.DataFrame(self._events, columns=["iteration", "variable", "event"])

    @property
    def chain_stats(self) -> pd.DataFrame:
        """Chain statistics with the levels observed fewer than ``min_cell_count`` times counted
        together as ``"other (k levels)"`` (their proportions summed), and no mean or sd of a
        variable with fewer than ``min_cell_count`` imputed cells, as written to disk."""
        cs = pd.DataFrame(self._chain)
        if self.schema is None or cs.empty:
            return cs
        from dmice.disclosure import public_labels

        t = self.min_cell_count
        # the mean of fewer than t imputed values (pmm's are observed values) is not shown
        few = [v.name for v in self.schema.variables if v.levels is None and 0 < v.n_missing < t]
        if few and "mean" in cs:
            sel = cs["variable"].isin(few)
            cs.loc[sel, ["mean", "sd"]] = np.nan
        if "level" not in cs:
            return cs
        maps = {v.name: public_labels(v, t) for v in self.schema.variables if v.levels is not None}
        maps = {k: m for k, m in maps.items() if any(a != b for a, b in m.items())}
        if not maps:
            return cs
        has = cs["level"].notna() & cs["variable"].isin(list(maps))
        if not has.any():
            return cs
        lev = cs.loc[has, "level"]
        cs.loc[has, "level"] = [maps[v].get(x, x) for v, x in zip(cs.loc[has, "variable"], lev)]
        keys = ["iteration", "variable", "chain", "level"]
        merged = cs[has].groupby(keys, sort=False, as_index=False)[["proportion"]].sum(min_count=1)
        out = pd.concat([cs[~has], merged], ignore_index=True)
        order = {name: i for i, name in enumerate(dict.fromkeys(cs["variable"]))}
        out["_v"] = out["variable"].map(order)
        out = out.sort_values(["iteration", "_v", "chain"], kind="stable").drop(columns="_v")
        return out.reset_index(drop=True)[list(cs.columns)]

    @property
    def min_cell_count(self) -> int:
        """Threshold of the small-cell rule applied to everything written about the data
        (:mod:`dmice.disclosure`)."""
        from dmice.plots import min_cell_count

        return min_cell_count(self)

    @property
    def imputed_columns(self) -> list[str]:
        """The columns that had missing values and a method, in the input's order."""
        return [c for c in self.columns if self.method.get(c) and self.n_missing.get(c, 0)]

    def convergence(self, *, window: int | None = None) -> pd.DataFrame:
        """R-hat (rank-normalised split, Vehtari et al. 2021) and lag-1 autocorrelation of the
        chain statistics of every imputed variable (R mice's ``convergence()``).

        Parameters
        ----------
        window : int, optional
            Use only the last ``window`` iterations (default: all).
        """
        from dmice.diagnostics import convergence

        return convergence(self.chain_stats, window=window)

    def plot_trace(self, variables: list[str] | str | None = None) -> Any:
        """Trace plots of the chain statistics (mice's ``plot(imp)``); see :func:`dmice.plots.plot_trace`.

        Parameters
        ----------
        variables : str or list of str, optional
            The imputed variables to plot (default: all).
        """
        from dmice.plots import plot_trace

        return plot_trace(self, variables)

    def plot_densities(self, variables: list[str] | str | None = None, bins: int = 40) -> Any:
        """Observed (blue) against imputed (red) distributions; see :func:`dmice.plots.plot_densities`.

        Parameters
        ----------
        variables : str or list of str, optional
            The imputed variables to plot (default: all).
        bins : int, default 40
            Histogram bins of a continuous variable.
        """
        from dmice.plots import plot_densities

        return plot_densities(self, variables, bins=bins)

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
            lines.append(f"  {self.verdict()}")
        if self._events:
            lines.append(f"  {len(self._events)} logged events (see .logged_events)")
        memory = getattr(self._session, "memory", None) if self._session is not None else None
        if memory:
            from dask.utils import format_bytes

            lines.append(f"  state on the workers: about {format_bytes(memory['busiest'])} at peak on the busiest of "
                         f"{memory['workers']} workers (estimate)")
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

        Parameters
        ----------
        k : int or "long", default 1
            The imputation (1..m), or ``"long"`` for all of them stacked.
        """
        import dask.dataframe as dd

        if k == "long":
            frames = [self.complete(i).assign(imputation=i) for i in range(1, self.m + 1)]
            return dd.concat(frames)
        k = self._check_k(k)
        if self._engine is not None:
            from dmice.runtime.passes import complete_frame

            return complete_frame(self._ddf, self._engine.blocks, self._engine.plan, k - 1)
        if self.url is None:
            raise InputError("this result holds no data")
        man = self.manifest or {}
        if man.get("layout") == "cells":
            return self._complete_cells(k)
        files = store.part_files(man, k)
        if files is not None:
            # the files the manifest lists, in partition order, each read by pyarrow in its
            # task (about twice as fast as dask's read_parquet on these files)
            import dask

            so = self._storage_options
            meta = store.part_meta(files[0], self.url, so, self.dtypes, self.columns)
            # read_part gives the dtypes the manifest records (pandas' own string dtype):
            # no conversion task per partition after each read
            with dask.config.set({"dataframe.convert-string": False}):
                return dd.from_map(store.read_part, files, args=(self.url, so, self.dtypes),
                                   meta=meta, enforce_metadata=False, label=f"dmice-imputation-{k}")
        prefix = man.get("data_prefix", "")
        path = posixpath.join(self.url.rstrip("/"), *([prefix] if prefix else []), f"imputation={k}")
        ddf = dd.read_parquet(path, storage_options=self._storage_options)
        ddf = ddf[self.columns]  # without the hive `imputation` column read from the path
        return ddf.map_partitions(store.restore_dtypes, self.dtypes, meta=ddf._meta.pipe(
            store.restore_dtypes, self.dtypes))

    # -- continuing ---------------------------------------------------------------------------
    def iterate(self, iterations: int, *, until_rhat: float | None = None, progress: Any = "auto",
                client: Any = None) -> MultipleImputation:
        """Run ``iterations`` more iterations of the chains from where they stopped (mice's
        ``mice.mids``).

        The chains are exactly those of one run with the total number of iterations and the
        same seed.  A result held on the cluster is continued in place and returned; a result
        read with :func:`dmice.open` is rebuilt on the cluster (``client``, else the active
        one, else an embedded LocalCluster) from the written output and its stored chain
        state, and a new result held on the cluster is returned (the output on disk is not
        changed; write the new result with :meth:`to_parquet`).

        Parameters
        ----------
        iterations : int
            Iterations to add (0 rebuilds the chains of a written output without running any).
        until_rhat : float, optional
            Stop earlier once every R-hat is below this value (as :func:`dmice.impute`).
        progress : {"auto", "bar", "log"}, False or callable, default "auto"
            Progress reporting, as :func:`dmice.impute`.
        client : distributed.Client, optional
            Where a result read from disk is rebuilt (default: the active client, else an
            embedded LocalCluster).
        """
        iterations = check_int("iterations", iterations, 0)
        if self._session is None:
            if self.url is None:
                raise InputError("this result holds no chains to continue")
            if self._reopen is None:
                raise InputError(f"open {self.url!r} with dmice.open to continue its chains")
            return self._reopen(self, iterations, progress, until_rhat, client)
        start = self._engine.iteration
        try:
            self._session.run(iterations, progress, until_rhat)
        finally:  # an interrupted run keeps the iterations it completed
            self.iterations = self._engine.iteration
            self._chain = self._engine.chain_stats
        log.info("dmice: continued from iteration %d to %d", start, self.iterations)
        return self

    def add_imputations(self, k: int, *, progress: Any = "auto") -> MultipleImputation:
        """Add ``k`` imputations: new chains run for as many iterations as the existing ones and
        appended as imputations ``m+1 .. m+k`` (mice's ``ibind``).

        The new chains use their own random streams (keyed by their chain numbers).  Held on
        the cluster only: for a result read from disk, call :meth:`iterate` with 0 iterations
        first.

        Parameters
        ----------
        k : int
            The number of imputations to add.
        progress : {"auto", "bar", "log"}, False or callable, default "auto"
            Progress reporting, as :func:`dmice.impute`.
        """
        k = check_int("k", k, 1)
        if self._session is None:
            raise InputError("add_imputations needs the chains on the cluster; call iterate(0) on a "
                             "result read from disk first")
        self._session.add_chains(k, progress)
        self.m = self._engine.plan.m
        self.parameters = {**self.parameters, "m": self.m}
        self._chain = self._engine.chain_stats
        return self

    # -- writing ----------------------------------------------------------------------------
    def manifest_dict(self, files: list[dict[str, Any]], partitions: int) -> dict[str, Any]:
        """The manifest: what the output holds and how it was made.  Levels observed fewer than
        ``min_cell_count`` times are not named in it (:mod:`dmice.disclosure`); the chain state
        under ``_state/`` keeps what continuing the chains needs.

        Parameters
        ----------
        files : list of dict
            The data files written (path, bytes, SHA-256, partition, imputation).
        partitions : int
            The number of partitions of the data.
        """
        from dmice import disclosure

        sch = self.schema
        t = self.min_cell_count
        params = dict(self.parameters)
        if sch is not None and params.get("collapse"):
            params["collapse"] = disclosure.public_mapping(params["collapse"], sch.variables, t)
        return {
            "format": "dmice", "format_version": store.FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "m": self.m, "iterations": self.iterations, "seed": self.seed,
            "n_rows": self.n_rows, "partitions": partitions,
            "columns": self.columns, "dtypes": self.dtypes,
            "method": self.method, "n_missing": self.n_missing,
            "visit_sequence": self.visit_sequence,
            "min_cell_count": t,
            "variables": [disclosure.public_variable(v, t) for v in sch.variables] if sch else [],
            "predictors": {v.name: [p.name for p in sch.variables if p.width and p.name != v.name]
                           for v in sch.imputed} if sch else {},
            "logged_events": self._events,
            "parameters": params,
            "state": getattr(self, "_state_rel", None) if self._engine is not None else None,
            "collapse": {v.name: c for v in sch.variables
                         if (c := disclosure.public_collapse(v, t))} if sch else {},
            "convergence": self._convergence_summary(),
            "files": files,
            "versions": _versions(),
        }

    def verdict(self) -> str:
        """One line on convergence: the largest R-hat over the second half of the iterations."""
        from dmice.diagnostics import trailing_window, verdict

        w = trailing_window(self.iterations)
        return verdict(self.convergence(window=max(w, 1)), (self.iterations - w + 1, self.iterations)
                       if w else None, chains=self.m)

    def _categories(self) -> dict[str, Any]:
        """The categorical columns' dtypes: the categories of every partition, and whether ordered."""
        sch = self.schema
        return {v.name: {"categories": [_jsonable(c) for c in v.categories], "ordered": v.ordered}
                for v in sch.variables if v.categories is not None} if sch else {}

    def _convergence_summary(self) -> dict[str, Any]:
        conv = self.convergence()
        return {"verdict": self.verdict(),
                "rhat": {f"{r.variable} {r.statistic}": (None if pd.isna(r.rhat) else float(r.rhat))
                         for r in conv.itertuples()}}

    def _complete_cells(self, k: int) -> Any:
        """Imputation ``k`` of a ``cells`` output: each input file (checked against its snapshot
        checksum) completed with its imputed cells, one task per file."""
        import dask.dataframe as dd

        man = self.manifest
        snap = man["input_snapshot"]
        meta = store.input_meta(snap["url"], snap["format"], snap["files"][0]["path"],
                                self._storage_options)
        # every category of the categorical columns, kept with the chains' state (rare levels
        # included, so not in the manifest)
        cats = store.read_state_json(posixpath.join(self.url.rstrip("/"), man["state"]),
                                     self._storage_options).get("categories") if man.get("state") else None
        meta = store.restore_dtypes(meta, man["input_dtypes"], cats)
        items = store.cells_items(man)
        return dd.from_map(store.complete_cells_partition, items,
                           args=(self.url, self._storage_options, snap["url"], snap["format"],
                                 man["input_dtypes"], k, cats),
                           meta=meta, enforce_metadata=False)

    def write_data(self, url: str, *, storage_options: dict[str, Any] | None = None,
                   prefix: str = "", layout: str = "full",
                   row_offsets: list[int] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Write the imputations (or only the imputed cells) and the chain statistics below
        ``url/prefix``, without a manifest or commit marker.

        Parameters
        ----------
        url : str
            Output root (fsspec URL).
        storage_options : dict, optional
            Passed to fsspec unchanged.
        prefix : str, default ""
            Directory below ``url`` that receives every file (a job's ``runs/<run_id>``).
        layout : {"full", "cells"}, default "full"
            ``"full"``: m completed data sets (``imputation=k/part.N.parquet``).  ``"cells"``:
            only the imputed cells, one file per partition and imputed variable
            (``cells/var=J/part.N.parquet`` with columns ``row``, ``imputation``, ``value``).
        row_offsets : list of int, optional
            ``cells``: position in the input of each partition's first row (default: the
            cumulative row counts of the partitions).  Completing the cells later needs the
            input snapshot that :mod:`dmice.job` records in the manifest.

        Returns
        -------
        files : list of dict
            The data files (path relative to ``url``, rows, bytes, sha256), sorted.
        diagnostics : dict
            The chain-statistics file.
        """
        import functools

        if self._engine is None:
            raise InputError("this result was read from disk; it is already written at "
                             f"{self.url!r}")
        if layout not in ("full", "cells"):
            raise InputError(f"layout must be 'full' or 'cells', got {layout!r}")
        from dmice.runtime.passes import write_parquet

        if layout == "full":
            writer = functools.partial(store.write_partition, prefix=prefix)
            per_part = write_parquet(self._engine.client, self._ddf, self._engine.blocks,
                                     self._engine.plan, url, storage_options, writer=writer)
            files = sorted((f for fs in per_part for f in fs),
                           key=lambda f: (f["imputation"], f["partition"]))
        else:
            if row_offsets is None:
                rows = self.schema.partition_rows if self.schema else []
                row_offsets = [sum(rows[:i]) for i in range(len(rows))]
            per_part = self._write_cells(url, storage_options, prefix, row_offsets)
            files = sorted((f for fs in per_part for f in fs), key=lambda f: (f["partition"], f["path"]))
        diag = store.write_diagnostics(url, storage_options, self.chain_stats, prefix=prefix)
        # the state of the chains, so that the output can be continued (iterate on dmice.open)
        state_rel = posixpath.join(prefix, store.STATE_DIR) if prefix else store.STATE_DIR
        # the state keeps the parameters and chain statistics as they are (level names included):
        # continuing the chains needs them; the manifest holds the versions safe to show
        written = self._engine.save_state(posixpath.join(url.rstrip("/"), state_rel), storage_options,
                                          {"config": self._session.config, "events": self._events,
                                           "parameters": self.parameters,
                                           "categories": self._categories()},
                                          pd.DataFrame(self._chain))
        self._state_rel = state_rel
        self.state_files = [{**f, "path": posixpath.join(state_rel, f["path"])} for f in written]
        return files, diag

    def _write_cells(self, url: str, storage_options: dict[str, Any] | None, prefix: str,
                     row_offsets: list[int]) -> list[list[dict[str, Any]]]:
        import functools

        from dmice.runtime.passes import write_parquet

        # one writer per partition: each needs its own row offset
        eng = self._engine
        if len(row_offsets) != self._ddf.npartitions:
            raise InputError(f"row_offsets has {len(row_offsets)} entries for "
                             f"{self._ddf.npartitions} partitions")
        writers = [functools.partial(store.write_cells_partition, prefix=prefix, offset=o)
                   for o in row_offsets]
        return write_parquet(eng.client, self._ddf, eng.blocks, eng.plan, url, storage_options,
                             writer=_PerPartition(writers))

    def to_parquet(self, url: str, *, overwrite: bool = False,
                   storage_options: dict[str, Any] | None = None, distributions: bool = True) -> str:
        """Write the m completed data sets as partitioned Parquet (``imputation=k/part.N.parquet``).

        The manifest and the ``_SUCCESS`` marker are written last.  A non-empty target is
        refused unless ``overwrite=True``; an overwrite writes the new output completely in a
        directory beside the old one and only then replaces it, so a write that fails leaves
        the old output as it was.  With ``distributions`` (default), binned counts
        of the observed and imputed values and the missing-data pattern are computed (one
        more pass over the input and one over the completed data) and kept in the manifest, so that density and pattern
        plots of the opened output need no pass over the data (see :mod:`dmice.plots`).
        Returns ``url``.  Scheduled jobs (``dmice run``) write through :mod:`dmice.job`
        instead: run-scoped, idempotent, optionally compact.

        Parameters
        ----------
        url : str
            The output directory (local path or fsspec URL).
        overwrite : bool, default False
            Replace a non-empty output (atomically, as above).
        storage_options : dict, optional
            Passed to fsspec unchanged.
        distributions : bool, default True
            Keep the binned distributions and the missing-data pattern in the manifest.
        """
        if self._engine is None:
            raise InputError("this result was read from disk; it is already written at "
                             f"{self.url!r}")
        # an overwrite writes the new output completely beside the old one, then replaces it
        target = store.prepare(url, storage_options, overwrite)
        try:
            files, diag = self.write_data(target, storage_options=storage_options)
            manifest = self.manifest_dict(files, self._ddf.npartitions)
            manifest["aux_files"] = [diag] + self.state_files
            if distributions:
                from dmice.plots import stored_summaries

                manifest.update(stored_summaries(self))
            store.commit(target, storage_options, manifest)
        except BaseException:
            if target != url:
                store.discard(target, storage_options)
            raise
        if target != url:
            store.replace(target, url, storage_options)
        return url

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the imputed cells and close the embedded cluster, if dmice started one."""
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def __enter__(self) -> MultipleImputation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _PerPartition:
    """Writer dispatching partition ``i`` to ``writers[i]`` (picklable for the workers)."""

    def __init__(self, writers: list[Any]):
        self.writers = writers

    def __call__(self, df: Any, block: Any, plan: Any, url: str, i: int,
                 storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
        return self.writers[i](df, block, plan, url, i, storage_options)


def from_manifest(url: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None,
                  reopen: Callable[..., Any] | None = None) -> MultipleImputation:
    """A lazily read result from the manifest of a complete output (``layout`` ``full`` or
    ``cells``, written directly or under a job's run prefix).  ``reopen(result, iterations,
    progress, until_rhat, client)`` rebuilds its chains on the cluster (see
    :meth:`MultipleImputation.iterate`)."""
    return MultipleImputation(
        m=manifest["m"], iterations=manifest["iterations"], seed=manifest["seed"],
        columns=manifest["columns"], method=manifest["method"], n_missing=manifest["n_missing"],
        n_rows=manifest["n_rows"], visit_sequence=manifest["visit_sequence"],
        logged_events=manifest["logged_events"],
        chain_stats=store.read_diagnostics(url, storage_options,
                                           prefix=manifest.get("data_prefix", "")).to_dict("records"),
        dtypes=manifest["dtypes"],
        url=url, storage_options=storage_options, manifest=manifest, reopen=reopen)
