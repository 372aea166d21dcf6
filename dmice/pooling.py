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

The module also holds multi-parameter tests and scalar pooling rules:

* :func:`wald_d1` -- the D1 multivariate Wald test (``mice::D1`` /
  ``mitml::testModels(method = "D1")``);
* :func:`chi2_d2` and :func:`wald_chi2` -- the D2 pooled chi-square test
  (``mice::D2`` / ``mitml::testModels(method = "D2", use = "wald")``);
* :func:`lr_d3` -- the D3 pooled likelihood-ratio test of Meng and Rubin
  (``mitml::testModels(method = "D3")``; :meth:`dmice.AnalysisResult.compare`
  evaluates the likelihoods it needs on the data);
* :func:`pool_r_squared` -- ``mice::pool.r.squared``;
* :func:`pool_scalar` -- ``mice::pool.scalar``;
* :meth:`PooledResult.mc_error` and :func:`recommended_m` -- Monte Carlo
  errors as Stata's ``mi estimate, mcerror`` and von Hippel's (2020)
  number of imputations.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

__all__ = [
    "LAMBDA_FLOOR",
    "PooledResult",
    "ScalarPool",
    "barnard_rubin",
    "chi2_d2",
    "lr_d3",
    "pool",
    "pool_r_squared",
    "pool_scalar",
    "recommended_m",
    "wald_chi2",
    "wald_d1",
]

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

    def mc_error(
        self, target_cv: float = 0.05, conf_level: float | None = None
    ) -> pd.DataFrame:
        """Monte Carlo errors of the pooled results, as Stata's ``mcerror``.

        The Monte Carlo (MC) error is the standard deviation a pooled result
        would show over repeated imputation of the same data (White, Royston
        and Wood 2011; Stata ``mi estimate, mcerror``). As in Stata it is
        estimated by the jackknife over imputations: with ``theta_(-i)`` the
        result pooled without imputation ``i``::

            mc_se = sqrt((m - 1) / m * sum_i (theta_(-i) - mean(theta_(-)))**2)

        For the pooled estimate this equals ``sqrt(b / m)`` exactly, which is
        what is reported. The other columns are jackknifed from
        :meth:`summary` (same ``dfcom``).

        Parameters
        ----------
        target_cv : float, default 0.05
            Coefficient of variation of the standard error aimed at by the
            ``recommended_m`` column (see :func:`recommended_m`).
        conf_level : float, optional
            Confidence level of the interval bounds; defaults to
            :attr:`conf_level`.

        Returns
        -------
        pandas.DataFrame
            One row per term with columns ``term, m, estimate,
            mc_se_estimate, std_error, mc_se_std_error, statistic,
            mc_se_statistic, p_value, mc_se_p_value, conf_low,
            mc_se_conf_low, conf_high, mc_se_conf_high, fmi,
            recommended_m``. ``mc_se_estimate`` needs ``m >= 2``, the
            jackknifed errors ``m >= 3`` (NaN otherwise).
            ``recommended_m`` is :func:`recommended_m` of the term's
            ``fmi`` (NaN where ``fmi`` is not finite).
        """
        level = _check_conf_level(self.conf_level if conf_level is None else conf_level)
        m = self.m
        smry = self.summary(conf_int=True, conf_level=level)
        cols = ["std_error", "statistic", "p_value", "conf_low", "conf_high"]
        b = self.pooled["b"].to_numpy(float)
        mc_est = np.sqrt(b / m) if m >= 2 else np.full(len(b), np.nan)
        jack = {c: np.full(len(b), np.nan) for c in cols}
        if m >= 3:
            q = self.estimates.to_numpy()
            u = self.variances.to_numpy()
            dfcom = None if np.isinf(self.dfcom) else self.dfcom
            reps = []
            for i in range(m):
                keep = np.arange(m) != i
                sub = pool(q[keep], u[keep], dfcom=dfcom, conf_level=level)
                reps.append(sub.summary(conf_int=True)[cols].to_numpy(float))
            arr = np.stack(reps)  # (m, p, len(cols))
            with np.errstate(invalid="ignore"):
                dev = arr - arr.mean(axis=0)
                se = np.sqrt((m - 1) / m * (dev**2).sum(axis=0))
            jack = {c: se[:, j] for j, c in enumerate(cols)}
        fmi = self.pooled["fmi"].to_numpy(float)
        rec = np.full(len(fmi), np.nan)
        ok = np.isfinite(fmi) & (fmi >= 0) & (fmi <= 1)
        if ok.any():
            rec[ok] = recommended_m(fmi[ok], target_cv)
        out = pd.DataFrame(
            {"term": self.pooled["term"], "m": m, "estimate": smry["estimate"]}
        )
        out["mc_se_estimate"] = mc_est
        for c in cols:
            out[c] = smry[c].to_numpy()
            out[f"mc_se_{c}"] = jack[c]
        out["fmi"] = fmi
        out["recommended_m"] = rec
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


