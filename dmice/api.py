"""Public entry points: :func:`impute` and :func:`open`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import posixpath
import time
import weakref
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from dmice import block as _block
from dmice import config as _settings
from dmice import formulas as _formulas
from dmice import passive as _passive
from dmice import post as _post
from dmice import predictors as _pred
from dmice import progress as _progress
from dmice import store
from dmice._gc import frozen
from dmice.disclosure import MIN_CELL_COUNT
from dmice.errors import InputError, OutputError, check_int
from dmice.parameters import ImputationConfig
from dmice.result import MultipleImputation, from_manifest
from dmice.runtime import cluster as _cluster
from dmice.runtime import engine as _engine
from dmice.runtime import passes as _passes
from dmice.runtime import session as _session
from dmice.schema import (
    BINARY,
    MIN_LEVEL_COUNT,
    NOMINAL,
    ORDINAL,
    Schema,
    assign_methods,
    collapse_levels,
    combine_summaries,
    layout,
)

log = logging.getLogger("dmice")

VISIT_SEQUENCES = ("roman", "arabic", "monotone")
#: most levels a ``by=`` grouping variable may have
MAX_BY_LEVELS = 50
#: observed values sampled per variable for the random initial fill (and, with ``donor_pool``, the
#: size of pmm's donor sample)
INIT_POOL = 10_000


def _as_dask(data: Any) -> Any:
    import dask.dataframe as dd

    if isinstance(data, dd.DataFrame):
        return data
    if isinstance(data, pd.DataFrame):
        _check_columns(data)
        return _passes.from_pandas(data)
    raise InputError(f"data must be a dask or pandas DataFrame, got {type(data).__name__}")


def _check_columns(ddf: Any) -> None:
    """Column labels must be unique strings (one level): every column is named in the schema,
    the manifest and errors by its label."""
    if isinstance(ddf.columns, pd.MultiIndex) or ddf.columns.nlevels > 1:
        raise InputError("the data has MultiIndex (hierarchical) column labels; dmice needs one string "
                         "label per column: flatten them first, e.g. df.columns = ['_'.join(c) for c in "
                         "df.columns]")
    bad = [i for i, c in enumerate(ddf.columns) if not isinstance(c, str)]
    if bad:
        raise InputError(f"column names must be unique strings; the columns at positions {bad[:10]} have "
                         "labels of another type (rename them, e.g. df.columns = df.columns.map(str))")
    if len(set(ddf.columns)) != len(ddf.columns):
        raise InputError("column names must be unique strings; some labels occur more than once")


def _visit_sequence(schema: Schema, visit_sequence: str | list[str]) -> list[int]:
    imputed = [schema.index(v.name) for v in schema.imputed if v.method != "passive"]
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
        if schema.variables[j].method == "passive":
            raise InputError(f"visit_sequence names passive column {name!r}; passive columns are "
                             "recomputed after each visit of their inputs")
        if j not in imputed:
            raise InputError(f"visit_sequence names column {name!r}, which is not imputed")
        seq.append(j)
    return seq


@frozen
def impute(data: Any, *, m: int = 5, max_iter: int = 10, seed: int | None = None,
           method: dict[str, str] | None = None, visit_sequence: str | list[str] = "roman",
           donors: int = 5, donor_pool: int | None = None, ridge: float = 1e-5,
           formulas: dict[str, str] | None = None, passive: dict[str, str] | None = None,
           substantive: str | None = None, substantive_family: str = "gaussian",
           predictors: dict[str, list[str]] | pd.DataFrame | None = None, where: Any = None,
           ignore: Any = None, post: dict[str, Any] | None = None, delta: dict[str, float] | None = None,
           by: str | None = None,
           until_rhat: float | None = None, checkpoint: str | None = None, checkpoint_every: int = 1,
           storage_options: dict[str, Any] | None = None,
           min_level_count: int = MIN_LEVEL_COUNT, collapse: dict[str, dict[Any, Any]] | None = None,
           separation: str = "firth", shrinkage: str | float | None = "auto",
           min_cell_count: int = MIN_CELL_COUNT,
           client: Any = None, progress: Any = "auto", _state: str | None = None
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
        Iterations of the chained loop (mice's ``maxit``); a ceiling when ``until_rhat``
        is given.
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
    donor_pool : int, optional
        By default predictive mean matching takes its donors from all observed rows, as R
        mice does (see Notes).  A number instead matches against a fixed sample of that many
        observed rows per variable (uniform over the partitions, shared by all chains): the
        former default, 10000, which biases pmm where donors are scarce.  It also sizes the
        pool of the random initial fill (10000 by default).
    ridge : float, default 1e-5
        mice's ridge: ``ridge * diag(X'X)`` is added to X'X in linear models.
    formulas : dict, optional
        The imputation model of a column as a formula, replacing its default predictors:
        ``{"chol": "chol ~ age * smoker + bs(sbp, df=3) + event"}`` (formulaic syntax:
        interactions, ``I()`` transforms, splines, categoricals).  Terms involving imputed
        variables are recomputed from each chain's current values at every visit.  The
        encoding (levels, knots) is fitted once on a sample of up to 20,000 rows.  See
        :mod:`dmice.formulas`.
    substantive : str, optional
        The analysis model, e.g. ``"y ~ x * z + I(x ** 2)"``: its partially observed continuous
        covariates are imputed compatibly with it by SMC-FCS (Bartlett et al. 2015), which
        keeps interactions and non-linear terms of imputed variables that formula-based
        imputation only approximates.  The outcome must be complete.  See
        :mod:`dmice.methods.smcfcs`.
    substantive_family : {"gaussian", "binomial"}, default "gaussian"
        Family of the substantive model (binomial: logit link, 0/1 outcome).
    passive : dict, optional
        Derived columns kept in sync with the imputations, e.g.
        ``{"bmi": "weight / (height / 100) ** 2"}``: recomputed from the imputed inputs after
        every visit that changes them, never imputed by a model, not a predictor of their own
        inputs; created when absent.  See :mod:`dmice.passive`.
    until_rhat : float, optional
        Stop before ``max_iter`` once every chain statistic's R-hat over the second half
        of the iterations is below this value (e.g. 1.05; needs m >= 2 and is first
        checked after 8 iterations).  The result equals a run with ``max_iter`` set to
        the iteration where it stopped.  R-hat from few iterations is noisy (5 well-mixed
        chains of 5 iterations often reach 1.2), so a strict value rarely stops early.
    checkpoint : str, optional
        fsspec URL where the state of the chains is saved every ``checkpoint_every``
        iterations.  When it already holds a checkpoint of the same configuration (same
        data, seed and parameters), the run resumes from it and gives exactly the result
        of an uninterrupted run; a checkpoint of another configuration is refused.
    checkpoint_every : int, default 1
    storage_options : dict, optional
        Passed to fsspec unchanged for ``checkpoint``.
    client : distributed.Client, optional
        Client to run on.  Default: the active client, else an embedded LocalCluster
        that lives as long as the result (close it with ``result.close()`` or a
        ``with`` block).
    progress : {"auto", "bar", "log"}, False or callable, default "auto"
        A progress bar (iteration, variable, elapsed, remaining) in a terminal or notebook,
        else one ``key=value`` line per iteration on the ``dmice`` logger (iteration,
        seconds, max R-hat); a callable gets ``(iteration, max_iter, seconds)`` after each
        iteration.  See :mod:`dmice.progress`.
    predictors : dict or pandas.DataFrame, optional
        Predictors of each conditional model: ``{"chol": ["age", "sbp", "event"]}``, or a
        predictor matrix as mice's ``predictorMatrix`` (rows: targets, columns:
        predictors, 1 = used; e.g. from :func:`dmice.quickpred`).  Targets not listed
        use every other variable, the analysis outcome included (the default).
    where : DataFrame or dict, optional
        Boolean cells to impute besides the missing ones: a pandas or dask DataFrame of
        booleans with some of the data's columns (a dask frame must have the same
        partitions; a pandas one is aligned by row position), or a dict column ->
        boolean array / Series of the data's length, or column -> name of a boolean
        column of the data (``{"bmi": "bmi_recheck"}``).  Observed cells marked True are
        imputed too (over-imputation) and are left out of the fitting rows of their
        column's model.  Missing cells are always imputed; use ``method={col: ""}`` to
        leave a column alone.
    ignore : array-like of bool or str, optional
        Rows left out of every model fit (mice's ``ignore``), e.g. a validation set;
        their missing cells are still imputed and their observed values still serve
        as predictors.  A boolean array / pandas Series of the data's length, a dask
        Series with the data's partitions, or the name of a boolean column of the data.

        A column named by ``where`` or ``ignore`` is a marker: it must be boolean without
        missing values, it is kept in the completed data as it is, and it is no
        predictor of any model.
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
    min_level_count : int, default 10
        Levels of a categorical *predictor* observed fewer times share one design column
        ("other"; joined to the reference level when that group is rare too); ``0`` disables.
        Ten is the usual events-per-parameter rule: a dummy with fewer rows carries an effect
        of the order of its standard error and often separates a binary or categorical target.
        Imputed values always keep the column's own levels.
    collapse : dict, optional
        ``{column: {level: group}}``: explicit merges of predictor levels (applied first).
        The mapping is recorded in the manifest (without the levels that ``min_cell_count``
        keeps unnamed) and summarised in the logged events.
    separation : {"firth", "ridge", "error", "none"}, default "firth"
        What to do when a logistic or multinomial fit is separated (see
        :class:`dmice.models.glm.NewtonModel` for the rule): refit a binary target with Firth's
        bias-reduced logistic regression (``logreg.firth``; multinomial targets get the ridge
        penalty), refit with a ridge penalty, raise, or keep the maximum-likelihood fit
        (mice's behaviour).  Each detection is a logged event.
    shrinkage : "auto", float or None, default "auto"
        Gaussian prior on the coefficients of ``polyreg`` models (intercepts excepted), fitted
        by Newton to its mode and drawn from the Laplace approximation.  ``"auto"``: for
        targets with a level observed fewer than ``min_level_count`` times, prior variance by
        empirical Bayes; a number: the prior standard deviation, for every polyreg target;
        None: off.

    min_cell_count : int, default 10
        Threshold of the small-cell rule for everything dmice writes *about* the data (the
        manifest, chain statistics, plots, report, logs; see :mod:`dmice.disclosure`): levels
        observed fewer times are never named, every count written is 0 or at least this, and
        histogram edges lie on round numbers inside the ``min_cell_count``-th smallest and
        largest value.  Recorded in the manifest; the imputations are not affected.  ``1``
        switches the rule off.

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
    previous iteration; each chain's Newton steps stop once its remaining error is predicted below
    0.05 standard errors (Newton's quadratic contraction constant is measured on the
    first, cold-started fit of each variable) or a step is below 0.2 standard errors.
    Predictive mean matching is type-1 matching on all observed rows: in each visit the
    workers send every chain's sorted predictions of the observed rows (from ``beta_hat``),
    with their observed values, and of the missing rows (from ``beta*``); the client merges
    them, takes one of the ``donors`` nearest at random for each missing cell and sends the
    values back (rounds of at most 64 MB).  Missing cells whose predictions lie where observed
    rows are scarce are counted and logged as donor scarcity, with ``norm`` as the alternative.

    Examples
    --------
    >>> imp = dmice.impute(ddf, m=5, max_iter=10, seed=1)   # doctest: +SKIP
    >>> imp.complete(1).head()                              # doctest: +SKIP
    """
    config = ImputationConfig(
        m=m, max_iter=max_iter, seed=seed, method=method, visit_sequence=visit_sequence, donors=donors,
        donor_pool=donor_pool, ridge=ridge, formulas=formulas, passive=passive, substantive=substantive,
        substantive_family=substantive_family, predictors=predictors, where=where, ignore=ignore, post=post,
        delta=delta, by=by, until_rhat=until_rhat, min_level_count=min_level_count, collapse=collapse,
        separation=separation, shrinkage=shrinkage, min_cell_count=min_cell_count)
    return run(data, config, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
               storage_options=storage_options, client=client, progress=progress, _state=_state)


