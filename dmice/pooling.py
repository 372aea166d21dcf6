"""Pool estimates from multiply imputed data sets with Rubin's rules.

The computations reproduce R ``mice``'s ``pool()`` (rule ``"rubin1987"``)
and ``summary.mipo()`` (mice 3.15), including these details:

* the Barnard--Rubin degrees of freedom floor ``lambda`` at ``1e-04``
  before computing them (``mice:::barnard.rubin``), so that ``b == 0``
  gives a large but finite ``df``; the reported ``lambda`` column is the
  unfloored value;
* a given ``dfcom`` below 1 is raised to 1 (``mice:::get.dfcom``);
* p-values use ``max(df, 0.001)`` degrees of freedom, confidence intervals
  use ``df`` as is;
* ``exponentiate`` transforms the estimate and the confidence bounds only.

Unlike mice, which returns the single fit unpooled when ``m == 1``, :func:`pool`
then warns and returns the fit as a pooled table with ``b = 0`` and
``df = dfcom``.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["LAMBDA_FLOOR", "PooledResult", "barnard_rubin", "pool"]

#: Lower bound mice's ``barnard.rubin`` puts on ``lambda`` when computing df.
LAMBDA_FLOOR = 1e-4
#: Lower bound mice's ``summary.mipo`` puts on df when computing p-values.
_PVALUE_DF_FLOOR = 1e-3

_POOLED_COLUMNS = "term m estimate ubar b t dfcom df riv lambda fmi".split()


def barnard_rubin(
    m: int, b: np.ndarray, t: np.ndarray, dfcom: float = np.inf
) -> np.ndarray:
    """Barnard--Rubin (1999) adjusted degrees of freedom, as in mice.

    Parameters
    ----------
    m : int
        Number of imputations (``m >= 2``).
    b : numpy.ndarray
        Between-imputation variances.
    t : numpy.ndarray
        Total variances.
    dfcom : float, default inf
        Complete-data degrees of freedom; ``inf`` for large samples.

    Returns
    -------
    numpy.ndarray
        Degrees of freedom. ``lambda = (1 + 1/m) b / t`` is floored at
        :data:`LAMBDA_FLOOR` first, as ``mice:::barnard.rubin`` does.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = (1 + 1 / m) * np.asarray(b, dtype=float) / np.asarray(t, dtype=float)
        lam = np.where(lam < LAMBDA_FLOOR, LAMBDA_FLOOR, lam)  # NaN stays NaN, as in R
        dfold = (m - 1) / lam**2
        if np.isinf(dfcom):
            return dfold
        dfobs = (dfcom + 1) / (dfcom + 3) * dfcom * (1 - lam)
        return dfold * dfobs / (dfold + dfobs)


