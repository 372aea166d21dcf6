"""Public entry points: :func:`impute` and :func:`open`."""

from __future__ import annotations

import logging
import math
import numbers
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from dmice import block as _block
from dmice import engine as _engine
from dmice import post as _post
from dmice import predictors as _pred
from dmice import rng as _rng
from dmice import store
from dmice.errors import InputError
from dmice.methods import TargetModel
from dmice.methods.stratified import StratifiedModel
from dmice.result import MultipleImputation, from_manifest
from dmice.schema import BINARY, NOMINAL, ORDINAL, Schema, assign_methods, combine_summaries, layout

log = logging.getLogger("dmice")

VISIT_SEQUENCES = ("roman", "arabic", "monotone")
#: most levels a ``by=`` grouping variable may have
MAX_BY_LEVELS = 50


def _as_dask(data: Any) -> Any:
    import dask.dataframe as dd

    if isinstance(data, dd.DataFrame):
        return data
    if isinstance(data, pd.DataFrame):
        nparts = max(1, math.ceil(len(data) / 500_000))
        return dd.from_pandas(data, npartitions=nparts, sort=False)
    raise InputError(f"data must be a dask or pandas DataFrame, got {type(data).__name__}")


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _visit_sequence(schema: Schema, visit_sequence: str | list[str]) -> list[int]:
    imputed = [schema.index(v.name) for v in schema.imputed]
    if isinstance(visit_sequence, str):
        if visit_sequence == "roman":
            return imputed
        if visit_sequence == "arabic":
            return imputed[::-1]
        if visit_sequence == "monotone":
            return sorted(imputed, key=lambda j: (schema.variables[j].n_missing, j))
        raise InputError(f"visit_sequence must be one of {list(VISIT_SEQUENCES)} or a list of "
                         f"column names, got {visit_sequence!r}")
    seq = []
    for name in visit_sequence:
        if name not in schema.names:
            raise InputError(f"visit_sequence names unknown column {name!r}")
        j = schema.index(name)
        if j not in imputed:
            raise InputError(f"visit_sequence names column {name!r}, which is not imputed")
        seq.append(j)
    return seq


def _default_progress(it: int, total: int, secs: float) -> None:
    log.info("iteration %d/%d done in %.2f s", it, total, secs)


