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
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from dmice import block as _block
from dmice import engine as _engine
from dmice import formulas as _formulas
from dmice import passive as _passive
from dmice import progress as _progress
from dmice import rng as _rng
from dmice import store
from dmice.errors import InputError, OutputError
from dmice.methods import TargetModel
from dmice.result import MultipleImputation, from_manifest
from dmice.schema import Schema, assign_methods, combine_summaries, layout

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


def impute(data: Any, *, m: int = 5, max_iter: int = 10, seed: int | None = None,
           method: dict[str, str] | None = None, visit_sequence: str | list[str] = "roman",
           donors: int = 5, donor_pool: int = 10_000, ridge: float = 1e-5,
           formulas: dict[str, str] | None = None, passive: dict[str, str] | None = None,
           substantive: str | None = None, substantive_family: str = "gaussian",
           until_rhat: float | None = None, checkpoint: str | None = None, checkpoint_every: int = 1,
           storage_options: dict[str, Any] | None = None,
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
        the iteration where it stopped.
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
    first, cold-started fit of each variable) or a step is below 0.2 standard errors.
    Predictive mean matching matches against a sample of up to ``donor_pool`` observed
    rows rather than all of them.

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
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    if seed is None:
        seed = _rng.fresh_seed()
    seed = _check_int("seed", seed, 0)
    if method is not None and not isinstance(method, dict):
        raise InputError(f"method must be a dict of column -> method name, got {type(method).__name__}")
    if not isinstance(ridge, numbers.Real) or not ridge >= 0:
        raise InputError(f"ridge must be a number >= 0, got {ridge!r}")
    if until_rhat is not None and (isinstance(until_rhat, bool) or not isinstance(until_rhat, numbers.Real)
                                   or not until_rhat > 1):
        raise InputError(f"until_rhat must be a number > 1 (e.g. 1.05), got {until_rhat!r}")
    if until_rhat is not None and m < 2:
        raise InputError("until_rhat needs at least two chains (m >= 2)")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise InputError(f"checkpoint must be a URL string, got {type(checkpoint).__name__}")
    _progress.check(progress)
    if len(set(map(str, ddf.columns))) != len(ddf.columns):
        raise InputError("column names must be unique strings")
    passive_specs = _passive.parse(passive, [str(c) for c in ddf.columns])
    if method and set(method) & set(passive_specs):
        raise InputError(f"columns {sorted(set(method) & set(passive_specs))} are passive; they take no "
                         "method")
    ddf = _passive.prepare(ddf, passive_specs)
    formula_rhs = _formulas.parse(formulas, [str(c) for c in ddf.columns])
    sub_rhs = _parse_substantive(substantive, substantive_family, [str(c) for c in ddf.columns])
    both = set(formula_rhs) & set(passive_specs)
    if both:
        raise InputError(f"columns {sorted(both)} are passive; they take no formula")
    params = {"m": m, "seed": seed, "method": dict(method or {}),
              "visit_sequence": visit_sequence if isinstance(visit_sequence, str) else list(visit_sequence),
              "donors": donors, "donor_pool": donor_pool, "ridge": float(ridge),
              "passive": {k: p.expression for k, p in passive_specs.items()},
              "formulas": {k: f"{k} ~ {v}" for k, v in formula_rhs.items()},
              "substantive": substantive, "substantive_family": substantive_family}

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
        passive_idx = _passive_plan(variables, passive_specs)
        n_cols = layout(variables)
        rows = [next(iter(s.values()))["n"] if s else 0 for s in summaries]  # any column's count
        schema = Schema(variables=variables, n_rows=sum(rows), n_cols_encoded=n_cols,
                        partition_rows=rows)
        seq = _visit_sequence(schema, visit_sequence)
        for e in events:
            log.info("logged event: %s: %s", e["variable"], e["event"])
        pool_rate = {j: min(1.0, donor_pool / v.n_observed)
                     for j, v in enumerate(variables) if v.imputed}
        fitted, sub = _fit_formulas(client, ddf, variables, formula_rhs, seed, schema.n_rows, sub_rhs,
                                    substantive_family, events)
        plan = _block.Plan(variables=tuple(variables), n_cols=n_cols, m=m, seed=seed,
                           pool_rate=pool_rate, passive=passive_idx, formulas=fitted, substantive=sub)
        blocks = _engine.encode(client, parts, plan)
        pools = _engine.gather_pools(client, blocks, plan)
        blocks = _engine.init_fill(client, blocks, plan, pools)
        models = _make_models(plan, pools, params, events)
        eng = _engine.Engine(client, plan, blocks, models, schema)
        eng.pools = pools
        config = _config_hash(params, variables, rows)
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
            if meta.get("config") != config:
                raise OutputError(f"the chain state at {restored!r} belongs to another configuration "
                                  "(data, seed or parameters differ); remove it or use another "
                                  "checkpoint URL")
            eng.load_state(restored, state_so, model_state, int(meta["iteration"]))
            eng.chain_stats = chains.to_dict("records")
            events[:] = meta["events"]
            log.info("dmice: resumed the chains at iteration %d", eng.iteration)
        if seq:
            _run(eng, max_iter - eng.iteration, seq, events, progress, until_rhat,
                 checkpoint, checkpoint_every, storage_options, config)
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
    result.parameters = params
    result._config = config
    result._seq = seq
    if cluster is not None:
        weakref.finalize(result, _close_quietly, client, cluster)
    return result