def run(data: Any, config: ImputationConfig, *, checkpoint: str | None = None, checkpoint_every: int = 1,
        storage_options: dict[str, Any] | None = None, client: Any = None, progress: Any = "auto",
        _state: str | None = None) -> MultipleImputation:
    """:func:`impute` with its parameters as one :class:`dmice.parameters.ImputationConfig` (how
    job files and continued outputs run); the other arguments as for :func:`impute`."""
    ddf = _as_dask(data)
    config = config.checked()
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise InputError(f"checkpoint must be a URL string, got {type(checkpoint).__name__}")
    _progress.check(progress)
    m, max_iter, seed, method = config.m, config.max_iter, config.seed, config.method
    visit_sequence, donor_pool, by = config.visit_sequence, config.donor_pool, config.by
    predictors, where, ignore, post, delta = config.predictors, config.where, config.ignore, config.post, config.delta
    min_level_count, collapse, until_rhat = config.min_level_count, config.collapse, config.until_rhat
    substantive_family = config.substantive_family
    _check_columns(ddf)
    passive_specs = _passive.parse(config.passive, [str(c) for c in ddf.columns])
    if method and set(method) & set(passive_specs):
        raise InputError(f"columns {sorted(set(method) & set(passive_specs))} are passive; they take no "
                         "method")
    ddf = _passive.prepare(ddf, passive_specs)
    formula_rhs = _formulas.parse(config.formulas, [str(c) for c in ddf.columns])
    sub_rhs = _parse_substantive(config.substantive, substantive_family, [str(c) for c in ddf.columns])
    both = set(formula_rhs) & set(passive_specs)
    if both:
        raise InputError(f"columns {sorted(both)} are passive; they take no formula")
    params = config.record({k: p.expression for k, p in passive_specs.items()}, formula_rhs)

    cluster = None
    if client is None:
        client, cluster = _cluster.get_client()
    try:
        t0 = time.perf_counter()
        _cluster.tune_workers(client)
        parts = ddf.to_delayed()
        if where is not None or ignore is not None:
            _check_markers(ddf, where, ignore)
            parts = _masked_parts(client, ddf, parts, where, ignore)
        summaries = _passes.summarize(client, parts)
        variables = combine_summaries(summaries, ddf.dtypes)
        events = [{"iteration": 0, **e} for e in assign_methods(variables, method)]
        passive_idx = _passive_plan(variables, passive_specs)
        by_j = _check_by(variables, by, method)
        _check_where_methods(variables, where)
        events += [{"iteration": 0, **e} for e in collapse_levels(variables, min_level_count, collapse)]
        n_cols = layout(variables)
        names = [v.name for v in variables]
        exclude = ([] if by_j is None else [by_j]) + [names.index(c) for c in _markers(where, ignore)]
        sets, pred_events = _pred.resolve(predictors, variables, exclude=exclude)
        events += [{"iteration": 0, **e} for e in pred_events]
        post_funcs = _post_plan(variables, post, delta)
        rows = [next(iter(s.values()))["n"] if s else 0 for s in summaries]  # any column's count
        schema = Schema(variables=variables, n_rows=sum(rows), n_cols_encoded=n_cols,
                        partition_rows=rows)
        seq = _visit_sequence(schema, visit_sequence)
        memory = _check_memory(client, schema, m, n_cols, summaries)
        log.info("dmice: the chains' state takes an estimated %s at peak on the busiest of %d workers "
                 "(%s in all)", _size(memory["busiest"]), memory["workers"], _size(sum(memory["peak"])))
        for e in events:
            log.info("logged event: %s: %s", e["variable"], e["event"])
        pool_rate = {j: min(1.0, (donor_pool or INIT_POOL) / v.n_observed)
                     for j, v in enumerate(variables) if v.imputed}
        fitted, sub = _fit_formulas(client, ddf, variables, formula_rhs, seed, schema.n_rows, sub_rhs,
                                    substantive_family, events)
        plan = _block.Plan(variables=tuple(variables), n_cols=n_cols, m=m, seed=seed,
                           pool_rate=pool_rate, passive=passive_idx, formulas=fitted, substantive=sub,
                           post=post_funcs, by=by_j,
                           design_cache=(_settings.get("design-cache.observed"),
                                         _settings.get("design-cache.missing")))
        encoded = _passes.encode(client, parts, plan)
        pools = _passes.gather_pools(client, encoded, plan)
        filled = _passes.init_fill(client, encoded, plan, pools)
        setup = {"sets": sets, "labels": _pred.column_labels(variables, n_cols)}
        models = _session.make_models(plan, pools, params, setup, events)
        eng = _engine.Engine(client, plan, filled, models, schema, origin=encoded)
        del filled  # the engine's from here: it lets them go once the chains have moved on
        config_hash = _config_hash(params, variables, rows)
        session = _session.Session(eng, pools=pools, setup=setup, params=params, seq=seq, events=events,
                                   config=config_hash, cluster=cluster)
        session.memory = memory
        log.info("dmice: %d rows, %d partitions, %d columns to impute, m=%d; set up in %.2f s",
                 schema.n_rows, len(parts), len(models), m, time.perf_counter() - t0)
        restored = _state if _state is not None else None
        state_so = storage_options
        if restored is None and checkpoint is not None:
            ptr = store.latest_checkpoint(checkpoint, storage_options)
            if ptr is not None:
                restored = ptr["dir"]
        if restored is not None:
            meta, model_state, chains = store.read_state_meta(restored, state_so)
            if meta.get("config") != config_hash:
                raise OutputError(f"the chain state at {restored!r} belongs to another configuration "
                                  "(data, seed or parameters differ); remove it or use another "
                                  "checkpoint URL")
            eng.load_state(restored, state_so, model_state, int(meta["iteration"]))
            eng.chain_stats = chains.to_dict("records")
            events[:] = meta["events"]
            log.info("dmice: resumed the chains at iteration %d", eng.iteration)
        if seq:
            session.run(max_iter - eng.iteration, progress, until_rhat, checkpoint, checkpoint_every,
                        storage_options)
        else:
            eng.iteration = max_iter
    except BaseException:
        _cluster.close(client, cluster)
        raise
    result = MultipleImputation(
        m=m, iterations=eng.iteration, seed=seed, columns=[str(c) for c in ddf.columns],
        method={v.name: v.method for v in variables}, n_missing={v.name: v.n_missing for v in variables},
        n_rows=schema.n_rows, visit_sequence=[variables[j].name for j in seq],
        logged_events=events, chain_stats=eng.chain_stats,
        dtypes={str(c): str(t) for c, t in ddf.dtypes.items()},
        session=session, ddf=ddf, schema=schema)
    # not part of the configuration hash: it changes what is written about the chains, not them
    result.parameters = {**params, "min_cell_count": config.min_cell_count}
    if cluster is not None:
        weakref.finalize(result, _cluster.close, client, cluster, quiet=True)
    return result