@dataclass(frozen=True, eq=False, repr=False)
class PooledResult:
    """Result of :func:`pool`.

    Attributes
    ----------
    pooled : pandas.DataFrame
        One row per term with columns ``term, m, estimate, ubar, b, t,
        dfcom, df, riv, lambda, fmi`` (as ``pool(fit)$pooled`` in mice).
    estimates : pandas.DataFrame
        The ``m`` per-imputation estimates, one row per imputation.
    variances : pandas.DataFrame
        The ``m`` per-imputation variances, one row per imputation.
    covariances : list of pandas.DataFrame or None
        The ``m`` per-imputation covariance matrices, if given.
    covariance : pandas.DataFrame or None
        Pooled total covariance ``T = Ubar + (1 + 1/m) B``, if covariance
        matrices were given.
    conf_level : float
        Default confidence level of :meth:`summary`.
    """

    pooled: pd.DataFrame
    estimates: pd.DataFrame
    variances: pd.DataFrame
    covariances: list[pd.DataFrame] | None
    covariance: pd.DataFrame | None
    conf_level: float

    @property
    def m(self) -> int:
        """Number of imputations."""
        return len(self.estimates)

    @property
    def dfcom(self) -> float:
        """Complete-data degrees of freedom (``inf``: large sample)."""
        return float(self.pooled["dfcom"].iloc[0])

    @property
    def terms(self) -> list[Hashable]:
        """Term names, in the order of :attr:`pooled`."""
        return list(self.pooled["term"])

    def summary(
        self,
        conf_int: bool = True,
        exponentiate: bool = False,
        conf_level: float | None = None,
    ) -> pd.DataFrame:
        """Tests and confidence intervals, as ``summary.mipo()`` in mice.

        Parameters
        ----------
        conf_int : bool, default True
            Add ``conf_low`` and ``conf_high`` columns.
        exponentiate : bool, default False
            Report ``exp(estimate)`` and exponentiated confidence bounds
            (e.g. odds ratios); ``std_error``, ``statistic`` and ``p_value``
            stay on the original scale, as in mice and broom.
        conf_level : float, optional
            Confidence level; defaults to :attr:`conf_level`.

        Returns
        -------
        pandas.DataFrame
            Columns ``term, estimate, std_error, statistic, df, p_value``
            and, with ``conf_int``, ``conf_low, conf_high``. The statistic
            is ``estimate / std_error``, referred to a t distribution with
            ``df`` degrees of freedom (at least 0.001 for p-values).
        """
        level = _check_conf_level(self.conf_level if conf_level is None else conf_level)
        trans = np.exp if exponentiate else (lambda x: x)
        p = self.pooled
        est, df = p["estimate"].to_numpy(), p["df"].to_numpy()
        se = np.sqrt(p["t"].to_numpy())
        # as in R: overflow of exp() gives inf, 0/0 gives NaN, silently
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            statistic = est / se
            p_value = 2 * stats.t.sf(
                np.abs(statistic), np.maximum(df, _PVALUE_DF_FLOOR)
            )
            out = pd.DataFrame(
                {
                    "term": p["term"],
                    "estimate": trans(est),
                    "std_error": se,
                    "statistic": statistic,
                    "df": df,
                    "p_value": p_value,
                }
            )
            if conf_int:
                alpha = (1 - level) / 2
                out["conf_low"] = trans(est + stats.t.ppf(alpha, df) * se)
                out["conf_high"] = trans(est + stats.t.ppf(1 - alpha, df) * se)
        return out

    def __repr__(self) -> str:
        head = (
            f"PooledResult(m={self.m}, dfcom={self.dfcom:g}, "
            f"conf_level={self.conf_level:g})"
        )
        return f"{head}\n{self.pooled.to_string(index=False)}"


