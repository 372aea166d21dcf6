"""Families and links of the analysis's GLMs: means, derivatives, variances, log-likelihoods.

Pure numpy and scipy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special
from scipy.special import expit, ndtr, ndtri

from dmice.errors import InputError

FAMILIES = {"gaussian": ("identity",), "binomial": ("logit", "probit", "cloglog"), "poisson": ("log",)}
COV_TYPES = ("nonrobust", "HC0", "HC1")
CANONICAL = {"gaussian": "identity", "binomial": "logit", "poisson": "log"}
SQRT_2PI = math.sqrt(2 * math.pi)


def inverse_link(link: str, eta: np.ndarray,
                  second: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``mu``, ``dmu/deta`` and ``d2mu/deta2`` of a link at ``eta`` (the last ``None``
    for the canonical links unless ``second``)."""
    if link == "identity":
        return eta, np.ones_like(eta), np.zeros_like(eta) if second else None
    if link == "log":
        mu = np.exp(eta)
        return mu, mu, mu
    if link == "logit":
        mu = expit(eta)
        d1 = mu * (1.0 - mu)
        return mu, d1, d1 * (1.0 - 2.0 * mu) if second else None
    if link == "probit":
        mu = ndtr(eta)
        d1 = np.exp(-0.5 * eta**2) / SQRT_2PI
        return mu, d1, -eta * d1
    if link == "cloglog":
        ee = np.exp(eta)
        mu = -np.expm1(-ee)
        d1 = np.exp(eta - ee)
        return mu, d1, d1 * (1.0 - ee)
    raise AssertionError(link)


def mean(link: str, eta: np.ndarray) -> np.ndarray:
    """``mu`` alone at ``eta`` (a score needs no derivative of the mean)."""
    if link == "logit":
        return expit(eta)
    if link == "log":
        return np.exp(eta)
    return inverse_link(link, eta, second=False)[0]


def apply_link(link: str, mu: np.ndarray) -> np.ndarray:
    """The link function ``eta = g(mu)``."""
    if link == "identity":
        return mu
    if link == "log":
        return np.log(mu)
    if link == "logit":
        return np.log(mu / (1.0 - mu))
    if link == "probit":
        return ndtri(mu)
    if link == "cloglog":
        return np.log(-np.log1p(-mu))
    raise AssertionError(link)


def starting_mu(family: str, y: np.ndarray) -> np.ndarray:
    """Starting means of the first IRLS pass, as statsmodels' ``family.starting_mu``.

    For poisson the mean of ``y`` is the partition's (at least 0.1), so the start, not
    the estimates, depends on the partitioning.
    """
    if family == "gaussian":
        return y
    if family == "binomial":
        return (y + 0.5) / 2.0
    ybar = max(float(y.mean()), 0.1) if len(y) else 1.0
    return (y + ybar) / 2.0


def variance(family: str, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variance function ``V(mu)`` and its derivative ``V'(mu)``."""
    if family == "gaussian":
        return np.ones_like(mu), np.zeros_like(mu)
    if family == "poisson":
        return mu, np.ones_like(mu)
    return mu * (1.0 - mu), 1.0 - 2.0 * mu


def check_family(family: str, link: str | None) -> str:
    if family not in FAMILIES:
        raise InputError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    links = FAMILIES[family]
    if link is None:
        return links[0]
    if link not in links:
        raise InputError(f"link for family {family!r} must be one of {list(links)}, got {link!r}")
    return link


# ------------------------------------------------------------------------------------------
# per-partition statistics
# ------------------------------------------------------------------------------------------
def check_outcome(family: str, y: np.ndarray) -> None:
    if family == "binomial" and np.any((y < 0) | (y > 1)):
        raise InputError("a binomial outcome must be 0/1 or a proportion in [0, 1]")
    if family == "poisson" and np.any(y < 0):
        raise InputError("a poisson outcome must be a count >= 0")


def outcome_constants(family: str, y: np.ndarray, w: np.ndarray | None) -> dict[str, float]:
    """Sums that depend only on the outcome and the weights (``None``: all 1), computed once
    per block: ``sum(log w)`` and the parts of the deviance (``cdev``) and of the
    log-likelihood (``cll``) that do not depend on the means; ``binary`` (1.0 or 0.0) says
    whether a binomial outcome is 0/1 (its log-likelihood is then one log per row)."""
    ones = w is None
    w = np.ones(len(y)) if ones else w
    with np.errstate(divide="ignore", invalid="ignore"):
        sumlogw = 0.0 if ones else float(np.sum(np.log(w[w > 0])))
        if family == "binomial":
            inside = (y > 0) & (y < 1)
            if not np.any(inside):  # 0/1: every term of the entropy is 0
                return {"sumlogw": sumlogw, "cdev": 0.0, "cll": 0.0, "binary": 1.0}
            ent = np.where(inside, special.xlogy(y, y) + special.xlogy(1 - y, 1 - y), 0.0)
            return {"sumlogw": sumlogw, "cdev": float(np.sum(w * ent)), "cll": 0.0,
                    "binary": 0.0}
        if family == "poisson":
            return {"sumlogw": sumlogw, "cdev": float(np.sum(w * (special.xlogy(y, y) - y))),
                    "cll": float(np.sum(w * special.gammaln(y + 1.0))), "binary": 0.0}
    return {"sumlogw": sumlogw, "cdev": 0.0, "cll": 0.0, "binary": 0.0}


def loglik_terms(family: str, y: np.ndarray, mu: np.ndarray, binary: bool) -> np.ndarray:
    """Per-row terms of the log-likelihood kernel at the means ``mu`` (binomial: without
    the binomial coefficient; poisson: without ``log(y!)``; gaussian: the squared
    residuals, whose weighted sum is the deviance)."""
    if family == "gaussian":
        return (y - mu) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        if family == "poisson":
            return special.xlogy(y, mu) - mu
        if binary:  # y in {0, 1}: log(mu) where y = 1, log(1 - mu) where y = 0
            return np.log(np.where(y > 0, mu, 1.0 - mu))
        # xlogy(y, mu) = y log(mu), 0 where y = 0; xlog1py(1 - y, -mu) = (1 - y) log(1 - mu),
        # 0 where y = 1
        t = special.xlogy(y, mu)
        t += special.xlog1py(1.0 - y, -mu)
        return t


def deviance_loglik(family: str, kern: float, c: dict[str, float]) -> tuple[float, float]:
    """Deviance and log-likelihood (binomial without the binomial coefficient; 0 for
    gaussian, whose log-likelihood depends on the dispersion) from the weighted sum
    ``kern`` of :func:`loglik_terms`."""
    if family == "gaussian":
        return kern, 0.0
    if family == "poisson":
        return 2.0 * c["cdev"] - 2.0 * kern, kern - c["cll"]
    return 2.0 * c["cdev"] - 2.0 * kern, kern
