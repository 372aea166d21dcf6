"""dmice: multiple imputation by chained equations on Dask.

The public API is :func:`impute`, :func:`open`, :func:`analyze`, :func:`compare` and
:func:`pool`, with :func:`quickpred` (predictor matrices), :func:`squeeze` / :func:`round_to`
(post-processing) and :func:`md_pattern` / :func:`plot_pattern` (missing-data patterns).
"""

from __future__ import annotations

from dmice import config  # registers the dmice.* defaults in dask's configuration
from dmice.analysis import AnalysisResult, ModelComparison, analyze, compare
from dmice.api import impute, open, quickpred
from dmice.errors import DmiceError, InputError, OutputError
from dmice.plots import md_pattern, plot_pattern
from dmice.pooling import (
    PooledResult,
    chi2_d2,
    lr_d3,
    pool,
    pool_r_squared,
    pool_scalar,
    recommended_m,
    wald_d1,
)
from dmice.post import round_to, squeeze
from dmice.result import MultipleImputation

__version__ = "0.1.0"

__all__ = [
    "config",
    "AnalysisResult",
    "DmiceError",
    "InputError",
    "ModelComparison",
    "MultipleImputation",
    "OutputError",
    "PooledResult",
    "__version__",
    "analyze",
    "chi2_d2",
    "compare",
    "impute",
    "lr_d3",
    "md_pattern",
    "open",
    "plot_pattern",
    "pool",
    "pool_r_squared",
    "pool_scalar",
    "quickpred",
    "recommended_m",
    "round_to",
    "squeeze",
    "wald_d1",
]