def impute(data: Any, *, m: int = 5, max_iter: int = 10, seed: int | None = None,
           method: dict[str, str] | None = None, visit_sequence: str | list[str] = "roman",
           donors: int = 5, donor_pool: int = 10_000, ridge: float = 1e-5,
           client: Any = None, progress: Callable[[int, int, float], None] | None = None,
           predictors: dict[str, list[str]] | pd.DataFrame | None = None, where: Any = None,
           ignore: Any = None, post: dict[str, Any] | None = None, delta: dict[str, float] | None = None,
           by: str | None = None) -> MultipleImputation:
    """Multiple imputation by chained equations on a Dask cluster.

    Parameters
    ----------
    data : dask.dataframe.DataFrame or pandas.DataFrame
        The incomplete data; missing values are NaN, NA or None.  A pandas frame is
        split into partitions of at most 500,000 rows.
    m : int, default 5
        Number of imputations (chains), all advanced together.
    max_iter : int, default 10
        Iterations of the chained loop (mice's ``maxit``).
    seed : int, optional
        Seed of every random draw.  With the same seed and partitioning the result is
        identical whatever the number of workers or threads.  Drawn at random (and
        recorded) when omitted.
    method : dict, optional
        Method per column, overriding the default from its dtype: ``"pmm"`` (continuous,
        default), ``"norm"``, ``"logreg"`` (binary, default), ``"polyreg"`` (unordered
        categories, default), ``"sample"``, or ``""`` (not imputed).
    visit_sequence : {"roman", "arabic", "monotone"} or list of str, default "roman"
        Order of the visits within an iteration: column order, reverse, increasing
        number of missing values, or explicit (repeats allowed).
    donors : int, default 5
        Donors per missing cell for predictive mean matching.
    donor_pool : int, default 10000
        Observed rows (sampled once per variable, uniformly over the partitions) whose
        predictions serve as donors for predictive mean matching and as the pool of the
        random initial fill.  All observed rows are donors when there are fewer.
    ridge : float, default 1e-5
        mice's ridge: ``ridge * diag(X'X)`` is added to X'X in linear models.
    client : distributed.Client, optional
        Client to run on.  Default: the active client, else an embedded LocalCluster
        that lives as long as the result (close it with ``result.close()`` or a
        ``with`` block).
    progress : callable, optional
        Called after each iteration with ``(iteration, max_iter, seconds)``; the default
        logs one line per iteration on the ``dmice`` logger.
    predictors : dict or pandas.DataFrame, optional
        Predictors of each conditional model: ``{"chol": ["age", "sbp", "event"]}``, or a
        predictor matrix as mice's ``predictorMatrix`` (rows: targets, columns:
        predictors, 1 = used; e.g. from :func:`dmice.quickpred`).  Targets not listed
        use every other variable, the analysis outcome included (the default).
    where : DataFrame or dict, optional
        Boolean cells to impute besides the missing ones: a pandas or dask DataFrame of
        booleans with some of the data's columns (a dask frame must have the same
        partitions; a pandas one is aligned by row position), or a dict column ->
        boolean array / Series of the data's length.  Observed cells marked True are
        imputed too (over-imputation) and are left out of the fitting rows of their
        column's model.  Missing cells are always imputed; use ``method={col: ""}`` to
        leave a column alone.
    ignore : array-like of bool, optional
        Rows left out of every model fit (mice's ``ignore``), e.g. a validation set;
        their missing cells are still imputed and their observed values still serve
        as predictors.  A boolean array / pandas Series of the data's length, or a dask
        Series with the data's partitions.
    post : dict, optional
        Column -> function (or list of functions) applied to the new imputed values of
        that continuous column after each visit, on the workers: numpy array in, array
        of the same shape out, vectorised and pickleable, e.g.
        ``{"sbp": dmice.squeeze(60, 250)}`` or ``dmice.round_to(0.5)``.
    delta : dict, optional
        Column -> shift added to its imputed values after each visit, before ``post``
        (the delta adjustment of an MNAR sensitivity analysis, mice's
        ``imp[[j]][, i] + delta`` post idiom).  With ``pmm`` the shift applies to the
        matched donor values.
    by : str, optional
        Complete categorical column (bool, string, category, or a number with two
        values; at most 50 levels): every conditional model is fitted and drawn
        separately within each of its levels, as imputing each group on its own.  The
        column itself is not used as a predictor.

    Returns
    -------
    MultipleImputation

    Raises
    ------
    dmice.errors.InputError
        For bad arguments or data: the message names the parameter or column.

    Notes
    -----
    Before each fit, predictors that are constant or (near-)collinear among the
    fitting rows, or correlated above 0.99 with the target, are dropped from that
    model for the rest of the run with a logged event (mice's ``remove.lindep``);
    logistic and multinomial models are screened at their first fit only.

    Each conditional model is fitted from sufficient statistics (Gram matrices,
    Newton gradients and Hessians) summed over the partitions; only those statistics
    and a donor sample reach the client.  Parameters are drawn from their posterior
    (``norm``, ``pmm``) or its normal approximation (``logreg``, ``polyreg``), so the
    imputations are proper.  Logistic and multinomial fits are warm-started from the
    previous iteration; Newton steps stop once the remaining error is predicted below
    0.05 standard errors (Newton's quadratic contraction constant is measured on the
    first, cold-started fit of each variable) or a step is below 0.2 standard errors.  Predictive mean matching matches against a sample of up to
    ``donor_pool`` observed rows rather than all of them.

    Examples
    --------
    >>> imp = dmice.impute(ddf, m=5, max_iter=10, seed=1)   # doctest: +SKIP
    >>> imp.complete(1).head()                              # doctest: +SKIP
    """
    ddf = _as_dask(data)
    m = _check_int("m", m, 1)
    max_iter = _check_int("max_iter", max_iter, 0)
    donors = _check_int("donors", donors, 1)
    donor_pool = _check_int("donor_pool", donor_pool, 1)
    if seed is None:
        seed = _rng.fresh_seed()
    seed = _check_int("seed", seed, 0)
    if method is not None and not isinstance(method, dict):
        raise InputError(f"method must be a dict of column -> method name, got {type(method).__name__}")
    if not isinstance(ridge, numbers.Real) or not ridge >= 0:
        raise InputError(f"ridge must be a number >= 0, got {ridge!r}")
    if len(set(map(str, ddf.columns))) != len(ddf.columns):
        raise InputError("column names must be unique strings")

    cluster = None
    if client is None:
        client, cluster = _engine.get_client()
    try:
        t0 = time.perf_counter()
        _engine.tune_workers(client)
        parts = ddf.to_delayed()
        if where is not None or ignore is not None:
            parts = _masked_parts(client, ddf, parts, where, ignore)
        summaries = _engine.summarize(client, parts)
        variables = combine_summaries(summaries, ddf.dtypes)
        events = [{"iteration": 0, **e} for e in assign_methods(variables, method)]
        by_j = _check_by(variables, by, method)
        _check_where_methods(variables, where)
        n_cols = layout(variables)
        sets, pred_events = _pred.resolve(predictors, variables, exclude=[] if by_j is None else [by_j])
        events += [{"iteration": 0, **e} for e in pred_events]
        post_funcs = _post_plan(variables, post, delta)
        rows = [next(iter(s.values()))["n"] if s else 0 for s in summaries]  # any column's count
        schema = Schema(variables=variables, n_rows=sum(rows), n_cols_encoded=n_cols,
                        partition_rows=rows)
        seq = _visit_sequence(schema, visit_sequence)
        for e in events:
            log.info("logged event: %s: %s", e["variable"], e["event"])
        pool_rate = {j: min(1.0, donor_pool / v.n_observed)
                     for j, v in enumerate(variables) if v.imputed}
        plan = _block.Plan(variables=tuple(variables), n_cols=n_cols, m=m, seed=seed,
                           pool_rate=pool_rate, post=post_funcs, by=by_j)
        blocks = _engine.encode(client, parts, plan)
        pools = _engine.gather_pools(client, blocks, plan)
        blocks = _engine.init_fill(client, blocks, plan, pools)
        models: dict[int, Any] = {}
        labels = _pred.column_labels(variables, n_cols)
        for j, v in enumerate(variables):
            if not v.imputed:
                continue
            xcols = _pred.xcols(variables, sets[j])
            if by_j is None:
                models[j] = TargetModel(j, v, xcols, m=m, seed=seed, donors=donors, ridge=ridge,
                                        sample_pool=pools[j], labels=labels)
                continue
            vb = variables[by_j]
            models[j] = StratifiedModel(
                {g: TargetModel(j, replace(v, name=f"{v.name} [{vb.name} level {g + 1}]"), xcols, m=m,
                                seed=seed, donors=donors, ridge=ridge, labels=labels, stream=(g + 1,))
                 for g in range(vb.n_levels)}, vb.name, list(vb.levels))
        eng = _engine.Engine(client, plan, blocks, models, schema)
        log.info("dmice: %d rows, %d partitions, %d columns to impute, m=%d; set up in %.2f s",
                 schema.n_rows, len(parts), len(models), m, time.perf_counter() - t0)
        if seq:
            eng.run(max_iter, seq, events, progress or _default_progress)
        else:
            eng.iteration = max_iter
    except BaseException:
        if cluster is not None:
            client.close()
            cluster.close()
        raise
    result = MultipleImputation(
        m=m, iterations=eng.iteration, seed=seed, columns=[str(c) for c in ddf.columns],
        method={v.name: v.method for v in variables}, n_missing={v.name: v.n_missing for v in variables},
        n_rows=schema.n_rows, visit_sequence=[variables[j].name for j in seq],
        logged_events=events, chain_stats=eng.chain_stats,
        dtypes={str(c): str(t) for c, t in ddf.dtypes.items()},
        engine=eng, ddf=ddf, schema=schema, cluster=cluster)
    if cluster is not None:
        weakref.finalize(result, _close_quietly, client, cluster)
    return result


