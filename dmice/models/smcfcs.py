"""The client side of SMC-FCS (see :mod:`dmice.methods.smcfcs`): the covariate model and the
substantive model fitted from the workers' statistics, and their draws.

Pure numpy; nothing here touches dask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmice.glm import newton
from dmice.methods import linear
from dmice.methods.smcfcs import Substantive
from dmice.models.base import BaseModel


class SmcfcsModel(BaseModel):
    """The SMC-FCS model of one continuous covariate (see the module docstring)."""

    def __init__(self, *args: Any, substantive: Substantive, n_sub: int, **kw: Any):
        super().__init__(*args, **kw)
        self.method = "smcfcs"
        self.sub = substantive
        self.n_sub = n_sub  # columns of the substantive design
        self.sub_beta: np.ndarray | None = None
        self._sub_fits: list[Any] = []

    @property
    def stat(self) -> str | None:
        return "smcfcs"

    def request(self) -> dict[str, Any] | None:
        req: dict[str, Any] = {"var": self.j, "stat": "smcfcs", "xcols": self.xcols}
        if self.sub.family == "binomial":
            if self.sub_beta is None:
                self.sub_beta = np.zeros((self.m, self.n_sub))
            req["sub_beta"] = self.sub_beta
        return req

    def get_state(self) -> dict[str, Any]:
        return {"beta": None if self.sub_beta is None else self.sub_beta.copy()}

    def set_state(self, state: dict[str, Any]) -> None:
        beta = state.get("beta")
        self.sub_beta = None if beta is None else np.asarray(beta, dtype=float).copy()

    def _update(self, res: dict[str, Any], n: float, penalty: float, iteration: int,
                events: list[dict[str, Any]]) -> bool:
        s = res["sum"]
        self._fits = [linear.fit(s["G"][c], n, ridge=self.ridge, penalty=penalty) for c in range(self.m)]
        if self.sub.family == "gaussian":
            self._sub_fits = [linear.fit(s["Gs"][c], n, ridge=self.ridge) for c in range(self.m)]
            self.last_rounds = 1
            return True
        steps = [newton.step(self.sub_beta[c], s["gs"][c], s["Hs"][c]) for c in range(self.m)]
        self.sub_beta = np.stack([st.beta for st in steps])
        self._sub_fits = steps
        self._rounds += 1
        worst = max(st.step_se for st in steps)
        if worst <= self.newton_accuracy or self._rounds >= self.max_newton:
            if worst > self.newton_accuracy:
                events.append({"iteration": iteration, "variable": self.var.name,
                               "event": f"substantive model fit did not converge in {self._rounds} "
                                        "Newton steps (possible separation)"})
            self.last_rounds = self._rounds
            self._rounds = 0
            return True
        return False

    def order(self, iteration: int) -> dict[str, Any]:
        gens = self._generators(iteration)
        draws = [linear.draw(f, g) for f, g in zip(self._fits, gens)]
        o: dict[str, Any] = {"var": self.j, "method": "smcfcs", "xcols": self.xcols, "iteration": iteration,
                             "beta": np.stack([d[0] for d in draws]),
                             "sigma": np.array([d[1] for d in draws])}
        if self.sub.family == "gaussian":
            sd = [linear.draw(f, g) for f, g in zip(self._sub_fits, gens)]
            o["sub_beta"] = np.stack([d[0] for d in sd])
            o["sub_sigma"] = np.array([d[1] for d in sd])
        else:
            o["sub_beta"] = np.stack([newton.draw(f.beta, f.cov, g) for f, g in zip(self._sub_fits, gens)])
        return o
