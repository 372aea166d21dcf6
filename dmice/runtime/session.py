"""The live chains of one imputation: what a result held on the cluster owns.

A :class:`Session` holds the engine (plan, models, the blocks on the workers), the sampling
pools and predictor setup the models are built from, the visit sequence, the logged events,
the configuration hash and parameters, and the embedded cluster when dmice started one.  It
runs more iterations (with progress, the R-hat stopping rule and checkpoints), adds chains,
and closes what it owns.  :func:`make_models` builds the conditional model of every imputed
variable of a plan.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from dmice import block as _block
from dmice import config as _settings
from dmice import predictors as _pred
from dmice import progress as _progress
from dmice import store
from dmice.models import make_model
from dmice.models.stratified import StratifiedModel
from dmice.runtime import cluster as _cluster
from dmice.runtime import passes as _passes
from dmice.runtime.engine import Engine

log = logging.getLogger("dmice")


def make_models(plan: _block.Plan, pools: dict[int, np.ndarray], params: dict[str, Any],
                setup: dict[str, Any], events: list[dict[str, Any]] | None = None) -> dict[int, Any]:
    """The conditional model of every imputed variable of ``plan`` (passive variables have none).

    Parameters
    ----------
    plan : dmice.block.Plan
        Variables, chains and the per-variable formulas of the run.
    pools : dict
        Each imputed variable's sample of observed values (the initial fill and ``sample``).
    params : dict
        The run's parameters (``donors``, ``ridge``, ``separation``, ``shrinkage``,
        ``min_level_count``, ``donor_pool``).
    setup : dict
        The predictor set of each variable (``sets``) and the names of the encoded columns
        (``labels``, for logged events).
    events : list, optional
        Where to log a passive variable removed from the predictors of one of its inputs.
    """
    models: dict[int, Any] = {}
    variables = list(plan.variables)
    common = {"m": plan.m, "seed": plan.seed, "donors": params["donors"], "ridge": params["ridge"],
              "chain0": plan.chain0, "labels": setup["labels"], "separation": params["separation"],
              "shrinkage": params["shrinkage"], "min_level_count": params["min_level_count"],
              # pmm matches on all observed rows unless a donor sample size is given
              "exact": params.get("donor_pool") is None, "match_bytes": _settings.get("pmm.match-bytes")}
    for j, v in enumerate(variables):
        if not v.imputed or v.method == "passive":
            continue
        if v.method == "smcfcs":
            from dmice.models.smcfcs import SmcfcsModel

            sub = plan.substantive
            own = {c for k in sub.model.inputs if k != j for c in range(*variables[k].cols)}
            xcols = np.array([0] + sorted(own), dtype=np.int64)
            models[j] = SmcfcsModel(j, v, xcols, sample_pool=pools[j], substantive=sub,
                                    n_sub=sub.model.width, **common)
            continue
        if j in plan.formulas:
            xcols = np.arange(plan.formulas[j].width)
        else:
            xcols = _pred.xcols(variables, setup["sets"][j])
            for p, (_, idx) in plan.passive.items():  # a passive variable never predicts its own inputs
                pc = set(range(*variables[p].cols))
                if j in idx and pc & set(xcols.tolist()):
                    xcols = np.array([c for c in xcols if c not in pc], dtype=np.int64)
                    if events is not None:
                        events.append({"iteration": 0, "variable": v.name,
                                       "event": f"passive {variables[p].name!r} removed from the "
                                                "predictors (it is computed from this variable)"})
        if plan.by is None:
            models[j] = make_model(j, v, xcols, sample_pool=pools[j], **common)
            continue
        vb = variables[plan.by]
        models[j] = StratifiedModel(
            {g: make_model(j, replace(v, name=f"{v.name} [{vb.name} level {g + 1}]"), xcols,
                            sample_pool=pools[j], stream=(g + 1,), **common)
             for g in range(vb.n_levels)}, vb.name, list(vb.levels))
    return models


def merge_states(a: Any, b: Any) -> Any:
    """The model state of chains ``a`` followed by chains ``b``: warm starts side by side."""
    if isinstance(a, dict):
        out = {}
        for k, va in a.items():
            vb = b.get(k) if isinstance(b, dict) else None
            if k == "beta":
                out[k] = None if va is None or vb is None else np.concatenate([va, vb])
            elif k == "curvature":
                out[k] = max(va, vb or 0.0)
            else:
                out[k] = merge_states(va, vb)
        return out
    return a


class Session:
    """The chains of one imputation, alive on the cluster.

    Parameters
    ----------
    engine : dmice.runtime.engine.Engine
        Plan, models and the blocks on the workers.
    pools, setup
        What the models were built from (see :func:`make_models`), kept for added chains.
    params : dict
        The run's parameters.
    seq : list of int
        The visit sequence (indices of the variables).
    events : list of dict
        The logged events (appended to as the chains run).
    config : str
        Hash of everything the chains depend on (checkpoints carry it).
    cluster : distributed.LocalCluster, optional
        The embedded cluster dmice started for this session, closed with it.
    """

    def __init__(self, engine: Engine, *, pools: dict[int, np.ndarray], setup: dict[str, Any],
                 params: dict[str, Any], seq: list[int], events: list[dict[str, Any]], config: str,
                 cluster: Any = None) -> None:
        self.engine = engine
        self.pools = pools
        self.setup = setup
        self.params = params
        self.seq = seq
        self.events = events
        self.config = config
        self.cluster = cluster
        #: the estimate of the state on the workers (``dmice.api.resident_bytes``, with the peak of
        #: the busiest worker as ``busiest``), when the run made one
        self.memory: dict[str, Any] | None = None

    @property
    def client(self) -> Any:
        return self.engine.client

    def run(self, iterations: int, progress: Any = None, until_rhat: float | None = None,
            checkpoint: str | None = None, every: int = 1,
            storage_options: dict[str, Any] | None = None) -> None:
        """Run up to ``iterations`` more iterations: progress reported to ``progress`` (see
        :class:`dmice.progress.Reporter`; None or False: none), stopping early once every R-hat
        is below ``until_rhat``, the chains' state written under ``checkpoint`` every ``every``
        iterations."""
        _run(self.engine, iterations, self.seq, self.events, progress, until_rhat, checkpoint, every,
             storage_options, self.config)

    def add_chains(self, k: int, progress: Any = None) -> None:
        """Run ``k`` new chains for as many iterations as the existing ones and append them
        (chains ``m+1 .. m+k``, with their own random streams)."""
        eng = self.engine
        plan = eng.plan
        new_plan = replace(plan, m=k, chain0=plan.chain0 + plan.m)
        blocks = _passes.init_fill(eng.client, eng.blocks, new_plan, self.pools)
        new = Engine(eng.client, new_plan, blocks, make_models(new_plan, self.pools, self.params, self.setup),
                     eng.schema, origin=eng.origin)
        events: list[dict[str, Any]] = []
        if self.seq and eng.iteration:
            _run(new, eng.iteration, self.seq, events, progress, None, None, 1, None, self.config)
        # merge: the chains of both engines side by side, in chain order
        eng.append_chains(new)
        eng.plan = replace(plan, m=plan.m + k)
        merged = make_models(eng.plan, self.pools, self.params, self.setup)
        for j, mod in merged.items():
            mod.set_state(merge_states(eng.models[j].get_state(), new.models[j].get_state()))
        eng.models = merged
        for r in new.chain_stats:
            eng.chain_stats.append({**r, "chain": r["chain"] + plan.m})
        self.events.extend({**e, "event": f"added chains: {e['event']}"} for e in events)
        self.params = {**self.params, "m": plan.m + k}
        self.memory = None  # the estimate was made for the former m

    def close(self) -> None:
        """Release the chains on the workers and close the embedded cluster, if dmice started one."""
        self.engine.blocks = []
        cluster, self.cluster = self.cluster, None
        _cluster.close(self.engine.client, cluster)


def _run(eng: Engine, iterations: int, seq: list[int], events: list[dict[str, Any]],
         progress: Any, until_rhat: float | None, checkpoint: str | None, every: int,
         storage_options: dict[str, Any] | None, config: str) -> None:
    """Run the loop with progress reporting, the R-hat stopping rule and checkpoints."""
    from dmice.diagnostics import max_rhat

    if iterations <= 0:
        return

    memo: dict[int, float] = {}  # one R-hat per iteration, shared by the progress line and the stop rule

    def rhat_now() -> float:
        if eng.iteration not in memo:
            memo.clear()
            memo[eng.iteration] = (max_rhat(pd.DataFrame(eng.chain_stats), eng.iteration)
                                   if eng.plan.m > 1 else float("nan"))
        return memo[eng.iteration]

    dash = _cluster.dashboard_link(eng.client)
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