# ------------------------------------------------- multi-parameter tests

_TEST_COLUMNS = ["test", "statistic", "df1", "df2", "dfcom", "p_value", "riv"]


def _tested_block(
    estimates: Any,
    covariances: Any,
    terms_tested: Sequence[Hashable] | Hashable | None,
    terms: Sequence[Hashable] | None,
) -> tuple[np.ndarray, np.ndarray, list[Hashable]]:
    """Return the (m, k) estimates and (m, k, k) covariances of the tested terms."""
    q, est_names = _read_estimates(estimates)
    u, var_names = _read_variances(covariances)
    m, p = q.shape
    if isinstance(terms, str):
        raise ValueError("terms must be a sequence of term names, not a string")
    if est_names is not None:
        names = est_names
    elif terms is not None:
        names = list(terms)
    elif var_names is not None:
        names = var_names
    else:
        names = [f"term{i}" for i in range(p)]
    _check_names(names, p, "estimates" if terms is None else "terms")
    if u.ndim != 3 or u.shape[0] != m:
        raise ValueError(
            f"covariances must have shape ({m}, {p}, {p}) or be {m} square "
            f"DataFrames, got shape {u.shape}"
        )
    if var_names is not None:
        absent = [t for t in names if t not in var_names]
        if absent:
            raise ValueError(f"covariances has no entries for terms {absent}")
        vpos = [var_names.index(t) for t in names]
        u = u[:, vpos][:, :, vpos]
    elif u.shape[1:] != (p, p):
        raise ValueError(f"covariances must have shape ({m}, {p}, {p}), got {u.shape}")
    _check_values(q, u)

    if terms_tested is None:
        idx = list(range(p))
    else:
        if isinstance(terms_tested, (str, int, np.integer)) or not isinstance(
            terms_tested, Sequence | np.ndarray | pd.Index
        ):
            terms_tested = [terms_tested]
        idx = []
        for t in terms_tested:
            if t in names:
                idx.append(names.index(t))
            elif (
                isinstance(t, (int, np.integer))
                and not isinstance(t, bool)
                and (-p <= t < p)
            ):
                idx.append(int(t) % p)
            else:
                raise ValueError(f"terms_tested: {t!r} is not a term or index")
        if not idx:
            raise ValueError("terms_tested must name at least one term")
        if len(set(idx)) != len(idx):
            raise ValueError("terms_tested names a term twice")
        idx = sorted(idx)  # mitml keeps the larger model's order
    return q[:, idx], u[:, idx][:, :, idx], [names[i] for i in idx]


def _f_sf(statistic: float, df1: float, df2: float) -> float:
    """``pf(statistic, df1, df2, lower.tail = FALSE)`` including ``df2 = Inf``."""
    if np.isnan(statistic) or np.isnan(df2):
        return np.nan
    if np.isinf(df2):
        return float(stats.chi2.sf(statistic * df1, df1))
    return float(stats.f.sf(statistic, df1, df2))


def _test_frame(
    label: str, statistic: float, k: int, v: float, dfcom: float, riv: float
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "test": [label],
            "statistic": [float(statistic)],
            "df1": [k],
            "df2": [float(v)],
            "dfcom": [float(dfcom)],
            "p_value": [_f_sf(float(statistic), k, float(v))],
            "riv": [float(riv)],
        },
        columns=_TEST_COLUMNS,
    )


