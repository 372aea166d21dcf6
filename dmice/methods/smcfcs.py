"""Substantive-model-compatible imputation (SMC-FCS; Bartlett, Seaman, White and Carpenter 2015).

``impute(..., substantive="y ~ x * z + I(x ** 2)", substantive_family="gaussian")`` imputes
every partially observed continuous covariate of the analysis ("substantive") model so that
the imputations are compatible with it, interactions and non-linear terms of imputed
variables included, where a formula in the imputation model is only approximately so.

For a covariate x, each visit

1. fits the covariate model x | (the substantive model's other covariates), a normal linear
   regression, to the current completed data (all rows, all chains) and draws its
   parameters from their posterior, as ``norm`` does;
2. fits the substantive model to the current completed data — least squares from its Gram
   matrix (``gaussian``) or Newton from reduced gradients and Hessians (``binomial``, logit
   link) — and draws its parameters (normal-inverse-chi-square posterior, or the normal
   approximation);
3. on the workers, imputes each missing x by rejection sampling: candidates come from the
   covariate model; a candidate is accepted with probability ``f(y | x*, z) / max f`` —
   ``exp(-(y - mu)^2 / (2 sigma^2))`` for a normal outcome, ``p^y (1 - p)^(1 - y)`` for a
   binary one.  Each try draws several candidates per still-pending row (more for rows
   that keep being rejected), which is the same sequential sampler evaluated in batches;
   rows with no accepted candidate after :data:`MAX_CANDIDATES` keep their previous value
   (a logged event, as smcfcs's ``rjlimit``).

The outcome must be complete.  Only continuous covariates are imputed this way; other
incomplete covariates of the substantive model keep their own method (a logged event).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit

from dmice import rng as _rng
from dmice.glm import kernels as stats

#: candidates tried per missing cell before its previous value is kept (smcfcs's rjlimit)
MAX_CANDIDATES = 5000
FAMILIES = ("gaussian", "binomial")


@dataclass(frozen=True)
class Substantive:
    formula: str
    family: str
    outcome: int  # variable index of the outcome
    model: Any  # dmice.formulas.FormulaModel of the right-hand side


# ---------------------------------------------------------------------------
# workers


def stats_of(block: Any, plan: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Covariate-model Gram matrix and substantive-model statistics on the completed data."""
    from dmice import block as _b

    j = request["var"]
    v = plan.variables[j]
    sub = plan.substantive
    n = block.n
    key = ("gram", "all")
    if key not in block.cache:
        block.cache[key] = block.D0.T @ block.D0
    G = _b.weighted_gram(block, plan, np.ones(n), _b.imputed_parts(block, plan), base=block.cache[key])
    sel = np.append(request["xcols"], v.cols[0])
    out_sum: dict[str, np.ndarray] = {"n": np.array(float(n)), "G": G[:, sel][:, :, sel]}
    y = block.values[sub.outcome]
    rows = np.arange(n)
    designs = _b.formula_designs(block, plan, "substantive", rows, "all", fm=sub.model)
    if sub.family == "gaussian":
        out_sum["Gs"] = np.stack([np.column_stack([X, y]).T @ np.column_stack([X, y]) for X in designs])
    else:
        res = [stats.logistic(X, y, request["sub_beta"][c]) for c, X in enumerate(designs)]
        out_sum["gs"] = np.stack([r["g"] for r in res])
        out_sum["Hs"] = np.stack([r["H"] for r in res])
    return {"sum": out_sum, "cat": {}}


def impute(block: Any, plan: Any, order: dict[str, Any], j: int, rows: np.ndarray
           ) -> tuple[np.ndarray, int]:
    """New values of the missing cells of covariate ``j`` in every chain, by rejection sampling,
    and the number of cells that kept their previous value."""
    from dmice import block as _b
    from dmice.formulas import design

    v = plan.variables[j]
    sub = plan.substantive
    eta = _b.linear_predictor(block, plan, _b._full_coef(plan, order["xcols"], order["beta"]), rows=rows)
    y = block.values[sub.outcome][rows]
    out = block.imp[j].copy()
    m = plan.m
    gens = [_rng.generator(plan.seed, _rng.WORKER, plan.chain0 + c, order["iteration"], j, block.part)
            for c in range(m)]
    frames = [_b._formula_frame(block, plan, sub.model, rows, c) for c in range(m)]
    pending = [np.arange(len(rows)) for _ in range(m)]
    tried = np.zeros(m, dtype=np.int64)
    while True:
        # one batch for every chain: k candidates per pending row (more as fewer rows remain)
        batch = []
        for c in range(m):
            if not len(pending[c]) or tried[c] >= MAX_CANDIDATES:
                continue
            k = int(min(MAX_CANDIDATES - tried[c], max(1, -(-len(rows) // len(pending[c])))))
            idx = np.repeat(pending[c], k)
            cand = v.center + v.scale * (eta[c, idx] + order["sigma"][c] * gens[c].standard_normal(len(idx)))
            batch.append((c, k, idx, cand))
        if not batch:
            break
        fr = pd.concat([frames[c].iloc[idx] for c, _, idx, _ in batch], ignore_index=True)
        fr[v.name] = np.concatenate([cand for *_, cand in batch])
        X = design(sub.model, fr)
        at = 0
        for c, k, idx, cand in batch:
            mu = X[at:at + len(idx)] @ order["sub_beta"][c]
            at += len(idx)
            if sub.family == "gaussian":
                p = np.exp(-0.5 * ((y[idx] - mu) / order["sub_sigma"][c]) ** 2)
            else:
                pr = expit(mu)
                p = np.where(y[idx] == 1, pr, 1 - pr)
            ok = (gens[c].random(len(idx)) < p).reshape(len(pending[c]), k)
            hit = ok.any(axis=1)
            first = ok.argmax(axis=1)
            out[c, pending[c][hit]] = cand.reshape(len(pending[c]), k)[hit, first[hit]]
            pending[c] = pending[c][~hit]
            tried[c] += k
    failed = int(sum(len(p) for p in pending))
    return out, failed
