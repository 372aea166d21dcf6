"""Analysis models fitted on every imputation from distributed sufficient statistics.

:func:`analyze` fits a generalized linear model given by a formula on each of the
m completed data sets and pools the fits with Rubin's rules
(:func:`dmice.pooling.pool`).  The model matrix is built by formulaic: its model
spec is fitted once (with the global levels of every categorical variable) and
replayed on every partition, so every partition and every imputation has the
same columns.  The fits use Fisher scoring (IRLS): each pass over the data is one
graph covering all m imputations and all partitions, and only small statistics
(``X'WX``, ``X'W(z - eta)``, the sandwich's meat, the Pearson chi-square) reach the
client.  Estimates and covariances equal those of statsmodels' ``GLM`` on the same
data.

:meth:`AnalysisResult.compare` (or :func:`compare`) tests nested models with D1, D2
or D3 as R's mice/mitml; :meth:`AnalysisResult.r_squared` pools R-squared of
gaussian models; :meth:`AnalysisResult.table` (shown by ``repr``) adds the
Monte-Carlo errors and the recommended number of imputations to the pooled table.

:func:`fit_glm` is the lower-level entry point with a user-supplied design
function instead of a formula.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from dmice._gc import frozen
from dmice.analysis.fit import GLMFit, _fit, _unplaced, fit_glm
from dmice.analysis.groups import _stored_files
from dmice.analysis.results import AnalysisResult, ImputationFit, ModelComparison, compare
from dmice.analysis.spec import _build_spec
from dmice.errors import InputError
from dmice.glm.links import COV_TYPES, check_family
from dmice.runtime import passes as _passes

__all__ = ["AnalysisResult", "GLMFit", "ImputationFit", "ModelComparison", "analyze", "compare", "fit_glm"]


def _as_frames(data: Any) -> list[Any]:
    import dask.dataframe as dd

    from dmice.result import MultipleImputation

    if isinstance(data, MultipleImputation):
        return [data.complete(k) for k in range(1, data.m + 1)]
    if isinstance(data, (list, tuple)) and data:
        out = []
        for i, f in enumerate(data):
            if isinstance(f, pd.DataFrame):
                out.append(_passes.from_pandas(f))
            elif isinstance(f, dd.DataFrame):
                out.append(f)
            else:
                raise InputError(f"data[{i}] must be a pandas or dask DataFrame, got {type(f).__name__}")
        cols = [list(map(str, f.columns)) for f in out]
        if any(c != cols[0] for c in cols[1:]):
            raise InputError("the completed data sets must have the same columns")
        return out
    raise InputError("data must be a MultipleImputation, a path written by dmice, or a non-empty "
                     f"list of pandas or dask DataFrames, got {type(data).__name__}")


@frozen
def analyze(data: Any, formula: str, *, family: str = "gaussian", link: str | None = None,
            weights: str | None = None, offset: str | None = None, cov_type: str = "nonrobust",
            dfcom: float | None = None, client: Any = None, tol: float = 1e-10,
            max_iter: int = 50) -> AnalysisResult:
    """Fit a GLM on every imputation and pool the fits with Rubin's rules.

    Parameters
    ----------
    data : MultipleImputation, str or list of DataFrame
        The completed data sets: a result of :func:`dmice.impute` or :func:`dmice.open`,
        the path of a written output (opened with :func:`dmice.open`), or a list of m
        pandas or dask DataFrames.
    formula : str
        Wilkinson formula as understood by formulaic, e.g.
        ``"y ~ x + C(group, contr.treatment('b')) + x:z + I(x**2)"``.  Categorical
        levels are global: a Categorical column's categories, or the distinct values of
        a string column over all partitions of all imputations (sorted).  Boolean
        columns enter as 0/1 numbers.
    family : {"gaussian", "binomial", "poisson"}, default "gaussian"
        Distribution of the outcome.  Binomial outcomes are 0/1 (or proportions).
    link : str, optional
        ``"identity"`` (gaussian), ``"logit"`` (default), ``"probit"`` or ``"cloglog"``
        (binomial), ``"log"`` (poisson).  Default: the canonical link.
    weights : str, optional
        Column of prior weights with statsmodels' ``var_weights`` semantics (R glm's
        ``weights``): each row's variance is divided by its weight; ``nobs`` stays the
        row count.
    offset : str, optional
        Column added to the linear predictor with a coefficient fixed at 1.
    cov_type : {"nonrobust", "HC0", "HC1"}, default "nonrobust"
        Model-based covariance (gaussian dispersion estimated as Pearson chi-square /
        (n - p)), as statsmodels' ``GLM(...).fit()``, or the sandwich estimator
        ``H^-1 (sum s_i s_i') H^-1`` (observed information ``H``, per-row scores
        ``s_i``) as ``GLM(...).fit(cov_type="HC0")``.  ``"HC1"`` is HC0 times
        ``n / (n - p)`` (as OLS's HC1 and R sandwich's ``vcovHC(type="HC1")``);
        statsmodels' GLM applies no correction for ``"HC1"`` (its HC1 equals its HC0).
    dfcom : float, optional
        Complete-data degrees of freedom for pooling; default ``nobs - p``.
    client : distributed.Client, optional
        Client to compute on (default: dask's current scheduler).
    tol : float, default 1e-10
        Convergence tolerance on the relative change of the estimates.
    max_iter : int, default 50
        Maximum passes over the data.

    Returns
    -------
    AnalysisResult
        Per-imputation fits (``.fits``), the pooled table (``.pooled``) and
        ``.summary()``.

    Raises
    ------
    dmice.errors.InputError
        For a bad formula, unknown columns, missing values in the analysis columns, a
        bad family, link or covariance type, or a singular model matrix.

    Notes
    -----
    The model spec is built once and replayed on every partition, so all partitions
    and imputations share the same columns.  Categorical levels are global (see
    ``formula``).  Stateful transforms (``center``, ``scale``, ``poly``, ``bs``, ...)
    are fitted on imputation 1 only: on its first partition when it has one, else on
    a sample of about 100,000 rows spread over all its partitions (every r-th row
    plus each partition's minimum and maximum of every numeric column, so spline
    boundary knots cover the data).  Their centres, scales and knots can therefore
    differ slightly from those of a single-machine fit on the whole data set; the
    fitted model is the same up to reparametrisation, but coefficients of such terms
    are not exactly comparable with R's.

    The design of each partition is built once for all m imputations: the formula is
    evaluated on imputation 1's partition and, for the other imputations, only on the
    rows whose analysis columns differ from it (the imputed cells; on the whole
    partition when more than half of its rows differ).  A formula made of plain
    numeric columns and treatment-coded categorical columns (``x``, ``g``, ``C(g)``,
    ``C(g, contr.treatment('b'))`` and their interactions) is built directly from the
    columns, after checking on a sample of imputation 1's first partition that the
    result is identical to formulaic's; other formulas are evaluated by formulaic.
    With such a direct design, imputations 2..m keep only the model columns that read
    a column they change, used with imputation 1's other columns instead of a matrix
    of their own.  For an output written by dmice (a path,
    or a result from :func:`dmice.open`), the task that designs a partition reads its
    m files itself, and the columns no imputation changes only from imputation 1's
    file (of a ``cells`` output: the input file and each variable's cells once for all
    m imputations).  The designs stay
    in the workers' memory for the whole fit, and each Fisher-scoring pass is one
    task per partition computing the statistics of the fits still iterating; only
    ``p x p`` statistics reach the client.  Imputation 1 iterates from the starting
    means exactly as a fit on its data alone; with a non-identity link, imputations
    2..m start from imputation 1's estimate once its relative step is at most 0.1
    (their estimates differ only through the imputed values, so they need fewer
    passes), with a logit or log link by chords (passes computing their score alone,
    see :func:`iterate`), and every fit stops at its own convergence on a full pass
    (the same criterion, ``tol``).  ``iterations`` counts the passes over the data.

    Examples
    --------
    >>> res = dmice.analyze(imp, "y ~ x + C(g)", family="binomial")   # doctest: +SKIP
    >>> res.summary(exponentiate=True)                                 # doctest: +SKIP
    """
    from dmice.pooling import pool

    link = check_family(family, link)
    if cov_type not in COV_TYPES:
        raise InputError(f"cov_type must be one of {list(COV_TYPES)}, got {cov_type!r}")
    if isinstance(data, str):  # a written output, opened as dmice.open does
        from dmice import store
        from dmice.result import from_manifest

        data = from_manifest(data, store.read_manifest(data, None), None)
    frames = _as_frames(data)
    files = _stored_files(data)
    spec, terms, design = _build_spec(formula, frames, weights, offset, client)
    p = len(terms)
    fits = _fit(frames, design, p, family=family, link=link, cov_type=cov_type, tol=tol,
                max_iter=max_iter, client=client, files=files, spread=_unplaced(data, frames))
    n = fits.nobs
    dfc = float(dfcom) if dfcom is not None else float(max(n - p, 1))
    pooled = pool(fits.params, fits.cov, dfcom=dfc, terms=terms)
    per = [ImputationFit(pd.Series(fits.params[k], index=terms),
                         pd.DataFrame(fits.cov[k], index=terms, columns=terms),
                         float(fits.scale[k]), float(fits.deviance[k])) for k in range(len(frames))]
    if family == "gaussian":
        ll = np.array([-0.5 * n * (math.log(2 * math.pi * float(s["pearson"]) / n) + 1.0)
                       + 0.5 * float(s["sumlogw"]) for s in fits.stats])
    else:
        ll = np.array([float(s["loglik"]) for s in fits.stats])
    return AnalysisResult(formula=formula, family=family, link=link, cov_type=cov_type, terms=terms,
                          fits=per, nobs=n, dfcom=dfc, iterations=fits.iterations, pooled_result=pooled,
                          outcome=formula.split("~", 1)[0].strip(), weights=weights, offset=offset,
                          loglik=ll, _stats=fits.stats, _frames=frames, _files=files, _data=data,
                          _design=design, _client=client)
