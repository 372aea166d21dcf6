"""Public entry points: :func:`impute` and :func:`open`."""

from __future__ import annotations

import logging
import math
import numbers
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from dmice import block as _block
from dmice import engine as _engine
from dmice import rng as _rng
from dmice import store
from dmice.errors import InputError
from dmice.methods import SEPARATION, TargetModel
from dmice.result import MultipleImputation, from_manifest
from dmice.schema import MIN_LEVEL_COUNT, Schema, assign_methods, collapse_levels, combine_summaries, layout

log = logging.getLogger("dmice")

VISIT_SEQUENCES = ("roman", "arabic", "monotone")


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
           min_level_count: int = MIN_LEVEL_COUNT, collapse: dict[str, dict[Any, Any]] | None = None,
           separation: str = "firth", shrinkage: str | float | None = "auto"
           ) -> MultipleImputation:
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
        default), ``"norm"``, ``"poisson"`` (non-negative integer counts; never chosen by
        default, as in mice), ``"logreg"`` (binary, default), ``"logreg.firth"``,
        ``"polyreg"`` (unordered categories, default), ``"polr"`` (ordered categories,
        default), ``"sample"``, or ``""`` (not imputed).
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
    min_level_count : int, default 10
        Levels of a categorical *predictor* observed fewer times share one design column
        ("other"; joined to the reference level when that group is rare too); ``0`` disables.
        Ten is the usual events-per-parameter rule: a dummy with fewer rows carries an effect
        of the order of its standard error and often separates a binary or categorical target.
        Imputed values always keep the column's own levels.
    collapse : dict, optional
        ``{column: {level: group}}``: explicit merges of predictor levels (applied first).
        The mapping is recorded in the manifest and summarised in the logged events.
    separation : {"firth", "ridge", "error", "none"}, default "firth"
        What to do when a logistic or multinomial fit is separated (see
        :class:`dmice.methods.TargetModel` for the rule): refit a binary target with Firth's
        bias-reduced logistic regression (``logreg.firth``; multinomial targets get the ridge
        penalty), refit with a ridge penalty, raise, or keep the maximum-likelihood fit
        (mice's behaviour).  Each detection is a logged event.
    shrinkage : "auto", float or None, default "auto"
        Gaussian prior on the coefficients of ``polyreg`` models (intercepts excepted), fitted
        by Newton to its mode and drawn from the Laplace approximation.  ``"auto"``: for
        targets with a level observed fewer than ``min_level_count`` times, prior variance by
        empirical Bayes; a number: the prior standard deviation, for every polyreg target;
        None: off.

    Returns
    -------
    MultipleImputation

    Raises
    ------
    dmice.errors.InputError
        For bad arguments or data: the message names the parameter or column.

    Notes
    -----
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
    min_level_count = _check_int("min_level_count", min_level_count, 0)
    if collapse is not None and not isinstance(collapse, dict):
        raise InputError(f"collapse must be a dict of column -> {{level: group}}, got "
                         f"{type(collapse).__name__}")
    if separation not in SEPARATION:
        raise InputError(f"separation must be one of {list(SEPARATION)}, got {separation!r}")
    if not (shrinkage is None or shrinkage == "auto"
            or (isinstance(shrinkage, numbers.Real) and not isinstance(shrinkage, bool) and shrinkage > 0)):
        raise InputError(f"shrinkage must be 'auto', a prior standard deviation > 0 or None, got {shrinkage!r}")
    if len(set(map(str, ddf.columns))) != len(ddf.columns):
        raise InputError("column names must be unique strings")

    cluster = None
    if client is None:
        client, cluster = _engine.get_client()
    try:
        t0 = time.perf_counter()
        _engine.tune_workers(client)
        parts = ddf.to_delayed()
        summaries = _engine.summarize(client, parts)
        variables = combine_summaries(summaries, ddf.dtypes)
        events = [{"iteration": 0, **e} for e in assign_methods(variables, method)]
        events += [{"iteration": 0, **e} for e in collapse_levels(variables, min_level_count, collapse)]
        n_cols = layout(variables)
        rows = [next(iter(s.values()))["n"] if s else 0 for s in summaries]  # any column's count
        schema = Schema(variables=variables, n_rows=sum(rows), n_cols_encoded=n_cols,
                        partition_rows=rows)
        seq = _visit_sequence(schema, visit_sequence)
        for e in events:
            log.info("logged event: %s: %s", e["variable"], e["event"])
        pool_rate = {j: min(1.0, donor_pool / v.n_observed)
                     for j, v in enumerate(variables) if v.imputed}
        plan = _block.Plan(variables=tuple(variables), n_cols=n_cols, m=m, seed=seed,
                           pool_rate=pool_rate)
        blocks = _engine.encode(client, parts, plan)
        pools = _engine.gather_pools(client, blocks, plan)
        blocks = _engine.init_fill(client, blocks, plan, pools)
        models = {}
        for j, v in enumerate(variables):
            if not v.imputed:
                continue
            own = set(range(*v.cols))
            xcols = np.array([c for c in range(n_cols) if c not in own], dtype=np.int64)
            models[j] = TargetModel(j, v, xcols, m=m, seed=seed, donors=donors, ridge=ridge,
                                    sample_pool=pools[j], separation=separation, shrinkage=shrinkage,
                                    min_level_count=min_level_count)
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