def wald_d1(
    estimates: Any,
    covariances: Any,
    terms_tested: Sequence[Hashable] | Hashable | None = None,
    *,
    terms: Sequence[Hashable] | None = None,
    dfcom: float | None = None,
) -> pd.DataFrame:
    """Multivariate Wald test D1 of ``k`` coefficients, as mice's ``D1()``.

    Tests the null hypothesis that the ``terms_tested`` coefficients are all
    0, i.e. compares a model with a nested one lacking those terms. With
    ``Q`` (m, k) and ``U`` (m, k, k) the estimates and covariances of the
    tested coefficients (mitml's ``.D1``; Li, Raghunathan and Rubin 1991)::

        qbar = mean(Q)       Ubar = mean(U)       B = cov(Q)  (ddof 1)
        riv = (1 + 1/m) tr(B Ubar^-1) / k
        statistic = qbar' ((1 + riv) Ubar)^-1 qbar / k
        t = k (m - 1)

    and the denominator df ``df2``, without ``dfcom`` (or ``dfcom = inf``)::

        t > 4:  4 + (t - 4) (1 + (1 - 2/t) / riv)^2
        t <= 4: t (1 + 1/k) (1 + 1/riv)^2 / 2

    or, with finite ``dfcom``, Reiter's (2007) small-sample df, exactly as
    mitml computes it. The p-value refers ``statistic`` to ``F(k, df2)``.

    Parameters
    ----------
    estimates : array-like of shape (m, p) or pandas.DataFrame or list of pandas.Series
        Per-imputation estimates of the larger model.
    covariances : array-like of shape (m, p, p) or list of pandas.DataFrame
        Per-imputation covariance matrices of the larger model.
    terms_tested : sequence of term names or integer positions, optional
        Coefficients set to 0 under the null; default all ``p`` (as
        ``D1(fit1)`` without ``fit0``).
    terms : sequence of hashable, optional
        Names of the ``p`` columns of unlabelled estimates.
    dfcom : float, optional
        Complete-data degrees of freedom of the larger model (mice uses
        its residual df). ``None`` or ``inf`` gives the large-sample df.

    Returns
    -------
    pandas.DataFrame
        One row with columns ``test, statistic, df1, df2, dfcom, p_value,
        riv`` (``summary(D1(fit1, fit0))$comparisons`` of mice in snake
        case); ``test`` lists the tested terms, ``dfcom`` is ``inf``
        without ``dfcom``.

    Raises
    ------
    ValueError
        On bad shapes, labels, values, ``m < 2`` or a bad ``dfcom``.

    Notes
    -----
    Mapping to R: ``D1(fit1, fit0)`` equals ``wald_d1(Q1, U1,
    terms_tested=<coefficients of fit1 absent from fit0>,
    dfcom=df.residual(fit1))`` with ``Q1``, ``U1`` the coefficients and
    ``vcov`` of each ``fit1``; ``mitml::testModels(fit1, fit0, method =
    "D1")`` (no ``df.com``) equals ``dfcom=None``. mice's ``D1(..., dfcom =
    Inf)`` returns ``df2 = NaN`` (mitml evaluates ``Inf / Inf``); dmice uses
    the large-sample df, the limit of Reiter's df as ``dfcom -> inf``.

    References
    ----------
    Li, K. H., Raghunathan, T. E. and Rubin, D. B. (1991). Large-sample
    significance levels from multiply imputed data using moment-based
    statistics and an F reference distribution. JASA 86, 1065--1073.

    Reiter, J. P. (2007). Small-sample degrees of freedom for
    multi-component significance tests with multiple imputation for missing
    data. Biometrika 94, 502--508.
    """
    dfcom_value = _check_dfcom(dfcom)
    q, u, tested = _tested_block(estimates, covariances, terms_tested, terms)
    m, k = q.shape
    if m < 2:
        raise ValueError("D1 needs m >= 2 imputations")
    qbar = q.mean(axis=0)
    ubar = u.mean(axis=0)
    bmat = np.atleast_2d(np.cov(q, rowvar=False, ddof=1))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = (1 + 1 / m) * np.trace(np.linalg.solve(ubar, bmat)) / k
        statistic = qbar @ np.linalg.solve((1 + r) * ubar, qbar) / k
        t = np.float64(k * (m - 1))
        if np.isinf(dfcom_value):
            if t > 4:
                v = 4 + (t - 4) * (1 + (1 - 2 / t) / r) ** 2
            else:
                v = t * (1 + 1 / k) * (1 + 1 / r) ** 2 / 2
        else:
            a = r * t / (t - 2)
            vstar = (dfcom_value + 1) / (dfcom_value + 3) * dfcom_value
            c0 = np.float64(1) / (t - 4)
            c1 = vstar - 2 * (1 + a)
            c2 = vstar - 4 * (1 + a)
            z = (
                1 / c2
                + c0 * (a**2 * c1 / ((1 + a) ** 2 * c2))
                + c0 * (8 * a**2 * c1 / ((1 + a) * c2**2) + 4 * a**2 / ((1 + a) * c2))
                + c0 * (4 * a**2 / (c2 * c1) + 16 * a**2 * c1 / c2**3)
                + c0 * (8 * a**2 / c2**2)
            )
            v = 4 + 1 / z
    label = ", ".join(map(str, tested)) + " = 0"
    return _test_frame(label, statistic, k, v, dfcom_value, r)