def _make_models(plan: _block.Plan, pools: dict[int, np.ndarray], params: dict[str, Any],
                 events: list[dict[str, Any]] | None = None) -> dict[int, TargetModel]:
    """The conditional model of every imputed variable (passive variables have none)."""
    models = {}
    for j, v in enumerate(plan.variables):
        if not v.imputed or v.method == "passive":
            continue
        if v.method == "smcfcs":
            from dmice.methods.smcfcs import SmcfcsModel

            sub = plan.substantive
            own = {c for k in sub.model.inputs if k != j for c in range(*plan.variables[k].cols)
                   if k != sub.outcome}
            xcols = np.array([0] + sorted(own), dtype=np.int64)
            models[j] = SmcfcsModel(j, v, xcols, m=plan.m, seed=plan.seed, donors=params["donors"],
                                    ridge=params["ridge"], sample_pool=pools[j], chain0=plan.chain0,
                                    substantive=sub, n_sub=sub.model.width)
            continue
        if j in plan.formulas:
            models[j] = TargetModel(j, v, np.arange(plan.formulas[j].width), m=plan.m, seed=plan.seed,
                                    donors=params["donors"], ridge=params["ridge"], sample_pool=pools[j],
                                    chain0=plan.chain0)
            continue
        own = set(range(*v.cols))
        for p, (_, idx) in plan.passive.items():  # a passive variable never predicts its own inputs
            if j in idx and plan.variables[p].width:
                own |= set(range(*plan.variables[p].cols))
                if events is not None:
                    events.append({"iteration": 0, "variable": v.name,
                                   "event": f"passive {plan.variables[p].name!r} removed from the "
                                            "predictors (it is computed from this variable)"})
        xcols = np.array([c for c in range(plan.n_cols) if c not in own], dtype=np.int64)
        models[j] = TargetModel(j, v, xcols, m=plan.m, seed=plan.seed, donors=params["donors"],
                                ridge=params["ridge"], sample_pool=pools[j], chain0=plan.chain0)
    return models


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
    sample = _formulas.sample_frame(client.compute(ddf.sample(frac=frac, random_state=seed % 2**32))
                                    .result(), variables)
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


def _run(eng: _engine.Engine, iterations: int, seq: list[int], events: list[dict[str, Any]],
         progress: Any, until_rhat: float | None, checkpoint: str | None, every: int,
         storage_options: dict[str, Any] | None, config: str) -> None:
    """Run the loop with progress reporting, the R-hat stopping rule and checkpoints."""
    from dmice.diagnostics import max_rhat

    if iterations <= 0:
        return

    def rhat_now() -> float:
        return max_rhat(pd.DataFrame(eng.chain_stats), eng.iteration) if eng.plan.m > 1 else float("nan")

    dash = None
    try:
        dash = eng.client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard is not an error
        pass
    reporter = None if progress is None or progress is False else _progress.Reporter(
        progress, total=iterations, start=eng.iteration, visits_per_iteration=len(seq),
        max_rhat=rhat_now, dashboard=dash)

    def after(it: int) -> bool:
        if checkpoint is not None and it % every == 0:
            d = store.checkpoint_dir(checkpoint, it)
            eng.save_state(d, storage_options, {"config": config, "events": events},
                           pd.DataFrame(eng.chain_stats))
            store.publish_checkpoint(checkpoint, storage_options, {"dir": d, "iteration": it,
                                                                   "config": config})
        if until_rhat is not None:
            r = rhat_now()
            if r == r and r < until_rhat:  # not NaN
                log.info("dmice: every R-hat below %.3f at iteration %d; stopping", until_rhat, it)
                return True
        return False

    try:
        eng.run(iterations, seq, events, reporter, after)
    finally:
        if reporter is not None:
            reporter.close()