def _parse_substantive(substantive: Any, family: Any, columns: list[str]) -> tuple[str, str] | None:
    """Validate ``substantive``: returns (outcome, right-hand side) or None."""
    from dmice.methods.smcfcs import FAMILIES

    if substantive is None:
        return None
    if family not in FAMILIES:
        raise InputError(f"substantive_family must be one of {list(FAMILIES)}, got {family!r}")
    if not isinstance(substantive, str) or "~" not in substantive:
        raise InputError(f"substantive must be a formula 'outcome ~ terms', got {substantive!r}")
    outcome = substantive.split("~", 1)[0].strip()
    if outcome not in columns:
        raise InputError(f"substantive model: unknown outcome column {outcome!r}")
    rhs = _formulas.parse({outcome: substantive}, columns)[outcome]
    return outcome, rhs


def _fit_formulas(client: Any, ddf: Any, variables: list[Any], rhs: dict[str, str], seed: int,
                  n_rows: int, sub_rhs: tuple[str, str] | None = None, family: str = "gaussian",
                  events: list[dict[str, Any]] | None = None) -> tuple[dict[int, Any], Any]:
    """Fit the encodings of the per-variable formulas and of the substantive model on a sample
    of rows; mark the covariates SMC-FCS imputes."""
    if not rhs and sub_rhs is None:
        return {}, None
    for name in rhs:
        v = next(v for v in variables if v.name == name)
        if not v.imputed or v.method == "sample":
            raise InputError(f"formula for {name!r}: the column is not imputed by a model "
                             f"(method {v.method!r}, {v.n_missing} missing)")
    frac = min(1.0, _formulas.SAMPLE_ROWS / max(n_rows, 1))
    (rows,) = _passes.compute(client, ddf.sample(frac=frac, random_state=seed % 2**32))
    sample = _formulas.sample_frame(rows, variables)
    fitted = _formulas.fit(rhs, sample, variables) if rhs else {}
    if sub_rhs is None:
        return fitted, None
    from dmice.methods.smcfcs import Substantive

    outcome, terms = sub_rhs
    names = [v.name for v in variables]
    y = variables[names.index(outcome)]
    if y.incomplete:
        raise InputError(f"substantive model: the outcome {outcome!r} has {y.n_missing} missing values; "
                         "SMC-FCS here needs a complete outcome")
    if family == "binomial" and y.kind != "binary":
        raise InputError(f"substantive model: a binomial outcome must be binary; {outcome!r} is {y.kind}")
    if family == "gaussian" and y.kind != "continuous":
        raise InputError(f"substantive model: a gaussian outcome must be continuous; {outcome!r} is "
                         f"{y.kind}")
    model = _formulas.fit({outcome: terms}, sample, variables)[names.index(outcome)]
    for k in model.inputs:
        v = variables[k]
        if not v.imputed:
            continue
        if v.name in rhs:
            raise InputError(f"column {v.name!r} has a formula and is a covariate of the substantive "
                             "model; SMC-FCS imputes it from the substantive model")
        if v.kind == "continuous" and v.method in ("pmm", "norm"):
            v.method = "smcfcs"
        elif events is not None:
            events.append({"iteration": 0, "variable": v.name,
                           "event": f"covariate of the substantive model imputed by {v.method}, not "
                                    f"SMC-FCS (which handles continuous covariates only)"})
    return fitted, Substantive(f"{outcome} ~ {terms}", family, names.index(outcome), model)