def wald_chi2(
    estimates: Any,
    covariances: Any,
    terms_tested: Sequence[Hashable] | Hashable | None = None,
    *,
    terms: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """Per-imputation Wald chi-squares ``Q' U^-1 Q`` of the tested terms.

    The statistics mitml's ``testModels(method = "D2", use = "wald")``
    pools; pass them to :func:`chi2_d2` with ``df = len(terms_tested)``.
    Arguments as in :func:`wald_d1`.

    Returns
    -------
    numpy.ndarray of shape (m,)
        One Wald statistic per imputation.
    """
    q, u, _ = _tested_block(estimates, covariances, terms_tested, terms)
    return np.array([qi @ np.linalg.solve(ui, qi) for qi, ui in zip(q, u)])


def chi2_d2(chi2_values: Any, df: int) -> pd.DataFrame:
    """Pool ``m`` chi-square statistics with D2, as mice's ``D2()``.

    Rubin's (1987) / Li, Meng, Raghunathan and Rubin's (1991) rule as
    mitml's ``.D2`` computes it, for statistics ``d`` with ``k = df``::

        riv = (1 + 1/m) var(sqrt(d))       (ddof 1)
        statistic = (mean(d) / k - (m + 1) / (m - 1) riv) / (1 + riv)
        df2 = k^(-3/m) (m - 1) (1 + 1/riv)^2

    and the p-value refers ``statistic`` to ``F(k, df2)`` (1 for a
    negative statistic; a chi-square limit when ``riv = 0``).

    Parameters
    ----------
    chi2_values : array-like of shape (m,)
        Per-imputation chi-square statistics, e.g. from :func:`wald_chi2`.
    df : int
        Degrees of freedom ``k`` of each chi-square.

    Returns
    -------
    pandas.DataFrame
        One row with columns ``test, statistic, df1, df2, dfcom, p_value,
        riv``; ``dfcom`` is NaN as in mice.

    Raises
    ------
    ValueError
        If there are fewer than 2 statistics, a statistic is negative or
        not finite, or ``df`` is not positive.

    Notes
    -----
    ``D2(fit1, fit0)`` (``use = "wald"``) in mice equals
    ``chi2_d2(wald_chi2(Q1, U1, tested), len(tested))`` with the inputs of
    :func:`wald_d1`.
    """
    d = np.asarray(chi2_values, dtype=float).ravel()
    if d.size < 2:
        raise ValueError("D2 needs m >= 2 chi-square statistics")
    if not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ValueError("chi2_values must be finite and non-negative")
    k = float(df)
    if not k > 0 or not np.isfinite(k):
        raise ValueError(f"df must be positive, got {df!r}")
    m = d.size
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (1 + 1 / m) * np.var(np.sqrt(d), ddof=1)
        statistic = (d.mean() / k - (m + 1) / (m - 1) * r) / (1 + r)
        v = k ** (-3 / m) * (m - 1) * (1 + 1 / r) ** 2
    k_out = int(k) if k.is_integer() else k
    return _test_frame("D2", statistic, k_out, v, np.nan, r)


def lr_d3(
    loglik_full: Any,
    loglik_reduced: Any,
    loglik_full_pooled: Any,
    loglik_reduced_pooled: Any,
    df: int,
    *,
    ariv: str = "default",
) -> pd.DataFrame:
    """Meng--Rubin (1992) pooled likelihood-ratio test D3, as mitml's ``.D3``.

    With, per imputation ``i``, the log-likelihoods of the larger (``1``) and
    the nested (``0``) model at their own estimates (``ll1_i``, ``ll0_i``)
    and at the estimates averaged over the imputations (``ll1p_i``,
    ``ll0p_i``; the data of imputation ``i`` evaluated at the pooled
    parameters), and ``k = df`` the number of parameters the nested model
    lacks::

        dbar = mean(-2 (ll0_i - ll1_i))        dtilde = mean(-2 (ll0p_i - ll1p_i))
        riv = (m + 1) / (k (m - 1)) (dbar - dtilde)
        statistic = dtilde / (k (1 + riv))
        t = k (m - 1)
        df2 = 4 + (t - 4) (1 + (1 - 2/t) / riv)^2        (t > 4)
              t (1 + 1/k) (1 + 1/riv)^2 / 2              (t <= 4)

    and the p-value refers ``statistic`` to ``F(k, df2)``.

    Parameters
    ----------
    loglik_full, loglik_reduced : array-like of shape (m,)
        Log-likelihoods at each imputation's own estimates.
    loglik_full_pooled, loglik_reduced_pooled : array-like of shape (m,)
        Log-likelihoods of each imputation's data at the pooled estimates.
    df : int
        Number of parameters tested (``k``).
    ariv : {"default", "positive"}, default "default"
        ``"positive"`` truncates a negative ``riv`` at 0 (mitml's ``ariv =
        "positive"``).

    Returns
    -------
    pandas.DataFrame
        One row with columns ``test, statistic, df1, df2, dfcom, p_value,
        riv``; ``dfcom`` is NaN (D3 has no small-sample df, as in mice and
        mitml).

    Raises
    ------
    ValueError
        If the four inputs do not have the same length ``m >= 2``, hold
        non-finite values, or ``df`` is not a positive integer.

    References
    ----------
    Meng, X.-L. and Rubin, D. B. (1992). Performing likelihood ratio tests
    with multiply-imputed data sets. Biometrika 79, 103--111.
    """
    arrs = [np.asarray(a, dtype=float).ravel() for a in
            (loglik_full, loglik_reduced, loglik_full_pooled, loglik_reduced_pooled)]
    m = arrs[0].size
    if m < 2 or any(a.size != m for a in arrs):
        raise ValueError("D3 needs m >= 2 log-likelihoods of each kind, all of the same length")
    if not all(np.all(np.isfinite(a)) for a in arrs):
        raise ValueError("log-likelihoods must be finite")
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if ariv not in ("default", "positive"):
        raise ValueError(f"ariv must be 'default' or 'positive', got {ariv!r}")
    k = int(df)
    ll1, ll0, ll1p, ll0p = arrs
    dbar = float(np.mean(-2 * (ll0 - ll1)))
    dtilde = float(np.mean(-2 * (ll0p - ll1p)))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.float64((m + 1) / (k * (m - 1))) * (dbar - dtilde)
        if ariv == "positive":
            r = max(np.float64(0.0), r)
        statistic = dtilde / (k * (1 + r))
        t = np.float64(k * (m - 1))
        if t > 4:
            v = 4 + (t - 4) * (1 + (1 - 2 / t) / r) ** 2
        else:
            v = t * (1 + 1 / k) * (1 + 1 / r) ** 2 / 2
    return _test_frame("D3", statistic, k, v, np.nan, r)


# ------------------------------------------------------- scalar pooling


@dataclass(frozen=True, eq=False)
class ScalarPool:
    """Result of :func:`pool_scalar` (the list ``mice::pool.scalar`` returns).

    Attributes
    ----------
    m : int
        Number of imputations.
    qhat, u : numpy.ndarray
        The per-imputation estimates and variances.
    qbar, ubar, b, t : float
        Pooled estimate, within, between and total variance.
    df : float
        Degrees of freedom.
    r : float
        Relative increase in variance, ``(1 + 1/m) b / ubar``.
    fmi : float
        Fraction of missing information (NaN for ``"reiter2003"``).
    """

    m: int
    qhat: np.ndarray
    u: np.ndarray
    qbar: float
    ubar: float
    b: float
    t: float
    df: float
    r: float
    fmi: float


def pool_scalar(
    estimates: Any,
    variances: Any,
    n: float = np.inf,
    k: int = 1,
    rule: str = "rubin1987",
) -> ScalarPool:
    """Pool one scalar estimate, as ``mice::pool.scalar``.

    ``rule = "rubin1987"``: ``t = ubar + (1 + 1/m) b``, ``df`` from
    :func:`barnard_rubin` with ``dfcom = n - k`` and ``fmi = (r + 2 / (df +
    3)) / (r + 1)``. ``rule = "reiter2003"`` (synthetic data, Reiter 2003):
    ``t = ubar + b / m``, ``df = (m - 1) (1 + ubar / (b / m))^2`` and no
    ``fmi``. In both ``r = (1 + 1/m) b / ubar``.

    Parameters
    ----------
    estimates, variances : array-like of shape (m,)
        Per-imputation estimates and their variances (``m >= 2``).
    n : float, default inf
        Number of observations.
    k : int, default 1
        Number of parameters; ``n - k`` is the complete-data df.
    rule : {"rubin1987", "reiter2003"}
        Pooling rule.

    Returns
    -------
    ScalarPool

    Raises
    ------
    ValueError
        On bad shapes or values, ``m < 2``, an unknown rule, or ``n - k``
        not positive (mice would return meaningless df).
    """
    q = np.asarray(estimates, dtype=float).ravel()
    u = np.asarray(variances, dtype=float).ravel()
    if q.size != u.size:
        raise ValueError(f"estimates has {q.size} values, variances has {u.size}")
    if q.size < 2:
        raise ValueError("pool_scalar needs m >= 2 imputations")
    _check_values(q[:, None], u[:, None])
    if rule not in ("rubin1987", "reiter2003"):
        raise ValueError(f"rule must be 'rubin1987' or 'reiter2003', got {rule!r}")
    dfcom = float(n) - float(k)
    if not dfcom > 0:
        raise ValueError(f"n - k must be positive, got {dfcom!r}")
    m = q.size
    qbar, ubar, b = float(q.mean()), float(u.mean()), float(np.var(q, ddof=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = float(np.float64((1 + 1 / m) * b) / ubar)
        if rule == "rubin1987":
            t = ubar + (m + 1) * b / m
            df = float(barnard_rubin(m, np.float64(b), np.float64(t), dfcom))
            fmi = (r + 2 / (df + 3)) / (r + 1)
        else:
            t = ubar + b / m
            df = float((m - 1) * (1 + np.float64(ubar) / (b / m)) ** 2)
            fmi = np.nan
    return ScalarPool(
        m=m, qhat=q, u=u, qbar=qbar, ubar=ubar, b=b, t=t, df=df, r=r, fmi=fmi
    )


def pool_r_squared(r2_values: Any, n: Any, adjusted: bool = False) -> pd.DataFrame:
    """Pool ``R^2`` over imputations, as ``mice::pool.r.squared``.

    Each ``R = sqrt(R^2)`` is Fisher z-transformed, ``z = atanh(R)``, with
    variance ``1 / (n - 3)``; the ``z`` are pooled with :func:`pool_scalar`
    (large-sample df) and ``qbar`` and ``qbar -/+ 1.96 sqrt(t)`` are
    transformed back with ``tanh(.)^2``.

    Parameters
    ----------
    r2_values : array-like of shape (m,)
        Per-imputation ``R^2`` (or adjusted ``R^2`` with ``adjusted``).
    n : int or array-like of shape (m,)
        Number of observations of each fit.
    adjusted : bool, default False
        Only labels the row ``"adj R^2"`` instead of ``"R^2"``: pass the
        adjusted values to pool adjusted ``R^2``.

    Returns
    -------
    pandas.DataFrame
        One row (index ``"R^2"`` or ``"adj R^2"``) with columns ``est,
        lo_95, hi_95, fmi``.

    Raises
    ------
    ValueError
        If values are not finite or not below 1 (``R^2 = 1`` has an
        infinite z), ``n <= 3``, or ``m < 2``.

    Warns
    -----
    RuntimeWarning
        If a value is negative (possible for adjusted ``R^2``): its square
        root is NaN, and so is the result, as in mice.

    Notes
    -----
    As in mice, a negative lower bound ``qbar - 1.96 sqrt(t)`` is squared
    too, so ``lo_95`` can exceed 0 by reflection.
    """
    r2 = np.asarray(r2_values, dtype=float).ravel()
    nobs = np.broadcast_to(np.asarray(n, dtype=float), r2.shape)
    if r2.size < 2:
        raise ValueError("pooling R^2 needs m >= 2 imputations")
    if not np.all(np.isfinite(r2)) or np.any(r2 >= 1):
        raise ValueError("r2_values must be finite and below 1")
    if not np.all(nobs > 3):
        raise ValueError("n must be larger than 3")
    if np.any(r2 < 0):
        warnings.warn(
            "negative R^2: its square root is NaN, as is the pooled result",
            RuntimeWarning,
            stacklevel=2,
        )
        row = [np.nan] * 4
    else:
        z = np.arctanh(np.sqrt(r2))
        fit = pool_scalar(z, 1 / (nobs - 3))
        half = 1.96 * np.sqrt(fit.t)
        row = [
            np.tanh(fit.qbar) ** 2,
            np.tanh(fit.qbar - half) ** 2,
            np.tanh(fit.qbar + half) ** 2,
            fit.fmi,
        ]
    return pd.DataFrame(
        [row],
        index=["adj R^2" if adjusted else "R^2"],
        columns=["est", "lo_95", "hi_95", "fmi"],
    )


# ---------------------------------------------------- number of imputations


def recommended_m(
    fmi: Any,
    target_cv: float = 0.05,
    *,
    m_pilot: int | None = None,
    conf_level: float = 0.95,
) -> Any:
    """Imputations needed for a replicable SE, von Hippel's (2020) rule.

    The quadratic rule::

        m = 1 + 1/2 (fmi / target_cv)^2

    rounded up, where ``target_cv`` is the coefficient of variation of the
    standard error over repeated imputation that one accepts (e.g. 0.05: the
    SE would change by about 5% if the data were imputed again).

    In the two-stage procedure ``fmi`` comes from a pilot analysis with
    ``m_pilot`` imputations; given ``m_pilot``, the upper bound of an
    approximate confidence interval for ``fmi``, ``expit(logit(fmi) + z
    sqrt(2 / m_pilot))`` with ``z`` the normal quantile of ``1 - (1 -
    conf_level) / 2``, replaces ``fmi``, so that the result is conservative.

    Parameters
    ----------
    fmi : float or array-like
        Fractions of missing information, in ``[0, 1]``.
    target_cv : float, default 0.05
        Target coefficient of variation of the SE estimate (the default of
        von Hippel's Stata command ``how_many_imputations``).
    m_pilot : int, optional
        Number of imputations of the pilot analysis (two-stage rule).
    conf_level : float, default 0.95
        Confidence level of the interval for ``fmi`` when ``m_pilot`` is
        given.

    Returns
    -------
    int or numpy.ndarray of int
        Recommended number of imputations, at least 1.

    References
    ----------
    von Hippel, P. T. (2020). How many imputations do you need? A two-stage
    calculation using a quadratic rule. Sociological Methods & Research
    49(3), 699--718. doi:10.1177/0049124117747303
    """
    f = np.asarray(fmi, dtype=float)
    if not np.all(np.isfinite(f)) or np.any((f < 0) | (f > 1)):
        raise ValueError("fmi must be between 0 and 1")
    cv = float(target_cv)
    if not cv > 0 or not np.isfinite(cv):
        raise ValueError(f"target_cv must be positive, got {target_cv!r}")
    if m_pilot is not None:
        if int(m_pilot) != m_pilot or m_pilot < 2:
            raise ValueError(f"m_pilot must be an integer >= 2, got {m_pilot!r}")
        z = stats.norm.ppf(1 - (1 - _check_conf_level(conf_level)) / 2)
        with np.errstate(divide="ignore"):
            f = special.expit(special.logit(f) + z * np.sqrt(2 / m_pilot))
    raw = 1 + 0.5 * (f / cv) ** 2
    # tolerance: 1 + 0.5 (0.5 / 0.05)^2 must give 51, not 52
    m = np.ceil(raw * (1 - 1e-12)).astype(int)
    return int(m) if m.ndim == 0 else m
