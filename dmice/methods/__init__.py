"""Conditional models: what each method asks the workers for, and the draws it makes.

Each incomplete variable gets a :class:`TargetModel`.  In every visit the
engine asks it for a *request* (which sufficient statistics the workers should
compute), hands back the reduced statistics with :meth:`TargetModel.update`
(repeating while a Newton fit has not converged) and finally asks for an
*order*: the parameters drawn for every chain, which the workers use to impute.

This module is pure numpy; it never touches dask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmice import rng as _rng
from dmice.errors import InputError
from dmice.methods import linear, newton
from dmice.methods import pmm as _pmm
from dmice.schema import MIN_LEVEL_COUNT, Variable

#: penalty added to the coefficients when a model has too few observations
FALLBACK_PENALTY = 1.0
#: a Newton fit is accepted once its remaining error is predicted below this many standard errors
NEWTON_ACCURACY = 0.05
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


class TargetModel:
    """The conditional model of one incomplete variable, for all chains.

    Newton methods (``logreg``, ``logreg.firth``, ``polyreg``, ``polr``, ``poisson``) keep one flat
    parameter vector per chain: the coefficients on ``xcols`` (level by level for ``polyreg``), or
    ``[cutpoints, slopes]`` for ``polr`` (the slopes on ``xcols`` without the intercept).

    Separation of a logistic or multinomial fit is declared when the fit reaches its step limit, or
    when a Newton step of at most one standard error still moves some coefficient by at least
    ``SEPARATION_STEP`` and by at least ``SEPARATION_RATIO`` times its previous step in the same
    direction: a finite maximum is approached quadratically, while a coefficient diverging under separation moves by about the same
    amount every step (its information shrinks as fast as its score).  It is then handled as
    ``separation`` says: ``"firth"`` refits a binary target by Firth's penalised likelihood (a
    multinomial one with the ridge penalty), ``"ridge"`` refits with the ridge penalty
    ``FALLBACK_PENALTY``, ``"error"`` raises, ``"none"`` keeps the maximum-likelihood fit (mice's
    behaviour, for comparisons).  A separated ``polr`` fit falls back to ``polyreg``.

    ``shrinkage`` puts a Gaussian prior ``N(0, tau^2)`` on every ``polyreg`` coefficient but the
    intercepts: Newton then finds the posterior mode (the prior precision added to the information)
    and draws come from the Laplace approximation ``N(mode, (H + I / tau^2)^-1)``.  A number is
    ``tau``; ``"auto"`` applies to targets with a level observed fewer than ``min_level_count``
    times and sets ``tau^2`` per chain by empirical Bayes, iterating MacKay's update
    ``tau^2 = |b|^2 / (k - tr(V) / tau^2)`` (``k`` penalised coefficients, ``V`` their posterior
    covariance) until it moves by less than 1%; its fixed point ``tau^2 = (|b|^2 + tr V) / k`` is the
    stationary point of the Laplace evidence with the curvature held fixed.
    """

    def __init__(self, j: int, var: Variable, xcols: np.ndarray, *, m: int, seed: int,
                 donors: int = 5, ridge: float = 1e-5, newton_tol: float = 0.2,
                 newton_accuracy: float = NEWTON_ACCURACY,
                 max_newton: int = 25, sample_pool: np.ndarray | None = None, chain0: int = 0,
                 labels: list[str] | None = None, screen: bool = True, stream: tuple[int, ...] = (),
                 separation: str = "firth", shrinkage: str | float | None = "auto",
                 min_level_count: int = MIN_LEVEL_COUNT, exact: bool = False,
                 match_bytes: int = 256 * 2**20):
        self.j = j
        self.var = var
        self.method = var.method
        self.xcols = np.asarray(xcols, dtype=np.int64)
        self.m = m
        self.seed = seed
        self.donors = donors
        self.match_bytes = match_bytes  # exact pmm: most bytes gathered per matching round
        self._obs_values: np.ndarray | None = None  # exact pmm: the observed values, once gathered
        self.ridge = ridge
        self.newton_tol = newton_tol
        self.newton_accuracy = newton_accuracy
        self.max_newton = max_newton
        self.sample_pool = sample_pool
        self.chain0 = chain0  # number of the first chain: draws are keyed by chain number
        self.separation = separation
        self.beta: np.ndarray | None = None  # current estimates (Newton methods), kept across visits
        self.inv_info: np.ndarray | None = None  # Firth: inverse information at beta (score rounds)
        self._firth: dict[str, Any] = {}  # Firth: last accepted estimate and its penalised likelihood
        self._init_pending = False  # polr/poisson: the first round only supplies starting values
        self._separated = False
        self._sep_penalty = 0.0
        self.prior_var: np.ndarray | None = None  # shrinkage: prior variance per chain
        self._fixed_prior = None
        if self.method == "polyreg" and shrinkage is not None:
            if shrinkage == "auto":
                sparse = var.counts is not None and min(var.counts) < min_level_count
                if sparse:
                    self.prior_var = np.ones(m)
            else:
                self._fixed_prior = float(shrinkage) ** 2
                self.prior_var = np.full(m, self._fixed_prior)
        self._fits: list[Any] = []
        self._donor: dict[str, np.ndarray] | None = None  # pmm: the donor rows' cells of this visit
        self._pool_D: np.ndarray | None = None  # pmm: the donor rows' fixed design (no imputed cells)
        self._pool_y: np.ndarray | None = None  # ... their observed values
        self._pool_xcols: np.ndarray | None = None  # ... and the predictors of its columns
        #: pmm: match on all observed rows (dmice.methods.pmm) instead of a sample of them
        self.exact = exact
        self._matched: dict[int, list[np.ndarray]] = {}  # exact pmm: each chain's values per partition
        self._scarce: list[int] = []  # exact pmm: missing cells with scarce donors, per chain
        self.scarcity_logged = False
        self._rounds = 0
        self.last_rounds = 0
        self._last_step = np.full(m, np.inf)  # each chain's last Newton step (standard errors)
        self._active: np.ndarray | None = None  # chains still iterating (None: all)
        self._curvature = 0.0  # largest observed Newton contraction constant M
        self.labels = labels  # names of the encoded design columns, for logged events
        self.screen = screen  # drop constant and collinear predictors before each fit
        self.stream = tuple(stream)  # extra key of the client-side random streams (by= groups)
        self.dropped: list[str] = []  # labels of the predictors dropped so far
        self._prev_delta: np.ndarray | None = None

    # -- state kept across visits -------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Warm start of the Newton fits (what a continued run needs from this model)."""
        return {"beta": None if self.beta is None else self.beta.copy(), "curvature": self._curvature,
                "xcols": self.xcols.copy(), "dropped": list(self.dropped), "method": self.method,
                "separated": self._separated, "sep_penalty": self._sep_penalty,
                "prior_var": None if self.prior_var is None else self.prior_var.copy(),
                "inv_info": None if self.inv_info is None else self.inv_info.copy()}

    def set_state(self, state: dict[str, Any]) -> None:
        beta = state.get("beta")
        self.beta = None if beta is None else np.asarray(beta, dtype=float).copy()
        self._curvature = float(state.get("curvature", 0.0))
        if state.get("xcols") is not None:  # predictors dropped by the screening stay dropped
            self.xcols = np.asarray(state["xcols"], dtype=np.int64)
        self.dropped = list(state.get("dropped", []))
        if state.get("method"):  # a separated logreg continues as logreg.firth, a failed polr as polyreg
            self.method = self.var.method = state["method"]
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

    def _intercepts(self) -> np.ndarray:
        """Positions of the unpenalised parameters (intercepts, cutpoints) in the flat vector."""
        q = len(self.xcols)
        i0 = np.nonzero(self.xcols == 0)[0]
        if self.method == "polyreg":
            return (np.arange(self.var.n_levels - 1)[:, None] * q + i0[None, :]).reshape(-1)
        if self.method == "polr":
            return np.arange(self.var.n_levels - 1)
        return i0

    # -- what the workers compute -------------------------------------------------
    @property
    def stat(self) -> str | None:
        if self.method in ("norm", "pmm"):
            return "gram"
        return NEWTON_STATS.get(self.method)

    def request(self) -> dict[str, Any] | None:
        if self.stat is None:
            return None
        req: dict[str, Any] = {"var": self.j, "stat": self.stat, "xcols": self.xcols}
        if self.method == "pmm" and not self.exact:  # the donors' fixed design only when not kept yet
            kept = self._pool_D is not None and np.array_equal(self._pool_xcols, self.xcols)
            req["pool"] = "cells" if kept else "base"
        if self.stat != "gram":
            req["beta"] = self._current_beta()
        if self.stat == "firth":
            req["inv_info"] = self.inv_info
        if self._active is not None:
            req["chains"] = np.nonzero(self._active)[0]
        return req

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

    # -- fitting ---------------------------------------------------------------------
    def _penalty(self, n: float) -> float:
        return FALLBACK_PENALTY if n <= self.n_params else 0.0

    def update(self, res: dict[str, Any], iteration: int, events: list[dict[str, Any]]) -> bool:
        """Consume reduced statistics; return True once the model is ready to draw."""
        if self.screen and self._rounds == 0:
            res, stale = self._screen(res, iteration, events)
            if stale:
                return False
        n = float(res["sum"]["n"])
        if self._init_pending:
            self._start(res["sum"])
            return False
        penalty = max(self._penalty(n), self._sep_penalty)
        if self._penalty(n) and self._rounds == 0:
            events.append({"iteration": iteration, "variable": self.var.name,
                           "event": f"ridge fallback: {int(n)} observed rows for "
                                    f"{self.n_params} parameters"})
        try:
            try:
                return self._update(res, n, penalty, iteration, events)
            except np.linalg.LinAlgError:
                if penalty:
                    raise
                events.append({"iteration": iteration, "variable": self.var.name,
                               "event": "ridge fallback: singular information matrix (constant or "
                                        "collinear predictors)"})
                return self._update(res, n, FALLBACK_PENALTY, iteration, events)
        except np.linalg.LinAlgError:
            if self.method != "polr":
                raise
            self._to_polyreg("its information matrix is singular even with the ridge penalty",
                             iteration, events)
            return False

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

    def _screen(self, res: dict[str, Any], iteration: int, events: list[dict[str, Any]]
                ) -> tuple[dict[str, Any], bool]:
        """Drop constant and (near-)collinear predictors (mice's ``remove.lindep``) before a fit.

        Gram models are screened before every fit on ``X'X`` (and ``X'y`` for the
        ``maxcor`` rule), Newton models before their cold start, where the leading block
        of the Hessian is ``X'X`` times a constant.  Drops are permanent and logged.
        Returns the statistics restricted to the kept predictors and whether they must
        be recomputed (Newton statistics depend on the design).
        """
        from dmice import predictors as _pred

        s = res["sum"]
        q = len(self.xcols)
        if not q or self.xcols[0] != 0:  # the rules need the intercept in column 0
            return res, False
        if self.stat == "gram":
            mats = [(G[:q, :q], G[:, q]) for G in s["G"]]
        elif self.stat in ("logistic", "multinomial") and self.beta is not None and not np.any(self.beta):
            mats = [(H[:q, :q], None) for H in s["H"]]
        else:
            return res, False
        keep = np.ones(q, dtype=bool)
        for A, y in mats:
            drop, why = _pred.screen(A, keep, y)
            for i, w in zip(drop, why):
                keep[i] = False
                label = self.labels[self.xcols[i]] if self.labels else f"column {self.xcols[i]}"
                self.dropped.append(label)
                events.append({"iteration": iteration, "variable": self.var.name,
                               "event": f"predictor {label!r} dropped: {w} among the fitting rows"})
        if keep.all():
            return res, False
        self.xcols = self.xcols[keep]
        q = len(self.xcols)
        if self.stat == "gram":
            sel = np.append(np.nonzero(keep)[0], len(keep))
            new = {"sum": dict(s, G=s["G"][:, sel][:, :, sel]), "cat": dict(res["cat"])}
            cat = new["cat"]
            if "pool_X" in cat:
                cat["pool_X"] = cat["pool_X"][:, :, keep]
            if "pool_fc" in cat:  # the cells in kept columns, renumbered
                inside = keep[cat["pool_fc"]]
                renum = (np.cumsum(keep) - 1).astype(np.int32)
                cat["pool_fr"], cat["pool_fv"] = cat["pool_fr"][inside], cat["pool_fv"][:, inside]
                cat["pool_fc"] = renum[cat["pool_fc"][inside]]
                if "pool_D" in cat:
                    cat["pool_D"] = cat["pool_D"][:, keep]
                else:
                    self._pool_D, self._pool_xcols = self._pool_D[:, keep], self.xcols.copy()
            return new, False
        self.beta = self.beta[:, keep]
        return res, True

    def _update(self, res: dict[str, Any], n: float, penalty: float, iteration: int,
                events: list[dict[str, Any]]) -> bool:
        s = res["sum"]
        if self.stat == "gram":
            self._fits = [linear.fit(s["G"][c], n, ridge=self.ridge, penalty=penalty)
                          for c in range(self.m)]
            if self.method == "pmm":
                cat = res["cat"]
                if "pool_D" in cat:
                    self._pool_D, self._pool_y = cat["pool_D"], cat["pool_y"]
                    self._pool_xcols = self.xcols.copy()
                self._donor = cat
            self.last_rounds = 1
            return True
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

    # -- pmm on all observed rows ---------------------------------------------------------
    def match_phases(self, order: dict[str, Any]) -> list[dict[str, Any]]:
        """The matching rounds of an exact pmm ``order``: the workers return the chains'
        predictions (:func:`dmice.block.pmm_candidates`), a few chains per round so that what
        the client gathers stays within ``match_bytes`` (dask config ``dmice.pmm.match-bytes``)."""
        self._matched, self._scarce = {}, []
        return [{"var": self.j, "phase": "pmm-match", "xcols": order["xcols"], "chains": ch,
                 "coef": order["coef"][ch], "beta": order["beta"][ch], "iteration": order["iteration"],
                 "values": self._obs_values is None}
                for ch in _pmm.chain_groups(self.m, self._n_fitting(), self.var.n_missing, self.match_bytes)]

    def take_match(self, phase: dict[str, Any], res: dict[str, Any]) -> None:
        """Match the missing cells of the chains of one matching round (``res``: its statistics)."""
        cat = res["cat"]
        it = int(phase["iteration"])
        no, nq = cat["pmm_no"].astype(np.int64), cat["pmm_nq"].astype(np.int64)
        qstart = np.concatenate([[0], np.cumsum(nq)])
        # each chain's order of the observed values is local to its partition
        ostart = np.repeat(np.concatenate([[0], np.cumsum(no)[:-1]]), no)
        if "pmm_oy" in cat:  # the observed values, in partition order: they never change
            self._obs_values = cat["pmm_oy"][0]
        yall = self._obs_values

        def one(i: int, c: int) -> tuple[list[np.ndarray], int]:
            s, order = _pmm.merge(cat["pmm_oyh"][i])
            ties = bool((s[1:] == s[:-1]).any())
            f = self._fits[c]
            sigma = float(np.sqrt(f.rss / f.df))
            vals, scarce = [], 0
            for p in range(len(nq)):
                t = cat["pmm_q"][i, qstart[p]:qstart[p + 1]]
                u = _pmm.cell_uniforms(self.seed, self.chain0 + c, it, self.j, p, len(t), self.stream)
                pos, k = _pmm.match(s, t, self.donors, u, sigma, ties)
                rows = order[pos]  # in the partitions' runs, then in each partition's values
                vals.append(yall[cat["pmm_oo"][i][rows] + ostart[rows]])
                scarce += k
            return vals, scarce

        chains = list(phase["chains"])
        # the workers wait for this: the chains are matched in two threads (numpy sorts,
        # searches and gathers without the interpreter lock; about 1.3 times faster at 70,000
        # observed rows); each chain's result is its own
        if len(chains) > 1 and int(no.sum()) >= 20_000:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as ex:
                got = list(ex.map(one, range(len(chains)), chains))
        else:
            got = [one(i, c) for i, c in enumerate(chains)]
        for c, (vals, scarce) in zip(chains, got):
            self._matched[c] = vals
            self._scarce.append(scarce)

    def _n_fitting(self) -> int:
        """The observed rows the model is fitted on (pmm's donors)."""
        return int(self._fits[0].n) if self._fits else self.var.n_observed

    def worker_match_bytes(self) -> int:
        """What matching on the client would gather per visit (all chains)."""
        return (12 * self.m + 8) * self._n_fitting() + 8 * self.m * self.var.n_missing

    def range_phase(self, order: dict[str, Any]) -> dict[str, Any]:
        """The round before matching among the workers: every chain's predictions computed and
        kept on the workers, which return quantiles of the observed ones."""
        self._scarce = []
        return {"var": self.j, "phase": "pmm-match", "on_workers": True, "xcols": order["xcols"],
                "chains": list(range(self.m)), "coef": order["coef"], "beta": order["beta"],
                "iteration": order["iteration"]}

    def range_spec(self, res: dict[str, Any], n_parts: int) -> dict[str, Any]:
        """What the workers match with (:func:`dmice.methods.pmm.match_range`): per chain, the
        boundaries of the ranges (one per partition, at most ``pmm.MAX_RANGES``) and the residual
        sd.  (The cells' uniforms were drawn where the cells live, by the round before.)"""
        cat = res["cat"]
        n_ranges = max(1, min(n_parts, _pmm.MAX_RANGES))
        counts = cat["pmm_no"].astype(np.float64)
        bounds = np.stack([_pmm.range_bounds(cat["pmm_quant"][:, c], counts, n_ranges) for c in range(self.m)])
        sigmas = [float(np.sqrt(f.rss / f.df)) for f in self._fits]
        return {"var": self.j, "bounds": bounds, "sigma": sigmas, "donors": self.donors, "n_ranges": n_ranges}

    def ranged_order(self, order: dict[str, Any], scarce: list[float], iteration: int,
                     events: list[dict[str, Any]]) -> dict[str, Any]:
        """``order`` for the imputation round after matching among the workers (the values wait
        on the workers), and donor scarcity logged the first time it is seen."""
        o = {k: v for k, v in order.items() if k not in ("match", "coef")}
        o["pmm_on_workers"] = True
        self._log_scarcity(self.var.n_missing, float(np.mean(scarce)) if scarce else 0.0, iteration, events)
        return o

    def matched_order(self, order: dict[str, Any], iteration: int, events: list[dict[str, Any]]
                      ) -> dict[str, Any]:
        """``order`` with the matched donor values of every partition's missing cells (``(m, cells)``
        per partition), and donor scarcity logged the first time it is seen."""
        parts = len(next(iter(self._matched.values())))
        values = {p: np.stack([self._matched[c][p] for c in range(self.m)]) for p in range(parts)}
        o = {k: v for k, v in order.items() if k not in ("match", "coef")}
        o["pmm_values"] = values
        n_mis = sum(v.shape[1] for v in values.values())
        self._log_scarcity(n_mis, float(np.mean(self._scarce)) if self._scarce else 0.0, iteration, events)
        self._matched, self._scarce = {}, []
        return o

    def _log_scarcity(self, n_mis: int, scarce: float, iteration: int, events: list[dict[str, Any]]) -> None:
        if n_mis and scarce / n_mis >= _pmm.SCARCE_SHARE and not self.scarcity_logged:
            self.scarcity_logged = True
            events.append({"iteration": iteration, "variable": self.var.name,
                           "event": f"donor scarcity: {int(round(scarce))} of {n_mis} missing cells "
                                    f"({100 * scarce / n_mis:.1f}%) have predictions where observed rows "
                                    f"are scarce (outside the observed rows' predictions, or their "
                                    f"{self.donors} nearest donors more than {_pmm.SCARCE_SD:g} residual "
                                    "sd away); pmm is biased there when a variable drives the "
                                    "missingness strongly (von Hippel 2025): consider method 'norm' "
                                    "for this column"})

    # -- drawing -----------------------------------------------------------------------
    def order(self, iteration: int) -> dict[str, Any]:
        """Parameters drawn for every chain, for the workers to impute with."""
        o: dict[str, Any] = {"var": self.j, "method": self.method, "xcols": self.xcols,
                             "iteration": iteration}
        if self.method == "sample":
            o["values"] = self.sample_pool
            return o
        gens = [_rng.generator(self.seed, _rng.CLIENT, self.chain0 + c, iteration, self.j, *self.stream)
                for c in range(self.m)]
        if self.stat == "gram":
            draws = [linear.draw(f, g) for f, g in zip(self._fits, gens)]
            o["beta"] = np.stack([d[0] for d in draws])
            o["sigma"] = np.array([d[1] for d in draws])
            if self.method == "pmm" and self.exact:  # the donors are found in matching rounds
                o["match"] = True
                o["coef"] = np.stack([f.coef for f in self._fits])
            elif self.method == "pmm":
                d = self._donor
                y = d["pool_y"] if "pool_X" in d else self._pool_y
                srts, dyh = [], []
                for c in range(self.m):
                    coef = self._fits[c].coef  # type-1 matching: donors from beta_hat
                    if "pool_X" in d:  # dense designs (formula models)
                        yh = d["pool_X"][c] @ coef
                    else:  # the fixed design, plus this chain's imputed cells
                        yh = self._pool_D @ coef
                        yh += np.bincount(d["pool_fr"], weights=d["pool_fv"][c] * coef[d["pool_fc"]],
                                          minlength=len(yh))
                    srt = np.argsort(yh)  # ties: any fixed order (deterministic on a machine)
                    dyh.append(yh[srt])
                    srts.append(srt)
                # the donors' values once and each chain's order of them, in the narrowest
                # integers that hold it: a pmm order crosses to every worker
                o["donor_yhat"], o["donor_values"], o["donors"] = dyh, y, self.donors
                o["donor_order"] = np.stack(srts).astype(np.uint16 if len(y) <= 1 << 16 else np.int32)
            return o
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
