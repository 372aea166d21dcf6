"""dmice: multiple imputation by chained equations on Dask.

The public API is :func:`impute`, :func:`open`, :func:`analyze`, :func:`compare` and :func:`pool`.
"""

from __future__ import annotations

from dmice.analysis import AnalysisResult, ModelComparison, analyze, compare
from dmice.api import impute, open
from dmice.errors import DmiceError, InputError, OutputError
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
from dmice.result import MultipleImputation

__version__ = "0.1.0"

__all__ = [
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
    "open",
    "pool",
    "pool_r_squared",
    "pool_scalar",
    "recommended_m",
    "wald_d1",
]