def _continue(result: MultipleImputation, iterations: int, progress: Any,
              until_rhat: float | None) -> None:
    """Run more iterations of an in-memory result (see :meth:`MultipleImputation.iterate`)."""
    eng = result._engine
    start = eng.iteration
    _run(eng, iterations, result._seq, result._events, progress, until_rhat, None, 1, None,
         result._config)
    result.iterations = eng.iteration
    result._chain = eng.chain_stats
    log.info("dmice: continued from iteration %d to %d", start, eng.iteration)


def _add_chains(result: MultipleImputation, k: int, progress: Any) -> None:
    """Run ``k`` new chains for as many iterations as the existing ones and append them."""
    eng = result._engine
    plan = eng.plan
    client = eng.client
    new_plan = replace(plan, m=k, chain0=plan.chain0 + plan.m)
    blocks = _engine.init_fill(client, eng.blocks, new_plan, eng.pools)
    models = _make_models(new_plan, eng.pools, result.parameters)
    new = _engine.Engine(client, new_plan, blocks, models, eng.schema)
    events: list[dict[str, Any]] = []
    if result._seq and eng.iteration:
        _run(new, eng.iteration, result._seq, events, progress, None, None, 1, None, result._config)
    # merge: the chains of both engines side by side, in chain order
    eng.blocks = [client.submit(_block.concat_chains, [a, b], pure=False)
                  for a, b in zip(eng.blocks, new.blocks)]
    eng.plan = replace(plan, m=plan.m + k)
    merged = _make_models(eng.plan, eng.pools, result.parameters)
    for j, mod in merged.items():
        a, b = eng.models[j].get_state(), new.models[j].get_state()
        beta = None if a["beta"] is None or b["beta"] is None else np.concatenate([a["beta"], b["beta"]])
        mod.set_state({"beta": beta, "curvature": max(a["curvature"], b["curvature"])})
    eng.models = merged
    for r in new.chain_stats:
        eng.chain_stats.append({**r, "chain": r["chain"] + plan.m})
    result._events.extend({**e, "event": f"added chains: {e['event']}"} for e in events)
    result.m = plan.m + k
    result.parameters = {**result.parameters, "m": plan.m + k}
    result._chain = eng.chain_stats


def _reopen(result: MultipleImputation, iterations: int, progress: Any, until_rhat: float | None,
            client: Any) -> MultipleImputation:
    """Continue the chains of a written output: rebuild the incomplete data from imputation 1
    and the stored cells, restore the chains' state and run more iterations."""
    import dask.dataframe as dd
    from dask import delayed

    man = result.manifest or {}
    params = man.get("parameters")
    if not params or not man.get("state"):
        raise InputError(f"the output {result.url!r} holds no chain state to continue from (written "
                         "by an older version, or without state)")
    state_url = posixpath.join(result.url.rstrip("/"), store.STATE_DIR)
    files = sorted((f for f in man["files"] if f["imputation"] == 1), key=lambda f: f["partition"])
    first = result.complete(1)
    parts = [delayed(store.incomplete_partition)(result.url, f["path"], state_url, f["partition"],
                                                 result.columns, result.dtypes, result._storage_options)
             for f in files]
    ddf = dd.from_delayed(parts, meta=first._meta, verify_meta=False)
    return impute(ddf, **params, max_iter=result.iterations + iterations, until_rhat=until_rhat,
                  storage_options=result._storage_options, client=client, progress=progress,
                  _state=state_url)


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


