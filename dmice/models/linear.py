"""Linear models: ``norm`` (Bayesian linear regression) and ``pmm`` (predictive mean matching).

The workers compute each chain's Gram matrix ``[X y]'[X y]`` of the fitting rows; the client
fits and draws ``beta*`` and ``sigma*`` (:mod:`dmice.methods.linear`).  ``norm`` imputes
``x beta* + sigma* e``; ``pmm`` takes an observed value of one of the ``donors`` rows whose
predictions from ``beta_hat`` are nearest to the missing cell's from ``beta*`` (type-1
matching): among all observed rows (matching rounds, :mod:`dmice.methods.pmm`) or, with
``donor_pool``, among a fixed sample of them.

Pure numpy; nothing here touches dask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dmice.methods import linear
from dmice.methods import pmm as _pmm
from dmice.models.base import BaseModel


class LinearModel(BaseModel):
    """``norm`` or ``pmm`` for one incomplete variable, all chains.

    Options: ``donors`` (pmm's d), ``exact`` (match on all observed rows; else on the donor
    sample the workers send), ``match_bytes`` (most bytes gathered per matching round).
    """

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.donors = int(kw.get("donors", 5))
        self.exact = bool(kw.get("exact", False))
        self.match_bytes = int(kw.get("match_bytes", 256 * 2**20))  # exact pmm: most bytes per matching round
        self._obs_values: np.ndarray | None = None  # exact pmm: the observed values, once gathered
        self._donor: dict[str, np.ndarray] | None = None  # pmm: the donor rows' cells of this visit
        self._pool_D: np.ndarray | None = None  # pmm: the donor rows' fixed design (no imputed cells)
        self._pool_y: np.ndarray | None = None  # ... their observed values
        self._pool_xcols: np.ndarray | None = None  # ... and the predictors of its columns
        self._matched: dict[int, list[np.ndarray]] = {}  # exact pmm: each chain's values per partition
        self._scarce: list[int] = []  # exact pmm: missing cells with scarce donors, per chain
        self.scarcity_logged = False

    @property
    def stat(self) -> str | None:
        return "gram"

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "scarcity_logged": self.scarcity_logged}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.scarcity_logged = bool(state.get("scarcity_logged", False))

    def request(self) -> dict[str, Any] | None:
        req = super().request()
        if self.method == "pmm" and not self.exact:  # the donors' fixed design only when not kept yet
            kept = self._pool_D is not None and np.array_equal(self._pool_xcols, self.xcols)
            req["pool"] = "cells" if kept else "base"
        return req

    # -- fitting ----------------------------------------------------------------------------
    def _screen_matrices(self, s: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray | None]] | None:
        q = len(self.xcols)
        return [(G[:q, :q], G[:, q]) for G in s["G"]]

    def _screened(self, res: dict[str, Any], keep: np.ndarray) -> tuple[dict[str, Any], bool]:
        s = res["sum"]
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

    def _update(self, res: dict[str, Any], n: float, penalty: float, iteration: int,
                events: list[dict[str, Any]]) -> bool:
        s = res["sum"]
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

    # -- drawing ----------------------------------------------------------------------------
    def order(self, iteration: int) -> dict[str, Any]:
        o = super().order(iteration)
        gens = self._generators(iteration)
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
