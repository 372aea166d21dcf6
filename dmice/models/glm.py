"""Generalised linear models fitted by Newton's method: ``logreg`` (and ``logreg.firth``),
``polyreg``, ``polr`` and ``poisson``.

The workers compute each chain's score and information at its current estimate (the
statistics named in :data:`NEWTON_STATS`); the client takes Newton steps (one round each,
warm-started from the previous visit) until the fit converges, then draws from the normal
approximation of the posterior (:mod:`dmice.glm.newton`).

Pure numpy; nothing here touches dask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmice.errors import InputError
from dmice.glm import newton
from dmice.models.base import FALLBACK_PENALTY, BaseModel
from dmice.schema import MIN_LEVEL_COUNT

#: statistics computed by the workers for each Newton method
NEWTON_STATS = {"logreg": "logistic", "logreg.firth": "firth", "polyreg": "multinomial",
                "polr": "polr", "poisson": "poisson"}
#: ways of handling separation of a logistic or multinomial fit
SEPARATION = ("firth", "ridge", "error", "none")
#: separation rule: an accepted Newton step still moving a coefficient by at least this much
#: (encoded scale: continuous predictors standardised, dummies 0/1) ...
SEPARATION_STEP = 0.5
#: ... and by at least this fraction of the previous step in the same direction
SEPARATION_RATIO = 0.8


class NewtonModel(BaseModel):
    """A Newton-fitted model of one incomplete variable, all chains.

    Each chain keeps one flat parameter vector: the coefficients on ``xcols`` (level by level
    for ``polyreg``), or ``[cutpoints, slopes]`` for ``polr`` (the slopes on ``xcols`` without
    the intercept).

    Separation of a logistic or multinomial fit is declared when the fit reaches its step limit, or
    when a Newton step of at most one standard error still moves some coefficient by at least
    ``SEPARATION_STEP`` and by at least ``SEPARATION_RATIO`` times its previous step in the same
    direction: a finite maximum is approached quadratically, while a coefficient diverging under
    separation moves by about the same amount every step (its information shrinks as fast as its
    score).  It is then handled as ``separation`` says: ``"firth"`` refits a binary target by
    Firth's penalised likelihood (a multinomial one with the ridge penalty), ``"ridge"`` refits
    with the ridge penalty ``FALLBACK_PENALTY``, ``"error"`` raises, ``"none"`` keeps the
    maximum-likelihood fit (mice's behaviour, for comparisons).  A separated ``polr`` fit falls
    back to ``polyreg``.

    ``shrinkage`` puts a Gaussian prior ``N(0, tau^2)`` on every ``polyreg`` coefficient but the
    intercepts: Newton then finds the posterior mode (the prior precision added to the information)
    and draws come from the Laplace approximation ``N(mode, (H + I / tau^2)^-1)``.  A number is
    ``tau``; ``"auto"`` applies to targets with a level observed fewer than ``min_level_count``
    times and sets ``tau^2`` per chain by empirical Bayes, iterating MacKay's update
    ``tau^2 = |b|^2 / (k - tr(V) / tau^2)`` (``k`` penalised coefficients, ``V`` their posterior
    covariance) until it moves by less than 1%; its fixed point ``tau^2 = (|b|^2 + tr V) / k`` is the
    stationary point of the Laplace evidence with the curvature held fixed.
    """

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.separation = kw.get("separation", "firth")
        shrinkage = kw.get("shrinkage", "auto")
        min_level_count = kw.get("min_level_count", MIN_LEVEL_COUNT)
        self.beta: np.ndarray | None = None  # current estimates, kept across visits
        self.inv_info: np.ndarray | None = None  # Firth: inverse information at beta (score rounds)
        self._firth: dict[str, Any] = {}  # Firth: last accepted estimate and its penalised likelihood
        self._init_pending = False  # polr/poisson: the first round only supplies starting values
        self._separated = False
        self.prior_var: np.ndarray | None = None  # shrinkage: prior variance per chain
        self._fixed_prior = None
        if self.method == "polyreg" and shrinkage is not None:
            if shrinkage == "auto":
                sparse = self.var.counts is not None and min(self.var.counts) < min_level_count
                if sparse:
                    self.prior_var = np.ones(self.m)
            else:
                self._fixed_prior = float(shrinkage) ** 2
                self.prior_var = np.full(self.m, self._fixed_prior)
        self._last_step = np.full(self.m, np.inf)  # each chain's last Newton step (standard errors)
        self._active: np.ndarray | None = None  # chains still iterating (None: all)
        self._curvature = 0.0  # largest observed Newton contraction constant M
        self._prev_delta: np.ndarray | None = None

    # -- state kept across visits -------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Warm start of the Newton fits (what a continued run needs from this model)."""
        return {**super().get_state(), "beta": None if self.beta is None else self.beta.copy(),
                "curvature": self._curvature, "separated": self._separated, "sep_penalty": self._sep_penalty,
                "prior_var": None if self.prior_var is None else self.prior_var.copy(),
                "inv_info": None if self.inv_info is None else self.inv_info.copy()}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        beta = state.get("beta")
        self.beta = None if beta is None else np.asarray(beta, dtype=float).copy()
        self._curvature = float(state.get("curvature", 0.0))
        self._separated = bool(state.get("separated", False))
        self._sep_penalty = float(state.get("sep_penalty", 0.0))
        for key in ("prior_var", "inv_info"):
            if state.get(key) is not None:
                setattr(self, key, np.asarray(state[key], dtype=float).copy())

    @property
    def n_params(self) -> int:
        q = len(self.xcols)
        if self.method == "polyreg":
            return q * (self.var.n_levels - 1)
        if self.method == "polr":
            return self.var.n_levels - 1 + int(np.sum(self.xcols != 0))
        return q

    # -- what the workers compute -------------------------------------------------
    @property
    def stat(self) -> str | None:
        return NEWTON_STATS[self.method]

    def request(self) -> dict[str, Any] | None:
        req = super().request()
        req["beta"] = self._current_beta()
        if self.stat == "firth":
            req["inv_info"] = self.inv_info
        if self._active is not None:
            req["chains"] = np.nonzero(self._active)[0]
        return req

    def _intercepts(self) -> np.ndarray:
        """Positions of the unpenalised parameters (intercepts, cutpoints) in the flat vector."""
        q = len(self.xcols)
        i0 = np.nonzero(self.xcols == 0)[0]
        if self.method == "polyreg":
            return (np.arange(self.var.n_levels - 1)[:, None] * q + i0[None, :]).reshape(-1)
        if self.method == "polr":
            return np.arange(self.var.n_levels - 1)
        return i0

    def _current_beta(self) -> np.ndarray:
        if self.beta is None:
            q = len(self.xcols)
            if self.method == "polyreg":
                self.beta = np.zeros((self.m, q, self.var.n_levels - 1))
            else:
                self.beta = np.zeros((self.m, self.n_params))
                if self.method == "polr":  # any increasing cutpoints; the first round replaces them
                    self.beta[:, :self.var.n_levels - 1] = np.arange(self.var.n_levels - 1)
            self._init_pending = self.method in ("polr", "poisson")
        return self.beta

    def _flat(self, b: np.ndarray) -> np.ndarray:
        return b.T.reshape(-1) if self.method == "polyreg" else b

    def _unflat(self, new: np.ndarray) -> np.ndarray:
        if self.method == "polyreg":
            q = len(self.xcols)
            return new.reshape(self.m, -1, q).transpose(0, 2, 1)
        return new

    def _start(self, s: dict[str, np.ndarray]) -> None:
        """Starting values of polr (cutpoints at the marginal logits) and poisson (log mean)."""
        beta = np.zeros((self.m, self.n_params))
        if self.method == "polr":
            for c in range(self.m):
                cnt = s["counts"][c]
                cum = np.clip(np.cumsum(cnt)[:-1] / max(cnt.sum(), 1.0), 1e-6, 1 - 1e-6)
                cuts = np.log(cum / (1 - cum))
                beta[c, :len(cuts)] = cuts + 1e-6 * np.arange(len(cuts))  # strictly increasing
        else:
            i0 = np.nonzero(self.xcols == 0)[0]
            mean = max(float(s["sy"][0]) / max(float(s["n"]), 1.0), 1e-8)
            if len(i0):
                beta[:, i0[0]] = np.log(mean)
        self.beta = beta
        self._init_pending = False

    def _to_polyreg(self, why: str, iteration: int, events: list[dict[str, Any]]) -> None:
        """Fall back from polr to polyreg (refitted from scratch) with a logged event."""
        events.append({"iteration": iteration, "variable": self.var.name,
                       "event": f"polr cannot be fitted ({why}); imputed with polyreg instead"})
        self.method = "polyreg"
        self.var.method = "polyreg"
        self.beta = None
        self._init_pending = False
        self._rounds = 0
        self._last_step = np.full(self.m, np.inf)
        self._active = None
        self._curvature = 0.0
        self._prev_delta = None

    def _penalty_matrix(self, penalty: float, c: int) -> np.ndarray | None:
        d = np.zeros(self.n_params)
        if penalty:
            d += penalty
        if self.prior_var is not None:
            d += 1.0 / self.prior_var[c]
        if not d.any():
            return None
        # intercepts are left free, except after separation: a level (or outcome) that the
        # fitting rows never show has an intercept that runs off to -inf, and its draws from
        # the huge variance left there were wild (nnet's decay, which mice's polyreg uses,
        # penalises the intercepts too)
        d[self._intercepts()] = self._sep_penalty
        return np.diag(d)

    # -- fitting ---------------------------------------------------------------------
    def _starting(self, s: dict[str, Any]) -> bool:
        if self._init_pending:
            self._start(s)
            return True
        return False

    def _unfittable(self, iteration: int, events: list[dict[str, Any]]) -> bool:
        if self.method != "polr":
            return False
        self._to_polyreg("its information matrix is singular even with the ridge penalty", iteration, events)
        return True

    def _screen_matrices(self, s: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray | None]] | None:
        if self.stat in ("logistic", "multinomial") and self.beta is not None and not np.any(self.beta):
            q = len(self.xcols)
            return [(H[:q, :q], None) for H in s["H"]]
        return None

    def _screened(self, res: dict[str, Any], keep: np.ndarray) -> tuple[dict[str, Any], bool]:
        self.beta = self.beta[:, keep]
        return res, True

    def _update(self, res: dict[str, Any], n: float, penalty: float, iteration: int,
                events: list[dict[str, Any]]) -> bool:
        s = res["sum"]
        beta = self._current_beta()
        if self.stat == "firth" and self.inv_info is None:
            return self._firth_information(s, penalty)
        score = s["gf"] if self.stat == "firth" else s["g"]
        # chains still iterating: the statistics come for these only (all in a visit's first round)
        computed = np.ones(self.m, dtype=bool) if self._active is None else self._active
        fits = list(self._fits) if self._active is not None else [None] * self.m
        steps = np.zeros(self.m)
        delta = np.zeros((self.m, self.n_params))
        for i, c in enumerate(np.nonzero(computed)[0]):
            b = self._flat(beta[c])
            H = s["H"][i]
            if self.stat == "firth":
                H = self._firth_hessian(s, c)
            st = newton.step(b, score[i], H, self._penalty_matrix(penalty, c))
            if self.stat == "firth":
                st.cov = self._firth["inv"][c]  # draws and hat values use the Fisher information
            if self.method == "polr":
                st.beta = _ordered_cuts(b, st.beta, self.var.n_levels - 1)
            fits[c] = st
            delta[c] = st.beta - b
            steps[c] = st.step_se
        worst = float(steps.max())
        self.beta = self._unflat(np.stack([f.beta for f in fits]))
        if self.stat == "firth":
            self.inv_info = None  # the next round computes the information at the new estimate
        self._fits = fits
        self._rounds += 1
        prev_delta, self._prev_delta = self._prev_delta, delta
        prior_moved = self._update_prior()
        # Newton converges quadratically: e_next ~ M e^2 (in standard errors).  M is measured on
        # consecutive steps of the same chain's fit; once known, a step d leaves an error of about
        # M d^2.  Each chain stops on its own; the others keep iterating.
        prev = self._last_step
        self._last_step = np.where(computed, steps, np.inf)
        if self._rounds > 1:
            measured = computed & (prev >= 0.05) & (prev <= 2.0)
            if measured.any():
                self._curvature = max(self._curvature,
                                      float(np.max(steps[measured] / prev[measured] ** 2)))
        predicted = self._curvature * steps**2 if self._curvature > 0 else np.full(self.m, np.inf)
        chain_done = (steps <= self.newton_tol) | ((steps <= 3.0) & (predicted <= self.newton_accuracy))
        chain_done |= ~computed
        done = bool(chain_done.all()) and not prior_moved
        # per-chain rounds for the kernels whose rounds carry no state shared by the chains
        # (Firth's rounds alternate information and score; a moving prior refits every chain)
        self._active = None if (done or prior_moved or self.stat == "firth") else ~chain_done
        if (done or worst <= 1.0 or self._rounds >= self.max_newton) \
                and self._check_separation(done, delta, prev_delta, iteration, events):
            return False
        if done or self._rounds >= self.max_newton:
            if not done and self.method == "polr":
                self._to_polyreg(f"no convergence in {self._rounds} Newton steps, e.g. a predictor "
                                 "orders the levels perfectly", iteration, events)
                return False
            if not done:
                events.append({"iteration": iteration, "variable": self.var.name,
                               "event": f"Newton fit did not converge in {self._rounds} steps"})
            self._finish()
            return True
        return False

    def _firth_information(self, s: dict[str, np.ndarray], penalty: float) -> bool:
        """Firth, first round of a step: information and penalised likelihood at the current estimate.

        Like logistf, a step that lowers the penalised log-likelihood ``l + log|I| / 2`` is halved
        back towards the previous estimate (per chain).  Otherwise the inverse information is
        kept and broadcast, and the next round computes the modified score with exact hat values.
        """
        beta = self.beta
        prev = self._firth.get("beta")
        pll = np.array([float(s["ll"][c]) + 0.5 * np.linalg.slogdet(s["H"][c])[1] for c in range(self.m)])
        if prev is not None:
            worse = pll < self._firth["pll"] - 1e-9
            halvings = self._firth.get("halvings", 0)
            if worse.any() and halvings < 20:
                self.beta = np.where(worse[:, None], (prev + beta) / 2, beta)
                self._firth["halvings"] = halvings + 1
                return False
        self._firth = {"beta": beta.copy(), "pll": pll, "halvings": 0}
        inv = []
        for c in range(self.m):
            P = self._penalty_matrix(penalty, c)
            H = s["H"][c] + (P if P is not None else 0.0)
            Li = np.linalg.inv(np.linalg.cholesky(H))
            inv.append(Li.T @ Li)
        self.inv_info = np.stack(inv)
        self._firth["H"] = s["H"]
        self._firth["inv"] = self.inv_info
        return False

    def _firth_hessian(self, s: dict[str, np.ndarray], c: int) -> np.ndarray:
        """Negative Hessian of ``l + log|I| / 2``: ``I - A / 2 + B / 2`` with
        ``B_jk = tr(V T_j V T_k)``; the Fisher information ``I`` where it is not positive definite."""
        info = self._firth["H"][c]
        if "T" not in s:
            return info
        V = self._firth["inv"][c]
        q = info.shape[0]
        T = s["T"][c].reshape(q, q, q)
        VT = np.einsum("ab,jbc->jac", V, T)  # V T_j
        Bm = np.einsum("jac,kca->jk", VT, VT)  # tr(V T_j V T_k)
        Hp = info - 0.5 * s["A"][c] + 0.5 * Bm
        Hp = (Hp + Hp.T) / 2
        try:
            np.linalg.cholesky(Hp)
        except np.linalg.LinAlgError:
            return info
        return Hp

    def _finish(self) -> None:
        self._firth = {}
        self.last_rounds = self._rounds
        self._rounds = 0
        self._last_step = np.full(self.m, np.inf)
        self._active = None
        self._prev_delta = None

    def _update_prior(self) -> bool:
        """Empirical-Bayes prior variance (MacKay's fixed point); True while it still moves."""
        if self.prior_var is None or self._fixed_prior is not None:
            return False
        pen = np.ones(self.n_params, dtype=bool)
        pen[self._intercepts()] = False
        k = int(pen.sum())
        moved = False
        for c, f in enumerate(self._fits):
            b = f.beta[pen]
            tr = float(np.trace(f.cov[np.ix_(pen, pen)]))
            old = self.prior_var[c]
            gamma = max(k - tr / old, 1e-3)  # effective number of well-determined coefficients
            new = float(np.clip(b @ b / gamma, 1e-4, 1e4))
            self.prior_var[c] = new
            moved |= abs(np.log(new / old)) > 0.01
        return moved

    def _check_separation(self, done: bool, delta: np.ndarray, prev_delta: np.ndarray | None,
                          iteration: int, events: list[dict[str, Any]]) -> bool:
        """Apply the separation rule at the end of a fit; True when the model is refitted."""
        if self.method not in ("logreg", "polyreg", "polr") or self._separated:
            return False
        separated = not done and self._rounds >= self.max_newton
        if prev_delta is not None:
            for d, dp in zip(delta, prev_delta):
                i = int(np.argmax(np.abs(d)))
                if abs(d[i]) >= SEPARATION_STEP and d[i] * dp[i] > 0 \
                        and abs(d[i]) >= SEPARATION_RATIO * abs(dp[i]):
                    separated = True
        if not separated:
            return False
        name = self.var.name
        if self.separation == "error":
            raise InputError(f"column {name!r}: the {self.method} model is separated (a predictor "
                             "predicts some of its values perfectly); use separation='firth' or "
                             "'ridge', collapse rare levels, or choose another method")
        fit = NEWTON_STATS[self.method]
        if self.separation == "none":  # plain maximum likelihood, as mice without augmentation
            self._separated = True
            events.append({"iteration": iteration, "variable": name,
                           "event": f"separation detected in the {fit} fit after {self._rounds} "
                                    "Newton steps; maximum-likelihood fit kept (separation='none')"})
            return False
        if self.method == "polr":  # the multinomial model then gets its own separation handling
            self._to_polyreg(f"separation detected after {self._rounds} Newton steps", iteration, events)
            return True
        self._separated = True
        if self.method == "logreg" and self.separation == "firth":
            self.method = "logreg.firth"
            self.var.method = "logreg.firth"
            what = "refitted by Firth's penalised likelihood (logreg.firth)"
        else:
            self._sep_penalty = FALLBACK_PENALTY
            what = f"refitted with a ridge penalty of {FALLBACK_PENALTY}"
        events.append({"iteration": iteration, "variable": name,
                       "event": f"separation detected in the {fit} fit after {self._rounds} Newton steps; {what}"})
        self.beta = None
        self.inv_info = None
        self._firth = {}
        self._rounds = 0
        self._last_step = np.full(self.m, np.inf)
        self._active = None
        self._curvature = 0.0
        self._prev_delta = None
        return True

    # -- drawing -----------------------------------------------------------------------
    def order(self, iteration: int) -> dict[str, Any]:
        o = super().order(iteration)
        gens = self._generators(iteration)
        draws = [newton.draw(f.beta, f.cov, g) for f, g in zip(self._fits, gens)]
        if self.method == "polr":
            km1 = self.var.n_levels - 1
            draws = [_ordered_cuts(f.beta, d, km1) for f, d in zip(self._fits, draws)]
            slopes = np.zeros((self.m, len(self.xcols)))
            slopes[:, self.xcols != 0] = np.stack([d[km1:] for d in draws])
            o["beta"] = slopes
            o["cuts"] = np.stack([d[:km1] for d in draws])
            return o
        o["beta"] = self._unflat(np.stack(draws))
        return o


def _ordered_cuts(b: np.ndarray, new: np.ndarray, km1: int) -> np.ndarray:
    """Move from ``b`` towards ``new`` by halving the move until the cutpoints stay increasing."""
    t = 1.0
    while km1 > 1 and np.any(np.diff(b[:km1] + t * (new[:km1] - b[:km1])) <= 0) and t > 1e-12:
        t /= 2
    return b + t * (new - b)
