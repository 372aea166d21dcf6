"""What :func:`dmice.analyze` returns: the per-imputation fits, the pooled table (Rubin's rules),
nested-model tests (D1, D2, D3) and pooled R-squared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dmice.analysis.fit import _fixed_pass, _unplaced
from dmice.errors import InputError


@dataclass
class ImputationFit:
    """The model fitted on one completed data set.

    Attributes
    ----------
    params : pandas.Series
        Estimates, indexed by term.
    cov : pandas.DataFrame
        Their covariance matrix (model-based or sandwich, as asked).
    scale : float
        Dispersion (Pearson chi-square / (n - p) for gaussian, 1 otherwise).
    deviance : float
        Deviance at the estimates.
    """

    params: pd.Series
    cov: pd.DataFrame
    scale: float
    deviance: float

    @property
    def bse(self) -> pd.Series:
        """Standard errors."""
        return pd.Series(np.sqrt(np.diag(self.cov.to_numpy())), index=self.params.index)


@dataclass(repr=False)
class AnalysisResult:
    """The result of :func:`analyze`: one fit per imputation and their pooled estimates.

    Attributes
    ----------
    formula : str
        The model formula.
    family, link, cov_type : str
        The model and the kind of covariance.
    terms : list of str
        Column names of the model matrix.
    fits : list of ImputationFit
        Estimates and covariance of each imputation (``fits[k - 1]`` for imputation k).
    nobs : int
        Rows per completed data set.
    dfcom : float
        Complete-data degrees of freedom used in pooling.
    iterations : int
        Passes over the data.
    pooled_result : dmice.pooling.PooledResult
        The full result of :func:`dmice.pooling.pool`.
    outcome : str
        Left-hand side of the formula.
    weights, offset : str or None
        Columns of prior weights and offset.
    loglik : numpy.ndarray of shape (m,)
        Log-likelihood of each fit (gaussian: at the maximum-likelihood variance
        ``rss / n``; binomial without the binomial coefficient).
    """

    formula: str
    family: str
    link: str
    cov_type: str
    terms: list[str]
    fits: list[ImputationFit]
    nobs: int
    dfcom: float
    iterations: int
    pooled_result: Any = field(repr=False)
    outcome: str = ""
    weights: str | None = None
    offset: str | None = None
    loglik: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    _stats: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _frames: list[Any] = field(default_factory=list, repr=False)
    _files: list[list[Any]] | None = field(default=None, repr=False)
    _data: Any = field(default=None, repr=False)  # what analyze() was given (a path opened)
    _design: Any = field(default=None, repr=False)
    _client: Any = field(default=None, repr=False)

    @property
    def m(self) -> int:
        """Number of imputations."""
        return len(self.fits)

    @property
    def pooled(self) -> pd.DataFrame:
        """Rubin's rules table (``term, m, estimate, ubar, b, t, dfcom, df, riv, lambda, fmi``)."""
        return self.pooled_result.pooled

    def summary(self, conf_int: bool = True, exponentiate: bool = False,
                conf_level: float | None = None) -> pd.DataFrame:
        """Pooled estimates, standard errors, tests and confidence intervals.

        Parameters
        ----------
        conf_int : bool, default True
            Add ``conf_low`` and ``conf_high``.
        exponentiate : bool, default False
            Report ``exp(estimate)`` and exponentiated bounds (odds or rate ratios).
        conf_level : float, optional
            Confidence level (default 0.95).

        Returns
        -------
        pandas.DataFrame
            As :meth:`dmice.pooling.PooledResult.summary`.
        """
        return self.pooled_result.summary(conf_int=conf_int, exponentiate=exponentiate,
                                          conf_level=conf_level)

    @property
    def df_resid(self) -> int:
        """Residual degrees of freedom of each fit, ``nobs - p``."""
        return self.nobs - len(self.terms)

    def mc_error(self, target_cv: float = 0.05) -> pd.DataFrame:
        """Monte-Carlo errors of the pooled results and the recommended m.

        See :meth:`dmice.pooling.PooledResult.mc_error` (jackknife over the
        imputations, as Stata's ``mi estimate, mcerror``; ``recommended_m`` from von
        Hippel's quadratic rule for a standard error whose coefficient of variation
        over repeated imputation is ``target_cv``).

        Parameters
        ----------
        target_cv : float, default 0.05
            Coefficient of variation of the standard error that the recommended m aims at.
        """
        return self.pooled_result.mc_error(target_cv=target_cv)

    def table(self, exponentiate: bool = False, target_cv: float = 0.05) -> pd.DataFrame:
        """The printed table: :meth:`summary` with ``fmi``, the Monte-Carlo errors of the
        estimate, standard error and p-value, and the recommended m of each term.

        Parameters
        ----------
        exponentiate : bool, default False
            Show ``exp(estimate)`` and exponentiated bounds (odds or rate ratios).
        target_cv : float, default 0.05
            As in :meth:`mc_error`.
        """
        out = self.summary(conf_int=True, exponentiate=exponentiate)
        mc = self.mc_error(target_cv=target_cv)
        for c in ("fmi", "mc_se_estimate", "mc_se_std_error", "mc_se_p_value", "recommended_m"):
            out[c] = mc[c].to_numpy()
        if exponentiate:  # MC error of exp(estimate) by the delta method
            out["mc_se_estimate"] = out["mc_se_estimate"] * out["estimate"]
        return out

    def r_squared(self, adjusted: bool = False) -> pd.DataFrame:
        """Pooled R-squared of a gaussian model, as ``mice::pool.r.squared``.

        Each fit's R-squared is R's ``summary.lm`` one: ``mss / (mss + rss)`` with the
        (weighted) sum of squares of the fitted values without offset about their mean
        (about 0 without an intercept) and the residual sum of squares; the adjusted
        value is ``1 - (1 - R^2) (n - i) / (n - p)`` with ``i = 1`` for an intercept.
        They are pooled by :func:`dmice.pooling.pool_r_squared` (Fisher z).

        Parameters
        ----------
        adjusted : bool, default False
            Pool the adjusted R-squared.

        Returns
        -------
        pandas.DataFrame
            One row (``"R^2"`` or ``"adj R^2"``) with columns ``est, lo_95, hi_95, fmi``.

        Raises
        ------
        dmice.errors.InputError
            For a non-gaussian model.
        """
        from dmice.pooling import pool_r_squared

        return pool_r_squared(self.r_squared_values(adjusted), self.nobs, adjusted=adjusted)

    def r_squared_values(self, adjusted: bool = False) -> np.ndarray:
        """R-squared (or adjusted R-squared) of each imputation's fit (see :meth:`r_squared`).

        Parameters
        ----------
        adjusted : bool, default False
            The adjusted R-squared, ``1 - (1 - R^2)(n - 1) / (n - p)`` (``n - 1`` becomes ``n``
            without an intercept).
        """
        if self.family != "gaussian":
            raise InputError(f"R-squared is defined for gaussian models, this one is {self.family!r}")
        n, p = self.nobs, len(self.terms)
        icpt = "Intercept" in self.terms
        out = np.empty(self.m)
        for k, s in enumerate(self._stats):
            sw, swe, swe2 = float(s["sw"]), float(s["swe"]), float(s["swe2"])
            mss = swe2 - swe**2 / sw if icpt else swe2
            r2 = mss / (mss + float(s["pearson"]))
            out[k] = 1 - (1 - r2) * (n - int(icpt)) / (n - p) if adjusted else r2
        return out

    def _loglik_at(self, params: np.ndarray) -> np.ndarray:
        """Log-likelihood of each imputation's data at ``params`` (one pass over the data);
        gaussian models use the average of the m maximum-likelihood variances."""
        if self._design is None:
            raise InputError("this result holds no data to evaluate likelihoods on")
        betas = np.tile(np.asarray(params, dtype=float), (self.m, 1))
        stats = _fixed_pass(self._frames, self._design, self.family, self.link, betas, self._client,
                            self._files, spread=_unplaced(self._data, self._frames))
        if self.family != "gaussian":
            return np.array([float(s["loglik"]) for s in stats])
        n = self.nobs
        s2 = float(np.mean([float(s["pearson"]) / n for s in self._stats]))
        return np.array([-0.5 * n * math.log(2 * math.pi * s2) + 0.5 * float(s["sumlogw"])
                         - float(s["pearson"]) / (2 * s2) for s in stats])

    def compare(self, reduced: AnalysisResult | None = None, *, method: str = "D1",
                dfcom: float | None = None, ariv: str = "default") -> ModelComparison:
        """Test this model against a nested one with multiply imputed data (mice's D1/D2/D3).

        Parameters
        ----------
        reduced : AnalysisResult, optional
            The nested model, fitted by :func:`analyze` on the same data with the same
            outcome, family, link, weights and offset and a subset of this model's
            terms.  Default: the intercept-only model (D1 and D2 then test every
            coefficient but the intercept, as mice's ``D1(fit1)``).
        method : {"D1", "D2", "D3"}, default "D1"
            ``"D1"``: multivariate Wald test (:func:`dmice.pooling.wald_d1`, mice's
            ``D1(fit1, fit0)``) with ``dfcom``; ``"D2"``: pooled Wald chi-squares
            (:func:`dmice.pooling.chi2_d2`, mice's ``D2(fit1, fit0)``); ``"D3"``:
            Meng--Rubin likelihood-ratio test (:func:`dmice.pooling.lr_d3`, mitml's
            ``testModels(method = "D3")``), which takes one more pass over the data
            per model to evaluate each imputation's log-likelihood at the pooled
            estimates.
        dfcom : float, optional
            Complete-data df for D1; default this model's :attr:`dfcom` (the residual
            df unless given to :func:`analyze`), as mice.  Ignored by D2 and D3.
        ariv : {"default", "positive"}, default "default"
            D3 only: ``"positive"`` truncates a negative ``riv`` at 0.

        Returns
        -------
        ModelComparison

        Raises
        ------
        dmice.errors.InputError
            When the models are not nested, differ in m, rows, outcome, family, link,
            weights or offset, were fitted on different data, or ``method`` is unknown.

        Notes
        -----
        D3 evaluates the log-likelihood of imputation i's data at the estimates
        averaged over the m imputations; for gaussian models the variance is the
        average of the m maximum-likelihood variances ``rss / n``, as mitml does for
        ``lm``.  mice's ``D3()`` instead refits the intercept (and the variance) at the
        pooled slopes, so its statistic can differ slightly from mitml's and dmice's.
        Binomial and poisson log-likelihoods leave out the terms that depend only on
        the outcome where they cancel in the ratio (the binomial coefficient).

        Examples
        --------
        >>> full = dmice.analyze(imp, "y ~ x + C(g)")               # doctest: +SKIP
        >>> full.compare(dmice.analyze(imp, "y ~ x"), method="D3")  # doctest: +SKIP
        """
        from dmice.pooling import chi2_d2, lr_d3, wald_chi2, wald_d1

        if method not in ("D1", "D2", "D3"):
            raise InputError(f"method must be 'D1', 'D2' or 'D3', got {method!r}")
        if reduced is None:
            if method == "D3":
                from dmice.analysis import analyze

                reduced = analyze(self._data if self._data is not None else self._frames,
                                  f"{self.outcome} ~ 1", family=self.family,
                                  link=self.link, weights=self.weights, offset=self.offset,
                                  client=self._client)
                tested = [t for t in self.terms if t not in reduced.terms]
            else:
                tested = [t for t in self.terms if t != "Intercept"]
            if not tested:
                raise InputError("the model has no terms besides the intercept to test")
        else:
            tested = self._check_nested(reduced)
        rformula = reduced.formula if reduced is not None else "intercept only"
        if method in ("D1", "D2"):
            est = pd.DataFrame([f.params for f in self.fits], columns=self.terms)
            covs = [f.cov for f in self.fits]
            if method == "D1":
                dfc = self.dfcom if dfcom is None else dfcom
                row = wald_d1(est, covs, tested, dfcom=dfc)
            else:
                row = chi2_d2(wald_chi2(est, covs, tested), len(tested))
        else:
            assert reduced is not None
            ll1p = self._loglik_at(self.pooled["estimate"].to_numpy())
            ll0p = reduced._loglik_at(reduced.pooled["estimate"].to_numpy())
            row = lr_d3(self.loglik, reduced.loglik, ll1p, ll0p, len(tested), ariv=ariv)
        r = row.iloc[0]
        return ModelComparison(method=method, full=self.formula, reduced=rformula,
                               tested=list(tested), statistic=float(r["statistic"]),
                               df1=int(r["df1"]), df2=float(r["df2"]), dfcom=float(r["dfcom"]),
                               p_value=float(r["p_value"]), riv=float(r["riv"]), m=self.m)

    def _check_nested(self, reduced: Any) -> list[str]:
        if not isinstance(reduced, AnalysisResult):
            raise InputError(f"reduced must be an AnalysisResult from dmice.analyze, got "
                             f"{type(reduced).__name__}")
        if reduced.m != self.m:
            raise InputError(f"the models have different numbers of imputations (m={self.m} and "
                             f"m={reduced.m}); fit both on the same imputations")
        for name in ("nobs", "outcome", "family", "link", "weights", "offset"):
            a, b = getattr(self, name), getattr(reduced, name)
            if a != b:
                raise InputError(f"the models differ in {name} ({a!r} and {b!r}); nested models "
                                 "need the same data and model family")
        extra = [t for t in reduced.terms if t not in self.terms]
        if extra:
            hint = (" (the first model is the smaller one: call reduced.compare(full))"
                    if all(t in reduced.terms for t in self.terms) else "")
            raise InputError(f"the models are not nested: terms {extra} of the reduced model "
                             f"{reduced.formula!r} are not in {self.formula!r}{hint}")
        tested = [t for t in self.terms if t not in reduced.terms]
        if not tested:
            raise InputError(f"the models are not nested: {self.formula!r} has no terms that "
                             f"{reduced.formula!r} lacks")
        for s1, s0 in zip(self._stats, reduced._stats):
            if not np.isclose(float(s1["swy"]), float(s0["swy"]), rtol=1e-9, atol=1e-12):
                raise InputError("the models were fitted on different data (the outcome sums "
                                 "differ between them)")
        return tested

    def __repr__(self) -> str:
        head = (f"<dmice.AnalysisResult {self.formula}  family={self.family} link={self.link} "
                f"cov_type={self.cov_type} m={self.m} nobs={self.nobs:,} dfcom={self.dfcom:g}>")
        tab = self.table()
        text = tab.to_string(index=False, float_format=lambda v: f"{v:.4g}")
        lines = [head, text]
        if self.m >= 3:
            rec = tab["recommended_m"].dropna()
            lines.append("mc_se_*: Monte-Carlo error over the m imputations (jackknife, as Stata's "
                         "mcerror); recommended_m: imputations for a standard error with a 5% "
                         "Monte-Carlo coefficient of variation (von Hippel 2020)"
                         + (f"; largest {int(rec.max())}" if len(rec) else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class ModelComparison:
    """Result of :meth:`AnalysisResult.compare`: a pooled test of nested models.

    Attributes
    ----------
    method : str
        ``"D1"``, ``"D2"`` or ``"D3"``.
    full, reduced : str
        Formulas of the two models.
    tested : list of str
        Terms of the full model absent from the reduced one.
    statistic : float
        F statistic.
    df1, df2 : float
        Numerator and denominator degrees of freedom.
    dfcom : float
        Complete-data df used (D1), NaN otherwise.
    p_value : float
        ``P(F(df1, df2) > statistic)``.
    riv : float
        Average relative increase in variance due to nonresponse.
    m : int
        Number of imputations.
    """

    method: str
    full: str
    reduced: str
    tested: list[str]
    statistic: float
    df1: int
    df2: float
    dfcom: float
    p_value: float
    riv: float
    m: int

    @property
    def table(self) -> pd.DataFrame:
        """One-row table ``test, statistic, df1, df2, dfcom, p_value, riv`` (mice's
        ``summary(D1(...))$comparisons`` in snake case)."""
        return pd.DataFrame([{"test": self.method, "statistic": self.statistic, "df1": self.df1,
                              "df2": self.df2, "dfcom": self.dfcom, "p_value": self.p_value,
                              "riv": self.riv}])

    def __repr__(self) -> str:
        return (f"<dmice.ModelComparison {self.method}: {self.full!r} vs {self.reduced!r}, m={self.m}>\n"
                f"  tested: {', '.join(self.tested)}\n"
                f"  F = {self.statistic:.4g} on {self.df1} and {self.df2:.4g} df, p = {self.p_value:.4g}, "
                f"riv = {self.riv:.4g}")


def compare(full: AnalysisResult, reduced: AnalysisResult | None = None, *, method: str = "D1",
            dfcom: float | None = None, ariv: str = "default") -> ModelComparison:
    """Pooled test of nested models: ``full.compare(reduced, method=...)``.

    Parameters
    ----------
    full : AnalysisResult
        The larger model, from :func:`analyze`.
    reduced : AnalysisResult, optional
        The nested model (default: the intercept-only model).
    method : {"D1", "D2", "D3"}, default "D1"
        Multivariate Wald test (D1), pooled Wald chi-squares (D2) or the Meng--Rubin
        likelihood-ratio test (D3).
    dfcom : float, optional
        Complete-data df for D1 (default: ``full``'s).
    ariv : {"default", "positive"}, default "default"
        D3 only: ``"positive"`` truncates a negative ``riv`` at 0.

    See :meth:`AnalysisResult.compare` for the details.
    """
    if not isinstance(full, AnalysisResult):
        raise InputError(f"full must be an AnalysisResult from dmice.analyze, got {type(full).__name__}")
    return full.compare(reduced, method=method, dfcom=dfcom, ariv=ariv)