def _passive_plan(variables: list[Any], specs: dict[str, Any]) -> dict[int, Any]:
    """Mark passive variables and map them to their inputs' indices (checking both)."""
    names = [v.name for v in variables]
    out = {}
    for name, spec in specs.items():
        v = variables[names.index(name)]
        if v.kind != "continuous":
            raise InputError(f"passive column {name!r} must be continuous; its values are {v.kind}")
        idx = tuple(names.index(i) for i in spec.inputs)
        for i in idx:
            inp = variables[i]
            if inp.incomplete and not inp.imputed:
                raise InputError(f"passive column {name!r} uses {inp.name!r}, which has missing values "
                                 "but is not imputed")
        v.method = "passive" if v.incomplete else ""
        out[names.index(name)] = (spec, idx)
    return out


def _config_hash(params: dict[str, Any], variables: list[Any], rows: list[int]) -> str:
    """Hash of everything the chains depend on: parameters, schema and partitioning of the data."""
    desc = {"params": params, "rows": rows,
            "variables": [{**v.to_dict(), "center": repr(v.center), "scale": repr(v.scale),
                           "cols": list(v.cols), "integer": v.integer} for v in variables]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def _reopen(result: MultipleImputation, iterations: int, progress: Any, until_rhat: float | None,
            client: Any) -> MultipleImputation:
    """Continue the chains of a written output: rebuild the incomplete data from imputation 1
    and the stored cells, restore the chains' state and run more iterations."""
    import dask.dataframe as dd
    from dask import delayed

    man = result.manifest or {}
    params = man.get("parameters")
    if params and man.get("state"):
        # the parameters as given (the manifest's leave out the rare levels of collapse=)
        meta = store.read_state_meta(posixpath.join(result.url.rstrip("/"), man["state"]),
                                     result._storage_options)[0]
        params = meta.get("parameters") or params
    if not params or not man.get("state"):
        raise InputError(f"the output {result.url!r} holds no chain state to continue from (written "
                         "by an older version, or without state)")
    config = replace(ImputationConfig.from_record(params, result.url),
                     max_iter=result.iterations + iterations, until_rhat=until_rhat)
    state_url = posixpath.join(result.url.rstrip("/"), man["state"])
    first = result.complete(1)
    parts = [delayed(store.incomplete_partition)(p, state_url, i, result.columns, result._storage_options)
             for i, p in enumerate(first.to_delayed())]
    ddf = dd.from_delayed(parts, meta=first._meta, verify_meta=False)
    return run(ddf, config, storage_options=result._storage_options, client=client, progress=progress,
               _state=state_url)


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


def _markers(where: Any, ignore: Any) -> list[str]:
    """The columns of the data that ``where`` and ``ignore`` name (marker columns)."""
    out = [ignore] if isinstance(ignore, str) else []
    if isinstance(where, dict):
        out += [v for v in where.values() if isinstance(v, str) and v not in out]
    return out


def _check_markers(ddf: Any, where: Any, ignore: Any) -> None:
    """Marker columns exist and are boolean (their values are checked where they are read)."""
    names = [str(c) for c in ddf.columns]
    for c in _markers(where, ignore):
        if c not in names:
            raise InputError(f"where or ignore names unknown column {c!r}; columns are {names}")
        dt = ddf.dtypes[c]
        if not pd.api.types.is_bool_dtype(dt):
            raise InputError(f"where or ignore names column {c!r} of dtype {dt}; a marker column must "
                             "be boolean")
    if isinstance(where, dict):
        bad = [k for k, v in where.items() if isinstance(v, str) and str(k) == v]
        if bad:
            raise InputError(f"where marks the cells of {bad} by the column itself; name a boolean "
                             "marker column")


def _marker(df: pd.DataFrame, name: str, what: str) -> np.ndarray:
    """The values of the boolean marker column ``name`` of a partition."""
    col = df[name]
    if col.isna().any():
        raise InputError(f"{what}: marker column {name!r} has missing values; it must be boolean")
    return col.to_numpy(dtype=bool)


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
            if not isinstance(where[key], str):  # a marker column: as a dask frame (above)
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
            w = _marker(df, w, f"where[{col!r}]") if isinstance(w, str) else np.asarray(w)
            if len(w) != len(df):
                raise InputError(f"where column {col!r} has {len(w)} rows in partition where the data "
                                 f"have {len(df)}; give where with the data's partitions")
            if w.dtype != bool:
                raise InputError(f"where column {col!r} must be boolean, got dtype {w.dtype}")
            if w.any():
                out[col] = out[col].mask(w)
    if ignore is not None:
        ign = _marker(df, ignore, "ignore") if isinstance(ignore, str) else np.asarray(ignore)
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
            lens = _passes.map_partitions(client, parts, len)
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
            named = {str(c): where[c] for c in cols if isinstance(where[c], str)}  # marker columns
            given = [c for c in cols if str(c) not in named]
            n = sum(offsets()) if given else None
            arrays = {str(c): _bool_array(where[c], f"where[{c!r}]", n) for c in given}
            start = np.cumsum([0] + offsets()) if given else None
            w_parts = [{**named, **{c: a[start[i]:start[i + 1]] for c, a in arrays.items()}}
                       for i in range(npart)]
    if isinstance(ignore, str):
        i_parts = [ignore] * npart  # a marker column, read in each partition
    elif ignore is not None:
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


#: the fraction of a worker's memory limit the imputation state may take is dask config
#: ``dmice.memory.fraction`` (0.6): dask pauses a worker at 80% and the state (held outside
#: dask's managed memory) cannot be spilled
#: peak worker memory (RSS high-water mark) over the state it holds, measured at 20k-200k rows and
#: m = 20-1000 (1.33-1.37)
PEAK_SLACK = 1.35
#: memory of a worker process before it holds any data (interpreter, numpy, pandas, distributed)
WORKER_BASELINE = 200 * 2**20


def resident_bytes(schema: Schema, m: int, n_cols: int,
                   missing: list[dict[str, int]] | None = None) -> dict[str, Any]:
    """Estimate of the memory the chains' state takes on the workers, per partition.

    What :class:`dmice.block.Block` keeps for a partition of n rows: the encoded design
    (n x ``n_cols``), per imputed variable its internal values, row masks and donor positions
    (about 4n numbers), the imputed cells of every chain (m x missing cells) and their encoded
    copy (m x missing cells x design width), the rows missing in two variables at once, and the
    cached design matrices of its model (capped by ``dmice.design-cache.*``).  ``total`` is one
    copy of every block; ``peak`` adds what a running loop holds besides (the blocks at rest
    and the previous round's blocks keep other copies of the imputed cells, and a visit its
    draws), per partition.

    ``missing``: per partition, column -> missing cells (default: spread evenly over the
    partitions).
    """
    cache_obs, cache_mis = _settings.get("design-cache.observed"), _settings.get("design-cache.missing")
    rows = schema.partition_rows or [schema.n_rows]
    imputed = [v for v in schema.variables if v.imputed]
    per_part, peak = [], []
    for i, n in enumerate(rows):
        share = n / max(schema.n_rows, 1)
        mis = {v.name: (missing[i][v.name] if missing is not None else v.n_missing * share) for v in imputed}
        b = 8.0 * n * n_cols  # D0
        cells = 0.0
        for v in imputed:
            k = mis[v.name]
            obs = n - k
            b += 8.0 * (2 * n + k + 2 * obs)  # values, mis_pos, mis, obs, pool
            cells += 8.0 * m * k * (1 + max(v.width, 0))  # imputed cells, their encoding
            b += min(8.0 * obs * n_cols, cache_obs) + min(8.0 * k * n_cols, cache_mis)
            b += 8.0 * n_cols * n_cols
        ks = sorted(mis.values())
        b += sum(16.0 * ks[a] * (len(ks) - 1 - a) for a in range(len(ks)))  # pairs: min of each pair
        per_part.append(b + cells)
        biggest = max([m * mis[v.name] * max(v.width, 1) for v in imputed] or [0.0])
        # two more copies of the imputed cells (blocks at rest, previous round), a visit's draws,
        # and what the allocator keeps of freed temporaries (measured: see the README)
        peak.append(PEAK_SLACK * (b + cells + 2 * 8.0 * m * sum(mis.values()) + 3 * 8.0 * biggest))
    return {"total": float(sum(per_part)), "per_partition": per_part, "peak": peak}


def _size(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.1f} GiB"
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def _check_memory(client: Any, schema: Schema, m: int, n_cols: int,
                  summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Refuse a run whose chains cannot fit in the workers' memory, before any block is built.
    Returns the estimate (:func:`resident_bytes`, with ``busiest``: the peak of the worker that
    gets the largest partitions, and ``workers``: their number)."""
    limits = _cluster.memory_limits(client)
    missing = [{v.name: int(s[v.name]["n_missing"]) for v in schema.variables if v.imputed}
               for s in summaries] if summaries and all(summaries) else None
    est = resident_bytes(schema, m, n_cols, missing)
    peak = sorted(est["peak"], reverse=True)
    per_worker = math.ceil(len(peak) / max(len(limits), 1))
    worst = sum(peak[:per_worker])  # the worker that gets the largest partitions
    est = {**est, "busiest": worst, "workers": len(limits)}
    if not limits or not all(limits):
        return est  # no limit known: nothing to compare with
    limit = min(limits)
    fraction = _settings.get("memory.fraction")
    usable = fraction * limit - WORKER_BASELINE
    if worst > usable or sum(peak) > fraction * sum(limits) - WORKER_BASELINE * len(limits):
        cells = sum(v.n_missing for v in schema.variables if v.imputed)
        base = sum(sorted(resident_bytes(schema, 0, n_cols, missing)["peak"], reverse=True)[:per_worker])
        each = (worst - base) / m  # what one more imputation costs the busiest worker
        fit = int((usable - base) // each) if each > 0 else 0
        advice = (f"lower m (at most about {fit} fit" if fit >= 1 else
                  "even m=1 does not fit (add worker memory")
        raise InputError(
            f"m={m} needs an estimated {_size(sum(peak))} of worker memory for the imputation state "
            f"({schema.n_rows} rows, {cells} missing cells, {len(peak)} partitions; about {_size(worst)} "
            f"on the busiest of {len(limits)} workers, {_size(each)} per imputation), but the workers "
            f"have {_size(limit)} each and {fraction:.0%} of that is usable (dask config "
            f"dmice.memory.fraction): {advice}), or add workers or worker memory (more, smaller "
            "partitions spread the state over more workers)")
    return est


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
    return from_manifest(url, manifest, storage_options, reopen=_reopen)


def quickpred(data: Any, *, mincor: float = 0.1, minpuc: float = 0.0, include: Iterable[str] | str = (),
              exclude: Iterable[str] | str = (), method: str = "pearson", client: Any = None) -> pd.DataFrame:
    """Predictor matrix selecting, for every incomplete variable, the predictors worth using.

    Follows mice's ``quickpred``: variable k predicts incomplete variable j when the
    larger of ``|cor(x_j, x_k)|`` (over rows where both are observed) and
    ``|cor(r_j, x_k)|`` (``r_j`` the indicator that ``x_j`` is observed, over rows
    where ``x_k`` is observed) exceeds ``mincor``, and the proportion of usable cases
    (rows with ``x_j`` missing in which ``x_k`` is observed) is at least ``minpuc``.
    Columns in ``exclude`` are then removed and columns in ``include`` added for every
    row; complete variables get an empty row.

    Parameters
    ----------
    data : dask.dataframe.DataFrame or pandas.DataFrame
        The incomplete data.
    mincor : float, default 0.1
        Minimum absolute correlation.
    minpuc : float, default 0
        Minimum proportion of usable cases.
    include, exclude : list of str, optional
        Columns always / never used as predictors (``include`` wins).
    method : {"pearson"}
        Correlation type; only Pearson correlations are computed from distributed sums.
    client : distributed.Client, optional
        Client to run on (default: the active client, else a temporary LocalCluster).

    Returns
    -------
    pandas.DataFrame
        Square 0/1 matrix indexed and columned by the column names, to pass as
        ``predictors=`` to :func:`dmice.impute`.

    Notes
    -----
    The statistics are sums over the partitions of pairwise products, in one pass
    after the schema pass.  Categorical columns enter as their level codes, like R's
    ``data.matrix``; levels of a categorical dtype that are never observed are not
    counted, which can change the codes (and the correlations) of such a column.
    Columns of unsupported types get empty rows and columns.

    Examples
    --------
    >>> pm = dmice.quickpred(ddf, mincor=0.2, include=["age"])   # doctest: +SKIP
    >>> imp = dmice.impute(ddf, predictors=pm)                    # doctest: +SKIP
    """
    from dmice import predictors as _p

    if method != "pearson":
        raise InputError(f"method must be 'pearson' (rank correlations cannot be reduced from sums), "
                         f"got {method!r}")
    for name, val in (("mincor", mincor), ("minpuc", minpuc)):
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or not 0 <= val <= 1:
            raise InputError(f"{name} must be a number between 0 and 1, got {val!r}")
    ddf = _as_dask(data)
    names = [str(c) for c in ddf.columns]
    include = _p._name_list(include, "include", names)
    exclude = _p._name_list(exclude, "exclude", names)
    cluster = None
    if client is None:
        client, cluster = _cluster.get_client()
    try:
        parts = ddf.to_delayed()
        variables = combine_summaries(_passes.summarize(client, parts), ddf.dtypes)
        pieces = _passes.map_partitions(client, parts, _p.quickpred_partition, variables)
    finally:
        _cluster.close(client, cluster)
    total = {k: sum(p[k] for p in pieces) for k in pieces[0]}
    usable = np.array([v.kind != _p.UNSUPPORTED for v in variables])
    return _p.quickpred_matrix(total, names, mincor=float(mincor), minpuc=float(minpuc), include=include,
                            exclude=exclude, usable=usable)
