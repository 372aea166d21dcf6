"""Conditional models, one class per family, behind one small protocol.

In every visit the engine asks a variable's model for a *request* (which sufficient
statistics the workers compute), hands back the reduced statistics with ``update``
(repeating while a Newton fit has not converged) and finally asks for an *order*: the
parameters drawn for every chain, which the workers impute with.  ``get_state`` and
``set_state`` carry what a continued run needs.  pmm on all observed rows adds matching
rounds between update and order (:class:`~dmice.models.linear.LinearModel`).

Families (:func:`make_model` picks one by method):

* :class:`~dmice.models.linear.LinearModel`: ``norm``, ``pmm``;
* :class:`~dmice.models.glm.NewtonModel`: ``logreg``, ``logreg.firth``, ``polyreg``, ``polr``,
  ``poisson`` (a separated ``logreg`` continues as ``logreg.firth``, an unfittable ``polr``
  as ``polyreg``, within the family);
* :class:`~dmice.models.sample.SampleModel`: ``sample``;
* :class:`~dmice.models.smcfcs.SmcfcsModel`: SMC-FCS covariates (made by the session, which
  knows the substantive model);
* :class:`~dmice.models.stratified.StratifiedModel`: any of these fitted within each level of
  a ``by=`` variable.

The math the families use (linear and Newton fits and draws, matching) is in
:mod:`dmice.methods`.  Pure numpy; nothing here touches dask.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from dmice.models.base import FALLBACK_PENALTY, NEWTON_ACCURACY, BaseModel
from dmice.models.glm import NEWTON_STATS, SEPARATION, NewtonModel
from dmice.models.linear import LinearModel
from dmice.models.sample import SampleModel
from dmice.schema import Variable

__all__ = ["FALLBACK_PENALTY", "NEWTON_ACCURACY", "NEWTON_STATS", "SEPARATION", "BaseModel", "ConditionalModel",
           "LinearModel", "NewtonModel", "SampleModel", "FAMILIES", "make_model"]


class ConditionalModel(Protocol):
    """What the engine asks of every model."""

    j: int
    var: Variable
    method: str
    last_rounds: int

    @property
    def stat(self) -> str | None: ...

    def request(self) -> dict[str, Any] | None: ...

    def update(self, res: dict[str, Any], iteration: int, events: list[dict[str, Any]]) -> bool: ...

    def order(self, iteration: int) -> dict[str, Any]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


#: the family of each method a model is made for by :func:`make_model`
FAMILIES: dict[str, type[BaseModel]] = {
    "norm": LinearModel, "pmm": LinearModel, "sample": SampleModel,
    **{method: NewtonModel for method in NEWTON_STATS},
}


def make_model(j: int, var: Variable, xcols: np.ndarray, **kw: Any) -> BaseModel:
    """The model of variable ``j`` for its method ``var.method`` (see :data:`FAMILIES`); ``kw``
    as :class:`~dmice.models.base.BaseModel` takes them."""
    try:
        family = FAMILIES[var.method]
    except KeyError:
        raise ValueError(f"no model family for method {var.method!r} of column {var.name!r}") from None
    return family(j, var, xcols, **kw)
