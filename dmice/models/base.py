"""What every conditional model shares: identity, predictors, screening, the update loop, state.

A model family (:mod:`dmice.models.linear`, :mod:`dmice.models.glm`, :mod:`dmice.models.sample`,
:mod:`dmice.models.smcfcs`) subclasses :class:`BaseModel` and supplies its statistic
(:attr:`BaseModel.stat`), its request, its fit (``_update``) and its draws (``order``).

Pure numpy; nothing here touches dask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmice import rng as _rng
from dmice.schema import Variable

#: penalty added to the coefficients when a model has too few observations
FALLBACK_PENALTY = 1.0
#: a Newton fit is accepted once its remaining error is predicted below this many standard errors
NEWTON_ACCURACY = 0.05
#: options of one family that :func:`dmice.models.make_model` passes to every family
OPTIONS = frozenset({"donors", "exact", "match_bytes", "separation", "shrinkage", "min_level_count"})


class BaseModel:
    """The conditional model of one incomplete variable ``j`` (``var``), for all ``m`` chains,
    on the encoded predictor columns ``xcols``.

    Parameters common to the families: ``seed`` and ``chain0`` (the number of the first chain)
    key the client-side random streams, with ``stream`` after them (``by=`` groups); ``ridge``
    is added to the Gram matrix of linear fits; ``newton_tol``, ``newton_accuracy`` and
    ``max_newton`` govern Newton fits; ``sample_pool`` holds observed values (initial fill,
    ``sample``); ``labels`` name the encoded columns in logged events; ``screen`` drops constant
    and collinear predictors before each fit.  ``options`` are the families' own (see
    :data:`OPTIONS`); a family ignores those of the others.
    """

    def __init__(self, j: int, var: Variable, xcols: np.ndarray, *, m: int, seed: int,
                 ridge: float = 1e-5, newton_tol: float = 0.2, newton_accuracy: float = NEWTON_ACCURACY,
                 max_newton: int = 25, sample_pool: np.ndarray | None = None, chain0: int = 0,
                 labels: list[str] | None = None, screen: bool = True, stream: tuple[int, ...] = (),
                 **options: Any):
        unknown = set(options) - OPTIONS
        if unknown:
            raise TypeError(f"unknown model options {sorted(unknown)}")
        self.j = j
        self.var = var
        self.method = var.method
        self.xcols = np.asarray(xcols, dtype=np.int64)
        self.m = m
        self.seed = seed
        self.ridge = ridge
        self.newton_tol = newton_tol
        self.newton_accuracy = newton_accuracy
        self.max_newton = max_newton
        self.sample_pool = sample_pool
        self.chain0 = chain0  # number of the first chain: draws are keyed by chain number
        self.labels = labels  # names of the encoded design columns, for logged events
        self.screen = screen  # drop constant and collinear predictors before each fit
        self.stream = tuple(stream)  # extra key of the client-side random streams (by= groups)
        self.dropped: list[str] = []  # labels of the predictors dropped so far
        self._fits: list[Any] = []
        self._rounds = 0
        self.last_rounds = 0
        self._sep_penalty = 0.0  # penalty every fit gets (a Newton fit after separation)

    # -- what the workers compute ---------------------------------------------------------
    @property
    def stat(self) -> str | None:
        """The statistics the workers compute for this model (None: none)."""
        return None

    @property
    def n_params(self) -> int:
        return len(self.xcols)

    def request(self) -> dict[str, Any] | None:
        """What the workers compute in the next round (None: nothing)."""
        if self.stat is None:
            return None
        return {"var": self.j, "stat": self.stat, "xcols": self.xcols}

    # -- state kept across visits -----------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """What a continued run needs from this model (the Newton families add their warm start)."""
        return {"beta": None, "curvature": 0.0, "xcols": self.xcols.copy(), "dropped": list(self.dropped),
                "method": self.method, "separated": False, "sep_penalty": 0.0, "prior_var": None,
                "inv_info": None}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("xcols") is not None:  # predictors dropped by the screening stay dropped
            self.xcols = np.asarray(state["xcols"], dtype=np.int64)
        self.dropped = list(state.get("dropped", []))
        if state.get("method"):  # a separated logreg continues as logreg.firth, a failed polr as polyreg
            self.method = self.var.method = state["method"]

    # -- fitting ------------------------------------------------------------------------------
    def _penalty(self, n: float) -> float:
        return FALLBACK_PENALTY if n <= self.n_params else 0.0

    def update(self, res: dict[str, Any], iteration: int, events: list[dict[str, Any]]) -> bool:
        """Consume reduced statistics; return True once the model is ready to draw."""
        if self.screen and self._rounds == 0:
            res, stale = self._screen(res, iteration, events)
            if stale:
                return False
        n = float(res["sum"]["n"])
        if self._starting(res["sum"]):
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
            if not self._unfittable(iteration, events):
                raise
            return False

    def _starting(self, s: dict[str, Any]) -> bool:
        """Whether the statistics ``s`` only supplied starting values (and a fit needs another round)."""
        return False

    def _unfittable(self, iteration: int, events: list[dict[str, Any]]) -> bool:
        """A fit singular even with the ridge penalty: True when the family falls back to another
        model (refitted from the next round), False to raise."""
        return False

    def _update(self, res: dict[str, Any], n: float, penalty: float, iteration: int,
                events: list[dict[str, Any]]) -> bool:
        raise NotImplementedError(f"{type(self).__name__} fits nothing")

    # -- screening the predictors -------------------------------------------------------------
    def _screen_matrices(self, s: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray | None]] | None:
        """Per chain, the ``X'X``-like matrix (and ``X'y``) the screening rules read, or None
        when this round's statistics are not screened."""
        return None

    def _screened(self, res: dict[str, Any], keep: np.ndarray) -> tuple[dict[str, Any], bool]:
        """The statistics restricted to the predictors ``keep`` (self.xcols already is), and
        whether they must be recomputed instead."""
        return res, True

    def _screen(self, res: dict[str, Any], iteration: int, events: list[dict[str, Any]]
                ) -> tuple[dict[str, Any], bool]:
        """Drop constant and (near-)collinear predictors (mice's ``remove.lindep``) before a fit.

        Linear models are screened before every fit on ``X'X`` (and ``X'y`` for the
        ``maxcor`` rule), Newton models before their cold start, where the leading block
        of the Hessian is ``X'X`` times a constant.  Drops are permanent and logged.
        Returns the statistics restricted to the kept predictors and whether they must
        be recomputed (Newton statistics depend on the design).
        """
        from dmice import predictors as _pred

        q = len(self.xcols)
        if not q or self.xcols[0] != 0:  # the rules need the intercept in column 0
            return res, False
        mats = self._screen_matrices(res["sum"])
        if mats is None:
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
        return self._screened(res, keep)

    # -- drawing ------------------------------------------------------------------------------
    def _generators(self, iteration: int) -> list[np.random.Generator]:
        """Each chain's client-side random stream for this visit."""
        return [_rng.generator(self.seed, _rng.CLIENT, self.chain0 + c, iteration, self.j, *self.stream)
                for c in range(self.m)]

    def order(self, iteration: int) -> dict[str, Any]:
        """Parameters drawn for every chain, for the workers to impute with."""
        return {"var": self.j, "method": self.method, "xcols": self.xcols, "iteration": iteration}