def _check_by(variables: list[Any], by: str | None, method: dict[str, str] | None) -> int | None:
    """Index of the ``by`` grouping variable after checking it can stratify the models."""
    if by is None:
        return None
    names = [v.name for v in variables]
    if not isinstance(by, str) or by not in names:
        raise InputError(f"by must name a column, got {by!r}; columns are {names}")
    j = names.index(by)
    v = variables[j]
    if v.n_missing:
        raise InputError(f"by column {by!r} has {v.n_missing} missing values; the grouping variable "
                         "must be complete")
    if v.kind not in (BINARY, NOMINAL, ORDINAL):
        raise InputError(f"by column {by!r} (dtype {v.dtype}) must be categorical: bool, string, "
                         "category, or a number with two distinct values; convert it with "
                         ".astype('category')")
    if v.n_levels > MAX_BY_LEVELS:
        raise InputError(f"by column {by!r} has {v.n_levels} levels; at most {MAX_BY_LEVELS} are allowed")
    sample = [w.name for w in variables if w.imputed and w.method == "sample"]
    if sample:
        raise InputError(f"method 'sample' cannot be stratified by {by!r}; columns {sample} use it")
    return j


def _check_where_methods(variables: list[Any], where: Any) -> None:
    if where is None:
        return
    import dask.dataframe as dd

    cols = [str(c) for c in (where.columns if hasattr(where, "columns") else where)]
    for v in variables:
        if v.name not in cols or v.imputed:
            continue
        marked = v.n_missing > 0  # a dask frame: marked cells would have made the column incomplete
        if not isinstance(where, dd.DataFrame):
            key = next(c for c in (where.columns if hasattr(where, "columns") else where) if str(c) == v.name)
            marked = bool(np.asarray(where[key]).any())
        if marked:
            raise InputError(f"where marks cells of column {v.name!r}, which is not imputed "
                             f"(method {v.method!r}, kind {v.kind})")


