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

The client's side is :class:`dmice.models.smcfcs.SmcfcsModel`; the workers' (the statistics of
step 2 and the rejection sampling of step 3) is in :mod:`dmice.block`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: candidates tried per missing cell before its previous value is kept (smcfcs's rjlimit)
MAX_CANDIDATES = 5000
FAMILIES = ("gaussian", "binomial")


@dataclass(frozen=True)
class Substantive:
    formula: str
    family: str
    outcome: int  # variable index of the outcome
    model: Any  # dmice.formulas.FormulaModel of the right-hand side