def pool(
    estimates: Any,
    variances: Any,
    *,
    dfcom: float | None = None,
    terms: Sequence[Hashable] | None = None,
    conf_level: float = 0.95,
) -> PooledResult:
    """Combine estimates from ``m`` imputed data sets with Rubin's rules.

    Per term, with ``Q`` the ``m`` estimates and ``U`` their variances::

        qbar = mean(Q)                 ubar = mean(U)
        b = var(Q, ddof=1)             t = ubar + (1 + 1/m) b
        riv = (1 + 1/m) b / ubar       lambda = (1 + 1/m) b / t
        df = barnard_rubin(m, b, t, dfcom)
        fmi = (riv + 2 / (df + 3)) / (riv + 1)

    exactly as R ``mice``'s ``pool()`` (see :func:`barnard_rubin` for the
    ``lambda`` floor mice uses in ``df``).

    Parameters
    ----------
    estimates : array-like of shape (m, p), pandas.DataFrame or list of pandas.Series
        Per-imputation estimates; a DataFrame has one row per imputation
        and the terms as columns, Series are indexed by term. A 1-D array
        holds ``m`` estimates of a single term.
    variances : array-like of shape (m, p) or (m, p, p), or list of pandas objects
        Per-imputation variances (an ``(m, p)`` array or DataFrame, or a
        list of ``m`` Series), or covariance matrices (an ``(m, p, p)``
        array or a list of ``m`` square DataFrames). Labelled variances are
        matched to the terms by label.
    dfcom : float, optional
        Complete-data degrees of freedom (e.g. the residual df of a fit);
        ``None`` or ``inf`` means a large sample. Values below 1 are raised
        to 1, as in mice.
    terms : sequence of hashable, optional
        Term names. With labelled estimates it selects and orders the terms
        to pool; otherwise it names the ``p`` columns in order (default
        names come from labelled variances, else ``term0, term1, ...``).
    conf_level : float, default 0.95
        Default confidence level of :meth:`PooledResult.summary`.

    Returns
    -------
    PooledResult
        Pooled table, inputs and, with covariances, the pooled covariance.

    Raises
    ------
    ValueError
        If shapes or labels disagree, ``m < 1``, values are not finite,
        variances are negative, covariances are not symmetric, or
        ``dfcom``/``conf_level`` are out of range.

    Warns
    -----
    UserWarning
        If ``m == 1``: nothing to pool; ``b``, ``riv`` and ``lambda`` are 0,
        ``df`` is ``dfcom`` and ``fmi`` follows its formula, ``2 / (dfcom + 3)``.
    """
    conf_level = _check_conf_level(conf_level)
    dfcom = _check_dfcom(dfcom)
    if isinstance(terms, str):
        raise ValueError("terms must be a sequence of term names, not a string")
    q, est_names = _read_estimates(estimates)
    u, var_names = _read_variances(variances)
    m, p_raw = q.shape

    # Term names of the estimates' columns, then the terms to pool.
    if est_names is not None:
        names, source = est_names, "estimates"
    elif terms is not None:
        names, source = list(terms), "terms"
    elif var_names is not None:
        names, source = var_names, "variances"
    else:
        names, source = [f"term{i}" for i in range(p_raw)], "estimates"
    _check_names(names, p_raw, source)
    selected = list(terms) if terms is not None else names
    if not selected:
        raise ValueError("terms must name at least one term")
    _check_names(selected, len(selected), "terms")
    missing = [t for t in selected if t not in names]
    if missing:
        raise ValueError(f"terms not found in estimates: {missing}")
    pos = [names.index(t) for t in selected]
    q, p = q[:, pos], len(selected)

    if u.shape[0] != m:
        raise ValueError(f"variances has {u.shape[0]} imputations, estimates has {m}")
    if var_names is not None:
        absent = [t for t in selected if t not in var_names]
        if absent:
            raise ValueError(f"variances has no entries for terms {absent}")
        vpos = [var_names.index(t) for t in selected]
    elif u.shape[1:] in ((p_raw,), (p_raw, p_raw)):
        vpos = pos
    else:
        raise ValueError(
            f"variances must have shape ({m}, {p_raw}) or ({m}, {p_raw}, {p_raw}), "
            f"got {u.shape}"
        )
    u = u[:, vpos][:, :, vpos] if u.ndim == 3 else u[:, vpos]
    _check_values(q, u)

    u_diag = np.diagonal(u, axis1=1, axis2=2) if u.ndim == 3 else u
    # Deviations from the first imputation: mathematically the same mean and
    # variance, but identical estimates give b == 0 and qbar == Q exactly.
    dev = q - q[0]
    qbar = q[0] + dev.mean(axis=0)
    centred = dev - dev.mean(axis=0)
    ubar = u_diag.mean(axis=0)
    if m == 1:
        warnings.warn(
            "pooling needs m >= 2 imputations; with m = 1 the between-imputation "
            "variance b is set to 0 and df to dfcom",
            UserWarning,
            stacklevel=2,
        )
        bmat = np.zeros((p, p))
    else:
        bmat = centred.T @ centred / (m - 1)
    b = np.diag(bmat).copy()
    t = ubar + (1 + 1 / m) * b
    with np.errstate(divide="ignore", invalid="ignore"):
        riv = (1 + 1 / m) * b / ubar
        lam = (1 + 1 / m) * b / t
        df = barnard_rubin(m, b, t, dfcom) if m > 1 else np.full(p, dfcom)
        fmi = (riv + 2 / (df + 3)) / (riv + 1)

    pooled = pd.DataFrame(
        {
            "term": pd.Series(selected, dtype=object),
            "m": m,
            "estimate": qbar,
            "ubar": ubar,
            "b": b,
            "t": t,
            "dfcom": dfcom,
            "df": df,
            "riv": riv,
            "lambda": lam,
            "fmi": fmi,
        },
        columns=_POOLED_COLUMNS,
    )
    labels = pd.Index(selected, dtype=object)
    imputations = pd.RangeIndex(m, name="imputation")
    covariances = covariance = None
    if u.ndim == 3:
        covariances = [pd.DataFrame(c, index=labels, columns=labels) for c in u]
        covariance = pd.DataFrame(
            u.mean(axis=0) + (1 + 1 / m) * bmat, index=labels, columns=labels
        )
    return PooledResult(
        pooled=pooled,
        estimates=pd.DataFrame(q, index=imputations, columns=labels),
        variances=pd.DataFrame(u_diag, index=imputations, columns=labels),
        covariances=covariances,
        covariance=covariance,
        conf_level=conf_level,
    )