def _post_plan(variables: list[Any], post: dict[str, Any] | None, delta: dict[str, float] | None
               ) -> dict[int, tuple[Any, ...]]:
    """Post-processing functions per variable index: the delta shift first, then ``post``."""
    names = [v.name for v in variables]
    out: dict[int, list[Any]] = {}
    for param, arg in (("delta", delta), ("post", post)):
        if arg is None:
            continue
        if not isinstance(arg, dict):
            raise InputError(f"{param} must be a dict of column -> "
                             f"{'number' if param == 'delta' else 'function'}, got {type(arg).__name__}")
        for col, val in arg.items():
            if col not in names:
                raise InputError(f"{param} names unknown column {col!r}; columns are {names}")
            v = variables[names.index(col)]
            if not v.imputed or v.kind != "continuous":
                raise InputError(f"{param} for column {col!r} needs an imputed continuous column; it is "
                                 f"{v.kind} with method {v.method!r}")
            if param == "delta":
                if isinstance(val, bool) or not isinstance(val, numbers.Real) or not math.isfinite(val):
                    raise InputError(f"delta for column {col!r} must be a finite number, got "
                                     f"{type(val).__name__}")
                funcs = [_post.shift(float(val))]
            else:
                funcs = list(val) if isinstance(val, (list, tuple)) else [val]
                if not all(callable(f) for f in funcs):
                    raise InputError(f"post for column {col!r} must be a function or a list of functions")
            out.setdefault(names.index(col), []).extend(funcs)
    return {j: tuple(f) for j, f in out.items()}


def _bool_array(x: Any, what: str, n: int | None) -> np.ndarray:
    if isinstance(x, pd.Series) and x.isna().any():
        raise InputError(f"{what} has missing values; it must be boolean")
    a = np.asarray(x)
    if a.ndim != 1 or a.dtype != bool:
        raise InputError(f"{what} must be a 1-d boolean array or Series, got dtype {a.dtype} and "
                         f"{a.ndim} dimension(s)")
    if n is not None and len(a) != n:
        raise InputError(f"{what} has {len(a)} rows; the data have {n}")
    return a


