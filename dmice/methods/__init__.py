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
from dmice.methods import linear, newton
from dmice.schema import Variable

#: penalty added to the coefficients when a model has too few observations
FALLBACK_PENALTY = 1.0
#: a Newton fit is accepted once its remaining error is predicted below this many standard errors
NEWTON_ACCURACY = 0.05


class TargetModel:
    """The conditional model of one incomplete variable, for all chains."""

    def __init__(self, j: int, var: Variable, xcols: np.ndarray, *, m: int, seed: int,
                 donors: int = 5, ridge: float = 1e-5, newton_tol: float = 0.2,
                 newton_accuracy: float = NEWTON_ACCURACY,
                 max_newton: int = 25, sample_pool: np.ndarray | None = None, chain0: int = 0,
                 labels: list[str] | None = None, screen: bool = True, stream: tuple[int, ...] = ()):
        self.j = j
        self.var = var
        self.method = var.method
        self.xcols = np.asarray(xcols, dtype=np.int64)
        self.m = m
        self.seed = seed
        self.donors = donors
        self.ridge = ridge
        self.newton_tol = newton_tol
        self.newton_accuracy = newton_accuracy
        self.max_newton = max_newton
        self.sample_pool = sample_pool
        self.chain0 = chain0  # number of the first chain: draws are keyed by chain number
        q = len(self.xcols)
        self.n_params = q * (var.n_levels - 1) if self.method == "polyreg" else q
        self.beta: np.ndarray | None = None  # current estimates (Newton methods), kept across visits
        self._fits: list[Any] = []
        self._donor: tuple[np.ndarray, np.ndarray] | None = None
        self._rounds = 0
        self.last_rounds = 0
        self._last_step = np.inf
        self._curvature = 0.0  # largest observed Newton contraction constant M
        self.labels = labels  # names of the encoded design columns, for logged events
        self.screen = screen  # drop constant and collinear predictors before each fit
        self.stream = tuple(stream)  # extra key of the client-side random streams (by= groups)
        self.dropped: list[str] = []  # labels of the predictors dropped so far

    # -- state kept across visits -------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Warm start of the Newton fits (what a continued run needs from this model)."""
        return {"beta": None if self.beta is None else self.beta.copy(), "curvature": self._curvature,
                "xcols": self.xcols.copy(), "dropped": list(self.dropped)}

    def set_state(self, state: dict[str, Any]) -> None:
        beta = state.get("beta")
        self.beta = None if beta is None else np.asarray(beta, dtype=float).copy()
        self._curvature = float(state.get("curvature", 0.0))
        if state.get("xcols") is not None:  # predictors dropped by the screening stay dropped
            self.xcols = np.asarray(state["xcols"], dtype=np.int64)
            q = len(self.xcols)
            self.n_params = q * (self.var.n_levels - 1) if self.method == "polyreg" else q
        self.dropped = list(state.get("dropped", []))

    # -- what the workers compute -------------------------------------------------
    @property
    def stat(self) -> str | None:
        return {"norm": "gram", "pmm": "gram", "logreg": "logistic",
                "polyreg": "multinomial"}.get(self.method)

    def request(self) -> dict[str, Any] | None:
        if self.stat is None:
            return None
        req: dict[str, Any] = {"var": self.j, "stat": self.stat, "xcols": self.xcols}
        if self.method == "pmm":
            req["pool"] = True
        if self.stat in ("logistic", "multinomial"):
            req["beta"] = self._current_beta()
        return req

    def _current_beta(self) -> np.ndarray:
        if self.beta is None:
            q = len(self.xcols)
            if self.method == "polyreg":
                self.beta = np.zeros((self.m, q, self.var.n_levels - 1))
            else:
                self.beta = np.zeros((self.m, q))
        return self.beta

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
        penalty = self._penalty(n)
        if penalty and self._rounds == 0:
            events.append({"iteration": iteration, "variable": self.var.name,
                           "event": f"ridge fallback: {int(n)} observed rows for "
                                    f"{self.n_params} parameters"})
        try:
            return self._update(res, n, penalty, iteration, events)
        except np.linalg.LinAlgError:
            if penalty:
                raise
            events.append({"iteration": iteration, "variable": self.var.name,
                           "event": "ridge fallback: singular information matrix (constant or "
                                    "collinear predictors)"})
            return self._update(res, n, FALLBACK_PENALTY, iteration, events)

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
        self.n_params = q * (self.var.n_levels - 1) if self.method == "polyreg" else q
        if self.stat == "gram":
            sel = np.append(np.nonzero(keep)[0], len(keep))
            new = {"sum": dict(s, G=s["G"][:, sel][:, :, sel]), "cat": dict(res["cat"])}
            if "pool_X" in new["cat"]:
                new["cat"]["pool_X"] = new["cat"]["pool_X"][:, :, keep]
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
                X, y = res["cat"]["pool_X"], res["cat"]["pool_y"]
                self._donor = (X, y)
            self.last_rounds = 1
            return True
        beta = self._current_beta()
        q = len(self.xcols)
        shape = beta.shape[1:]
        km1 = 1 if self.method == "logreg" else shape[1]
        intercepts = np.arange(km1) * q  # column 0 of X in each level block
        P = newton.penalty_matrix(self.n_params, penalty, intercepts) if penalty else None
        worst = 0.0
        fits = []
        for c in range(self.m):
            b = beta[c].T.reshape(-1) if self.method == "polyreg" else beta[c]
            st = newton.step(b, s["g"][c], s["H"][c], P)
            fits.append(st)
            worst = max(worst, st.step_se)
        new = np.stack([f.beta for f in fits])
        if self.method == "polyreg":
            new = new.reshape(self.m, km1, q).transpose(0, 2, 1)
        self.beta = new
        self._fits = fits
        self._rounds += 1
        # Newton converges quadratically: e_next ~ M e^2 (in standard errors).  M is measured on
        # consecutive steps of the same fit; once known, a step d leaves an error of about M d^2.
        prev, self._last_step = self._last_step, worst
        if self._rounds > 1 and 0.05 <= prev <= 2.0:
            self._curvature = max(self._curvature, worst / prev**2)
        predicted = self._curvature * worst**2 if self._curvature > 0 else np.inf
        done = worst <= self.newton_tol or (worst <= 3.0 and predicted <= self.newton_accuracy)
        if done or self._rounds >= self.max_newton:
            if not done:
                events.append({"iteration": iteration, "variable": self.var.name,
                               "event": f"Newton fit did not converge in {self._rounds} steps "
                                        "(possible separation)"})
            self.last_rounds = self._rounds
            self._rounds = 0
            self._last_step = np.inf
            return True
        return False

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
            if self.method == "pmm":
                X, y = self._donor
                dy, dyh = [], []
                for c in range(self.m):
                    yh = X[c] @ self._fits[c].coef  # type-1 matching: donors from beta_hat
                    srt = np.argsort(yh, kind="stable")
                    dyh.append(yh[srt])
                    dy.append(y[srt])
                o["donor_yhat"], o["donor_y"], o["donors"] = dyh, dy, self.donors
            return o
        draws = [newton.draw(f.beta, f.cov, g) for f, g in zip(self._fits, gens)]
        beta = np.stack(draws)
        if self.method == "polyreg":
            q = len(self.xcols)
            beta = beta.reshape(self.m, -1, q).transpose(0, 2, 1)
        o["beta"] = beta
        return o
