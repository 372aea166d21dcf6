"""Stratified imputation (``by=``): one conditional model per level of a complete grouping variable.

A :class:`StratifiedModel` holds one conditional model (:mod:`dmice.models`) per
group and looks like a single model to the engine.  Its request carries each
group's request; the workers compute each group's statistics from the rows of
that group only (:func:`dmice.block.group_block`) and return them under keys
prefixed ``g<k>/``.  Its order carries each group's drawn parameters, which the
workers apply to the missing rows of that group.  Groups fit, screen their
predictors and draw independently (their random streams are keyed by the group).

Pure numpy, no dask.
"""

from __future__ import annotations

from typing import Any

from dmice.errors import InputError
from dmice.models.base import BaseModel


class StratifiedModel:
    """The conditional model of one incomplete variable, fitted separately within each group."""

    def __init__(self, models: dict[int, BaseModel], by_name: str, levels: list[Any]):
        first = next(iter(models.values()))
        self.models = models
        self.j = first.j
        self.var = first.var
        self.method = first.method
        self.by_name = by_name
        self.levels = levels
        self._done: set[int] = set()

    def get_state(self) -> dict[str, Any]:
        return {"groups": {str(g): m.get_state() for g, m in self.models.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        for g, m in self.models.items():
            if str(g) in state.get("groups", {}):
                m.set_state(state["groups"][str(g)])

    @property
    def stat(self) -> str | None:
        return next(iter(self.models.values())).stat

    @property
    def last_rounds(self) -> int:
        return max(m.last_rounds for m in self.models.values())

    def request(self) -> dict[str, Any] | None:
        if self.stat is None:
            return None
        reqs = {g: m.request() for g, m in self.models.items() if g not in self._done}
        return {"var": self.j, "stat": self.stat, "groups": reqs}

    def update(self, res: dict[str, Any], iteration: int, events: list[dict[str, Any]]) -> bool:
        """Update every group still fitting; True once all groups are ready to draw."""
        for g, model in self.models.items():
            if g in self._done:
                continue
            pre = f"g{g}/"
            sub = {part: {k[len(pre):]: a for k, a in res[part].items() if k.startswith(pre)}
                   for part in ("sum", "cat")}
            if float(sub["sum"]["n"]) == 0:
                raise InputError(f"column {self.var.name!r} has no observed (fitting) rows where "
                                 f"by column {self.by_name!r} is at its level number {g + 1}; "
                                 "it cannot be imputed within that group")
            if model.update(sub, iteration, events):
                self._done.add(g)
        if len(self._done) == len(self.models):
            self._done = set()
            return True
        return False

    def order(self, iteration: int) -> dict[str, Any]:
        o = {"var": self.j, "method": self.method, "iteration": iteration,
             "groups": {g: m.order(iteration) for g, m in self.models.items()}}
        if any(go.get("match") for go in o["groups"].values()):  # pmm on all the group's rows
            o["match"] = True
        return o

    # -- pmm on all observed rows of each group: every group's matching in the same rounds ------
    def match_phases(self, order: dict[str, Any]) -> list[dict[str, Any]]:
        per = {g: self.models[g].match_phases(o) for g, o in order["groups"].items() if o.get("match")}
        n = max((len(p) for p in per.values()), default=0)
        return [{"var": self.j, "phase": "pmm-match", "groups": {g: p[k] for g, p in per.items() if k < len(p)}}
                for k in range(n)]

    def take_match(self, phase: dict[str, Any], res: dict[str, Any]) -> None:
        for g, ph in phase["groups"].items():
            pre = f"g{g}/"
            sub = {part: {k[len(pre):]: a for k, a in res[part].items() if k.startswith(pre)}
                   for part in ("sum", "cat")}
            self.models[g].take_match(ph, sub)

    def matched_order(self, order: dict[str, Any], iteration: int, events: list[dict[str, Any]]
                      ) -> dict[str, Any]:
        groups = {g: (self.models[g].matched_order(o, iteration, events) if o.get("match") else o)
                  for g, o in order["groups"].items()}
        return {**{k: v for k, v in order.items() if k != "match"}, "groups": groups}