def _mask_partition(df: pd.DataFrame, where: Any, ignore: Any) -> pd.DataFrame:
    """A partition with the ``where`` cells set missing and the ``ignore`` rows marked."""
    out = df.copy(deep=False)
    if where is not None:
        items = where.items()
        for col, w in items:
            w = np.asarray(w)
            if len(w) != len(df):
                raise InputError(f"where column {col!r} has {len(w)} rows in partition where the data "
                                 f"have {len(df)}; give where with the data's partitions")
            if w.dtype != bool:
                raise InputError(f"where column {col!r} must be boolean, got dtype {w.dtype}")
            if w.any():
                out[col] = out[col].mask(w)
    if ignore is not None:
        ign = np.asarray(ignore)
        if len(ign) != len(df) or ign.dtype != bool:
            raise InputError(f"ignore must be boolean with the data's rows and partitions; a partition "
                             f"has {len(df)} rows and ignore {len(ign)} of dtype {ign.dtype}")
        out[_block.IGNORE_COL] = ign
    return out


def _masked_parts(client: Any, ddf: Any, parts: list[Any], where: Any, ignore: Any) -> list[Any]:
    """The partitions of the data with ``where`` and ``ignore`` applied (lazy)."""
    import dask.dataframe as dd
    from dask import delayed

    names = [str(c) for c in ddf.columns]
    npart = len(parts)
    w_parts: list[Any] = [None] * npart
    i_parts: list[Any] = [None] * npart
    lens: list[int] | None = None

    def offsets() -> list[int]:
        nonlocal lens
        if lens is None:
            lens = _engine.map_partitions(client, parts, len)
        return lens

    if where is not None:
        cols = list(where.columns) if isinstance(where, (pd.DataFrame, dd.DataFrame)) else \
            list(where) if isinstance(where, dict) else None
        if cols is None:
            raise InputError("where must be a DataFrame of booleans or a dict column -> boolean array, "
                             f"got {type(where).__name__}")
        bad = [c for c in cols if str(c) not in names]
        if bad:
            raise InputError(f"where names unknown columns {bad}; columns are {names}")
        if isinstance(where, dd.DataFrame):
            if where.npartitions != npart:
                raise InputError(f"where has {where.npartitions} partitions; the data have {npart}")
            w_parts = list(where.to_delayed())
        else:
            n = sum(offsets())
            arrays = {str(c): _bool_array(where[c], f"where[{c!r}]", n) for c in cols}
            start = np.cumsum([0] + offsets())
            w_parts = [{c: a[start[i]:start[i + 1]] for c, a in arrays.items()} for i in range(npart)]
    if ignore is not None:
        if isinstance(ignore, dd.Series):
            if ignore.npartitions != npart:
                raise InputError(f"ignore has {ignore.npartitions} partitions; the data have {npart}")
            i_parts = list(ignore.to_delayed())
        else:
            n = sum(offsets())
            a = _bool_array(ignore, "ignore", n)
            start = np.cumsum([0] + offsets())
            i_parts = [a[start[i]:start[i + 1]] for i in range(npart)]
    return [delayed(_mask_partition)(p, w, i) for p, w, i in zip(parts, w_parts, i_parts)]


def _close_quietly(client: Any, cluster: Any) -> None:
    try:
        client.close()
        cluster.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
        pass


def open(url: str, *, storage_options: dict[str, Any] | None = None) -> MultipleImputation:  # noqa: A001
    """Open a written imputation output lazily.

    Parameters
    ----------
    url : str
        Directory written by :meth:`MultipleImputation.to_parquet` or ``dmice impute``.
    storage_options : dict, optional
        Passed to fsspec unchanged.

    Raises
    ------
    dmice.errors.OutputError
        When the output is incomplete (no ``_SUCCESS`` marker).
    """
    manifest = store.read_manifest(url, storage_options)
    return from_manifest(url, manifest, storage_options)