def _is_list_of(obj: Any, kind: type) -> bool:
    return (
        isinstance(obj, Sequence)
        and len(obj) > 0
        and all(isinstance(x, kind) for x in obj)
    )


def _as_float_array(obj: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(obj, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric and rectangular: {err}") from None


def _read_estimates(estimates: Any) -> tuple[np.ndarray, list[Hashable] | None]:
    """Return estimates as an (m, p) array and their term labels, if any."""
    if isinstance(estimates, pd.DataFrame):
        q, names = _as_float_array(estimates, "estimates"), list(estimates.columns)
    elif _is_list_of(estimates, pd.Series):
        names = list(estimates[0].index)
        rows = [_align(s, names, "estimates") for s in estimates]
        q = _as_float_array(rows, "estimates")
    else:
        q, names = _as_float_array(estimates, "estimates"), None
        q = q[:, None] if q.ndim == 1 else q
    if q.ndim != 2:
        raise ValueError(f"estimates must be 2-D (m, p), got {q.ndim} dimensions")
    if q.shape[0] < 1:
        raise ValueError("estimates must hold at least one imputation (m >= 1)")
    if q.shape[1] < 1:
        raise ValueError("estimates must hold at least one term (p >= 1)")
    return q, names


def _read_variances(variances: Any) -> tuple[np.ndarray, list[Hashable] | None]:
    """Return variances as (m, p) or (m, p, p) array and their labels, if any."""
    if _is_list_of(variances, pd.DataFrame):
        names = list(variances[0].columns)
        mats = []
        for v in variances:
            if any(
                ax.has_duplicates or len(ax) != len(names) or set(ax) != set(names)
                for ax in (v.index, v.columns)
            ):
                raise ValueError(
                    "variances: covariance DataFrames must be square "
                    "with the same term labels"
                )
            mats.append(v.loc[names, names])
        return _as_float_array(mats, "variances"), names
    if isinstance(variances, pd.DataFrame):
        return _as_float_array(variances, "variances"), list(variances.columns)
    if _is_list_of(variances, pd.Series):
        names = list(variances[0].index)
        return _as_float_array(
            [_align(s, names, "variances") for s in variances], "variances"
        ), names
    u = _as_float_array(variances, "variances")
    if u.ndim == 1:
        u = u[:, None]
    if u.ndim not in (2, 3):
        raise ValueError(
            f"variances must be (m, p) or (m, p, p), got {u.ndim} dimensions"
        )
    return u, None


def _align(obj: pd.Series | pd.DataFrame, names: list[Hashable], name: str) -> Any:
    """Reorder ``obj``'s index to ``names``, requiring the same labels."""
    if (
        obj.index.has_duplicates
        or len(obj.index) != len(names)
        or set(obj.index) != set(names)
    ):
        raise ValueError(
            f"{name}: every element must have the same, unique term labels"
        )
    return obj.reindex(names)


def _check_names(names: list[Hashable], p: int, name: str) -> None:
    if len(names) != p:
        raise ValueError(f"{name} has {len(names)} term names for {p} terms")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} has duplicate term names")


def _check_values(q: np.ndarray, u: np.ndarray) -> None:
    if not np.all(np.isfinite(q)):
        raise ValueError("estimates must be finite")
    if not np.all(np.isfinite(u)):
        raise ValueError("variances must be finite")
    diag = np.diagonal(u, axis1=1, axis2=2) if u.ndim == 3 else u
    if np.any(diag < 0):
        raise ValueError("variances must be non-negative")
    if u.ndim == 3:
        scale = np.max(np.abs(diag), initial=0.0)
        if not np.allclose(u, u.transpose(0, 2, 1), rtol=1e-8, atol=1e-12 * scale):
            raise ValueError("variances: covariance matrices must be symmetric")


def _check_dfcom(dfcom: float | None) -> float:
    if dfcom is None:
        return np.inf
    try:
        value = float(dfcom)
    except (TypeError, ValueError):
        raise ValueError(
            f"dfcom must be a positive number or None, got {dfcom!r}"
        ) from None
    if not value > 0:  # also rejects NaN
        raise ValueError(f"dfcom must be positive, got {dfcom!r}")
    return max(value, 1.0)  # mice:::get.dfcom


def _check_conf_level(conf_level: float) -> float:
    value = float(conf_level)
    if not 0 < value < 1:
        raise ValueError(f"conf_level must be between 0 and 1, got {conf_level!r}")
    return value
