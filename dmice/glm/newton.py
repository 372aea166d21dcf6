"""Newton steps for logistic and multinomial models from reduced gradients and Hessians.

The workers return, summed over partitions, the gradient ``g`` and the
information ``H`` of the log-likelihood at the current coefficients; the client
takes the step ``beta + (H + P)^-1 (g - P beta)`` where ``P`` is an optional
ridge penalty on every coefficient but the intercepts.  Draws come from the
normal approximation ``N(beta_hat, (H + P)^-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: largest step (in units of the coefficients) taken at once; protects against
#: divergence under separation without changing steps of a well-posed fit
MAX_STEP = 5.0


@dataclass
class NewtonStep:
    beta: np.ndarray  # updated coefficients
    cov: np.ndarray  # (H + P)^-1 at the previous coefficients
    step_se: float  # largest |step| in standard errors


def penalty_matrix(p: int, penalty: float, intercepts: np.ndarray) -> np.ndarray:
    d = np.full(p, penalty)
    d[intercepts] = 0.0
    return np.diag(d)


def step(beta: np.ndarray, g: np.ndarray, H: np.ndarray, P: np.ndarray | None = None) -> NewtonStep:
    """One Newton step; ``beta`` and ``g`` are flat vectors, ``H`` and ``P`` square."""
    if P is not None:
        H = H + P
        g = g - P @ beta
    Li = np.linalg.inv(np.linalg.cholesky(H))  # raises LinAlgError when H is singular
    cov = Li.T @ Li
    delta = cov @ g
    big = np.max(np.abs(delta)) if len(delta) else 0.0
    if big > MAX_STEP:
        delta = delta * (MAX_STEP / big)
    se = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
    return NewtonStep(beta=beta + delta, cov=cov, step_se=float(np.max(np.abs(delta) / se)))


def draw(beta: np.ndarray, cov: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """A draw from ``N(beta, cov)``."""
    L = np.linalg.cholesky(cov)
    return beta + L @ g.standard_normal(len(beta))
