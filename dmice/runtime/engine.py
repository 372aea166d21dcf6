"""The chained-equations loop on the cluster.

Data flow of a run (the passes of steps 1-3 are in :mod:`dmice.runtime.passes`):

1. one pass of per-partition summaries infers the schema (kinds, levels, moments);
2. each partition is encoded once into a :class:`dmice.block.Block`, held on the workers;
3. the missing cells of every chain get random observed values;
4. the loop visits each incomplete variable in turn.  One visit is one round,
   one call per worker that works on every partition it holds (in its own thread
   pool) and covers all m chains: impute the current variable with the parameters
   drawn on the client, then compute the sufficient statistics of the next
   variable's model; the client sums the statistics in partition order (so sums
   never depend on which worker finished first).  Newton fits that have not
   converged from their warm start take extra statistics-only rounds; before the
   first iteration all Newton models are cold-fitted together.

While the loop runs, each partition's block stays in the memory of the worker that
encoded it (a registry on the worker, :data:`_RESIDENT`), and a round is one direct
call per worker instead of two scheduled tasks per partition, which keeps a round's
latency at one message exchange.  Between runs the blocks
are ordinary futures again (:attr:`Engine.blocks`).

Lost workers.  The loop keeps a snapshot of the chains: the imputed cells of every
partition (task results kept by its worker, and a copy kept by a second worker) and the
client's side (model warm starts, chain statistics, events), taken at the start and then
every few iterations, as often as their measured cost allows (:data:`SNAPSHOT_SHARE`).
When a worker holding partitions leaves, every partition is rebuilt from its encoded
block (a future with the input's lineage: dask recomputes it from the input when it was
on the lost worker) and the snapshot's cells, and the loop replays from the snapshot's
iteration.  Every draw is keyed by its iteration, so the chains end exactly as an
undisturbed run's.  The recovery is logged as an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from dask.sizeof import sizeof
from distributed import Client, Future, wait

from dmice import block as _block
from dmice.models import NEWTON_STATS, ConditionalModel
from dmice.schema import Schema

log = logging.getLogger("dmice")

#: snapshots of the chains take at most about this share of the loop's time (their
#: interval, in iterations, follows the measured cost of the last one)
SNAPSHOT_SHARE = 0.05
#: the most iterations between two snapshots (what a lost worker may cost to replay)
SNAPSHOT_MAX_EVERY = 10
#: recoveries from lost workers in one run, at most
MAX_RECOVERIES = 5
#: seconds a recovery waits for a worker to join when none is left
WORKER_WAIT = 60.0
#: seconds a failed call waits for the scheduler to confirm a lost worker
LOSS_WAIT = 5.0


class ChainsLost(RuntimeError):
    """A worker holding partitions of the chains left the cluster."""


class Engine:
    """Runs the chained loop for one imputation object on a distributed client."""

    def __init__(self, client: Client, plan: _block.Plan, blocks: list[Future],
                 models: dict[int, ConditionalModel], schema: Schema, origin: list[Future] | None = None):
        self.client = client
        self.plan = plan
        self._blocks = list(blocks)
        # the encoded blocks, futures with the input's lineage: what lost partitions are rebuilt from
        self._origin = list(origin) if origin is not None else None
        self._snap: dict[str, Any] | None = None  # the last snapshot of the chains (see the module notes)
        self.snapshot_every = 1  # iterations between snapshots, from their measured cost
        self.recoveries: list[dict[str, Any]] = []  # the lost workers recovered from: when, what, how long
        self.snapshots: list[dict[str, Any]] = []  # the snapshots taken: iteration, seconds
        self._events: list[dict[str, Any]] | None = None  # the events of the running loop
        self._key: str | None = None  # registry key while the blocks live on the workers
        self._where: dict[int, str] = {}  # partition -> address of the worker holding it
        self._fresh = True  # self._blocks are the blocks of the registry
        self._done = 0  # rounds of this residency whose statistics the client has taken in
        self.models = models
        self.schema = schema
        self.iteration = 0
        self.chain_stats: list[dict[str, Any]] = []
        self.rounds = 0
        self.bytes_gathered = 0  # what crossed to the client: statistics and donor samples only

    # -- the blocks: futures at rest, worker-resident while the loop runs ---------------
    @property
    def blocks(self) -> list[Future]:
        """One future per partition holding its current :class:`dmice.block.Block`."""
        if self._key is not None and not self._fresh:
            if self._gone():
                raise self._lost(KeyError("worker"))
            self._blocks = [self.client.submit(_snapshot, self._key, i, self._done,
                                               workers=[self._where[i]], pure=False)
                            for i in range(len(self._where))]
            self._fresh = True
        if self._blocks is None:
            raise RuntimeError("the imputation chains were lost with a worker and could not be rebuilt; "
                               "run the imputation again")
        return self._blocks

    @property
    def origin(self) -> list[Future] | None:
        """The encoded blocks lost partitions are rebuilt from (None: none kept)."""
        return self._origin

    @blocks.setter
    def blocks(self, value: list[Future]) -> None:
        self._release(keep=False)
        self._blocks = list(value)
        self._snap = None  # of other chains
        if not self._blocks:
            self._origin = None

    def _reside(self) -> None:
        """Move every block into the registry of the worker holding it."""
        if self._key is not None:
            return
        key = f"dmice-{uuid.uuid4().hex}"
        who = self.client.who_has(self._blocks)
        futs = []
        for i, b in enumerate(self._blocks):
            at = list(who.get(b.key, ()))[:1]  # where the block is; anywhere if that worker left
            futs.append(self.client.submit(_adopt, b, key, i, self.plan, pure=False,
                                           **({"workers": at, "allow_other_workers": True} if at else {})))
        addresses = self.client.gather(futs)
        self._where = dict(enumerate(addresses))
        self._key = key
        self._fresh = True
        self._done = 0

    def _release(self, keep: bool = True) -> None:
        """End residency: the blocks become futures again (``keep``) and the registry is emptied."""
        if self._key is None:
            return
        try:
            if keep:
                try:
                    self._wait(self._at_rest())
                except ChainsLost:
                    self._blocks = None  # type: ignore[assignment]
                    raise
        finally:
            key, self._key = self._key, None
            if not self._fresh:  # the chains of the registry are given up
                self._blocks = None  # type: ignore[assignment]
            try:
                self.client.run(_drop, key, workers=sorted(set(self._where.values())))
            except Exception as e:  # noqa: BLE001 - a lost worker has nothing left to drop
                log.debug("could not empty the block registry: %s", type(e).__name__)

    def _at_rest(self) -> list[Future]:
        """The blocks as futures that outlive the registry, and a worker lost later: each
        partition's encoded block with a snapshot of its current cells (dask recomputes a lost
        one from the input and the snapshot's other copy)."""
        if self._fresh or self._origin is None:
            return self.blocks
        if self._snap is None or self._snap.get("round") != (self._key, self._done):
            self._take_snapshot(self._events if self._events is not None else [])
        if self._snap is None:  # none taken
            return self.blocks
        self._blocks = [self.client.submit(_block.restore_cells, o, own, self.plan, copy, pure=False)
                        for o, (own, _, copy, _) in zip(self._origin, self._snap["cells"])]
        self._fresh = True
        return self._blocks

    def _gone(self) -> list[int]:
        """The partitions whose worker is no longer in the cluster."""
        alive = set(self._alive())
        return sorted(i for i, a in self._where.items() if a not in alive)

    def _wait(self, futures: list[Future]) -> None:
        """Wait for tasks pinned to the workers of the partitions.  A task pinned to a worker that
        left would wait for ever: a lost worker ends the wait (:class:`ChainsLost`).  A worker
        paused by dask (its memory above ``distributed.worker.memory.pause``) runs no task: the
        wait ends with an error naming it once it has been paused for dask config
        ``dmice.faults.paused-wait`` seconds."""
        from dmice import config

        limit = config.get("faults.paused-wait")
        paused_since: dict[str, float] = {}
        while True:
            try:
                wait(futures, timeout=1.0)
                return
            except TimeoutError:
                pass
            if self._gone():
                for f in futures:
                    f.cancel()
                raise self._lost(TimeoutError("pinned task")) from None
            info = self.client.scheduler_info().get("workers", {})
            now = time.perf_counter()
            mine = set(self._where.values())
            paused = {a for a in mine if str(info.get(a, {}).get("status", "")).endswith("paused")}
            paused_since = {a: paused_since.get(a, now) for a in paused}
            late = sorted(a for a, t in paused_since.items() if now - t >= limit)
            if late:
                for f in futures:
                    f.cancel()
                parts = sorted(i for i, a in self._where.items() if a in late)
                raise RuntimeError(
                    f"the worker holding partitions {parts} of the imputation chains has been paused by "
                    f"dask for {limit:g} s: its memory is above distributed.worker.memory.pause. Give "
                    "the workers more memory (memory_limit), use more workers or partitions, or wait "
                    "longer (dask config dmice.faults.paused-wait)")

    def _was_lost(self) -> bool:
        """After a failed call: whether a worker holding partitions left (the scheduler may hear
        of it a moment after the caller does, so it is asked for up to :data:`LOSS_WAIT` s)."""
        deadline = time.perf_counter() + LOSS_WAIT
        while not self._gone():
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _lost(self, err: BaseException) -> ChainsLost:
        gone = self._gone()
        what = f"partitions {gone}" if gone else "some partitions"
        e = ChainsLost(f"the worker holding {what} of the imputation chains was lost at iteration "
                       f"{self.iteration + 1} ({type(err).__name__}); the chains cannot continue. "
                       "Run again; with checkpoint= a run resumes from its last checkpoint")
        e.partitions = gone  # type: ignore[attr-defined]
        return e

    # -- snapshots and lost workers (see the module notes) ------------------------------------
    def _alive(self) -> list[str]:
        return sorted(self.client.nthreads())

    def _take_snapshot(self, events: list[dict[str, Any]]) -> None:
        """Snapshot the chains as they are now: each partition's imputed cells kept twice, by the
        worker holding the partition and by another one, and the client's side."""
        if self._origin is None:  # nothing to rebuild a partition from
            return
        t0 = time.perf_counter()
        self._reside()
        alive = self._alive()
        cells = []
        try:
            for i, a in sorted(self._where.items()):
                own = self.client.submit(_cells, self._key, i, self._done, workers=[a], pure=False)
                others = [w for w in alive if w != a]
                b = others[i % len(others)] if others else None
                # on b only (a copy placed next to its original would be lost with it); if b
                # leaves first, the wait below ends on a lost worker or times out
                copy = self.client.submit(_same, own, workers=[b], allow_other_workers=False,
                                          pure=False) if b is not None else None
                cells.append((own, a, copy, b))
            self._wait([f for c in cells for f in (c[0], c[2]) if f is not None])
        except OSError as e:
            if self._was_lost():
                raise self._lost(e) from e
            raise
        for c in cells:
            for f in (c[0], c[2]):
                if f is not None and f.status != "finished":
                    if self._gone():
                        raise self._lost(KeyError("worker"))
                    f.result()  # the worker's error
        secs = time.perf_counter() - t0
        self._snap = {"iteration": self.iteration, "round": (self._key, self._done), "cells": cells,
                      "models": self.model_state(),
                      "chain_stats": len(self.chain_stats), "events": len(events), "seconds": secs}
        self.snapshots.append({"iteration": self.iteration, "seconds": round(secs, 4)})

    def _snapshot_interval(self, iteration_seconds: float) -> int:
        """Iterations between snapshots: as few as keep their cost within :data:`SNAPSHOT_SHARE`
        of the loop's time (at most :data:`SNAPSHOT_MAX_EVERY`)."""
        cost = self._snap["seconds"] if self._snap is not None else 0.0
        every = int(np.ceil(cost / max(SNAPSHOT_SHARE * iteration_seconds, 1e-9)))
        return min(SNAPSHOT_MAX_EVERY, max(1, every))

    def _recover(self, err: ChainsLost, events: list[dict[str, Any]], progress: Any) -> bool:
        """Rebuild every partition from its encoded block and the last snapshot's cells, on the
        workers there are, and put the client's side back to the snapshot.  False when it
        cannot (no snapshot, a snapshot lost with both its copies, too many recoveries)."""
        snap = self._snap
        if snap is None or self._origin is None or len(self.recoveries) >= MAX_RECOVERIES:
            return False
        t0 = time.perf_counter()
        lost_at = self.iteration + 1
        gone = list(getattr(err, "partitions", []))
        key, self._key = self._key, None
        alive = self._alive()
        if key is not None and alive:
            try:
                self.client.run(_drop, key, workers=alive)
            except Exception as e:  # noqa: BLE001 - another worker may be going too
                log.debug("could not empty the block registry: %s", type(e).__name__)
        while not alive and time.perf_counter() - t0 < WORKER_WAIT:  # e.g. a nanny restarting it
            time.sleep(0.5)
            alive = self._alive()
        # each partition's cells from a copy still held by a worker that is there (dask may have
        # kept either copy's data on the other one's worker, so the holders are asked)
        pairs = [[f for f in (own, copy) if f is not None] for own, _, copy, _ in snap["cells"]]
        held = self.client.who_has([f for pr in pairs for f in pr])
        cands = [f for pr in pairs for f in pr if set(held.get(f.key, ())) & set(alive)]
        # a copy the scheduler recomputed after its worker left holds no cells (see _cells): each
        # candidate is asked, where it is, whether it holds them
        checks = [self.client.submit(_holds_cells, f, pure=False) for f in cands]
        try:
            wait(checks, timeout=30)
        except TimeoutError:
            pass
        valid = {f.key for f, ch in zip(cands, checks) if ch.status == "finished" and ch.result()}
        picked = []
        for pr in pairs:
            there = [f for f in pr if f.key in valid]
            if not there:
                log.warning("dmice: both copies of a snapshot of the chains were lost with their workers")
                return False
            picked.append(there[0])
        blocks = [self.client.submit(_block.restore_cells, o, c, self.plan, pure=False)
                  for o, c in zip(self._origin, picked)]
        wait(blocks)
        failed = [i for i, f in enumerate(blocks) if f.status != "finished"]
        if failed:
            log.warning("dmice: partitions %s could not be rebuilt from the input", failed)
            return False
        self._blocks, self._fresh, self._done, self._where = blocks, True, 0, {}
        self.load_model_state(snap["models"])
        self.iteration = snap["iteration"]
        del self.chain_stats[snap["chain_stats"]:]
        del events[snap["events"]:]
        self._snap = None  # a new one, its copies on workers that are there, when the loop resumes
        secs = time.perf_counter() - t0
        self.recoveries.append({"iteration": lost_at, "partitions": gone, "replayed_from": snap["iteration"],
                                "seconds": round(secs, 3)})
        msg = (f"a worker holding partitions {gone} was lost at iteration {lost_at}: every partition "
               f"was rebuilt from the input and the chains replayed from iteration {snap['iteration']} "
               f"(rebuilt in {secs:.1f} s); the result equals that of an undisturbed run")
        log.warning("dmice: %s", msg)
        events.append({"iteration": lost_at, "variable": "", "event": msg})
        if progress is not None and hasattr(progress, "rewind"):
            progress.rewind(snap["iteration"])
        return True

    # -- rounds ----------------------------------------------------------------------------
    def _round(self, order: dict[str, Any] | None,
               request: dict[str, Any] | list[dict[str, Any]] | None) -> dict[str, Any]:
        self._reside()
        if self._gone():  # a call to a worker that left waits for the connection timeout (30 s)
            raise self._lost(KeyError("worker"))
        workers = sorted(set(self._where.values()))
        try:
            got = self.client.run(_visit_resident, self._key, self._done + 1, Sealed(order),
                                  Sealed(request), workers=workers)
        except OSError as e:  # distributed's CommClosedError is an OSError too
            if not self._was_lost():
                raise  # an error of the visit itself
            raise self._lost(e) from e
        outs: dict[int, Any] = {}
        for per_worker in got.values():
            outs.update(per_worker)
        if len(outs) != len(self._where):
            raise self._lost(KeyError("partition"))
        if self._fresh:  # the futures of the blocks before the loop: stale now, and not kept (a
            self._blocks = []  # worker lost would have the scheduler recompute them for nothing)
        self._fresh = False
        self._done += 1
        self.rounds += 1
        ordered = [outs[i] for i in range(len(self._where))]
        self.bytes_gathered += sum(sizeof(o) for o in ordered)
        return _block.combine(ordered)

    # -- the loop ------------------------------------------------------------------------
    def run(self, iterations: int, visit_sequence: list[int], events: list[dict[str, Any]],
            progress: Any = None, after_iteration: Callable[[int], bool] | None = None) -> None:
        """Run up to ``iterations`` more iterations of the chained loop.

        ``progress`` (a :class:`dmice.progress.Reporter` or None) hears of every visit and
        iteration; ``after_iteration(iteration)``, called after each iteration (checkpoints,
        stopping rules), ends the loop early when it returns True.  Stopping, or running 5 + 5 iterations, gives exactly the chains of one
        run of that many iterations: every draw is keyed by its iteration, and the statistics a
        fused visit computes for the next iteration are recomputed identically by a new round.
        """
        target = self.iteration + iterations
        self._events = events
        try:
            while True:
                try:
                    self._loop(target - self.iteration, visit_sequence, events, progress, after_iteration)
                    break
                except ChainsLost as e:
                    if not self._recover(e, events, progress):
                        raise
        except BaseException:
            # the blocks as of the last round the client took in (a round in flight on the
            # workers when the client stopped is not part of them), unless a worker is gone
            try:
                keep = not self._gone()
            except Exception:  # noqa: BLE001 - the client itself may be closing
                keep = False
            try:
                self._release(keep=keep)
            except Exception as e:  # noqa: BLE001 - the original error matters more
                log.debug("could not keep the chains' state: %s", type(e).__name__)
            raise
        self._release()

    def _loop(self, iterations: int, visit_sequence: list[int], events: list[dict[str, Any]],
              progress: Any, after_iteration: Callable[[int], bool] | None) -> None:
        flat = [(self.iteration + i + 1, j) for i in range(iterations) for j in visit_sequence]
        pending: dict[str, Any] | None = None  # statistics computed for flat[k] by the previous round
        if flat and (self._snap is None or self._snap["iteration"] != self.iteration):
            self._take_snapshot(events)
        if self.iteration == 0:
            # a first visit of a linear model needs statistics of the initial fill, which the
            # cold-start rounds do not change: they ride along with the first of them
            first = self.models[flat[0][1]] if flat else None
            pending = self.prefit(events, first.request() if first is not None and first.stat == "gram"
                                  else None)
        t_iter = time.perf_counter()
        for k, (it, j) in enumerate(flat):
            model = self.models[j]
            if progress is not None:
                progress.visit(it, self.plan.variables[j].name)
            res = pending if pending is not None else (
                self._round(None, model.request()) if model.request() is not None else None)
            if res is not None:
                while not model.update(res, it, events):
                    res = self._round(None, model.request())
            order = model.order(it)
            if order.get("match") and self._match_among_workers(model):  # pmm, large: no gather
                spec = model.range_spec(self._round(model.range_phase(order), None), len(self._where))
                order = model.ranged_order(order, self._match_ranges(spec), it, events)
            elif order.get("match"):  # pmm on all observed rows: the donors are found first
                for phase in model.match_phases(order):
                    model.take_match(phase, self._round(phase, None))
                order = model.matched_order(order, it, events)
            nxt = self.models[flat[k + 1][1]].request() if k + 1 < len(flat) else None
            out = self._round(order, nxt)
            pending = out if nxt is not None else None
            failed = int(out["sum"].get("smcfcs_failed", 0))
            if failed:
                events.append({"iteration": it, "variable": self.plan.variables[j].name,
                               "event": f"SMC-FCS: {failed} cells had no accepted candidate and kept "
                                        "their previous value"})
            self._record_chain(it, j, out)
            if k + 1 == len(flat) or flat[k + 1][0] != it:
                self.iteration = it
                secs = time.perf_counter() - t_iter
                t_iter = time.perf_counter()
                if progress is not None:
                    progress.iteration(it, secs)
                if after_iteration is not None and after_iteration(it):
                    break
                self.snapshot_every = self._snapshot_interval(secs)
                if k + 1 < len(flat) and (self._snap is None or it - self._snap["iteration"] >= self.snapshot_every):
                    self._take_snapshot(events)
                    t_iter = time.perf_counter()

    # -- pmm matched among the workers --------------------------------------------------------
    def _match_among_workers(self, model: Any) -> bool:
        """Whether pmm's matching stays on the workers: more than one partition, and more to
        gather than dask config ``dmice.pmm.worker-match-bytes``."""
        from dmice import config

        if not hasattr(model, "worker_match_bytes"):  # by=: each group matches on the client
            return False
        return len(self._where) > 1 and model.worker_match_bytes() > config.get("pmm.worker-match-bytes")

    def _match_ranges(self, spec: dict[str, Any]) -> list[float]:
        """Match the missing cells of one pmm visit on the workers (see :mod:`dmice.methods.pmm`):
        each partition splits its kept predictions by range, the worker of partition r matches
        range r, each partition collects its matched values.  Returns each chain's number of
        scarce cells.  The payloads travel worker to worker, sealed."""
        import operator

        submit, where, parts = self.client.submit, self._where, range(len(self._where))
        ranges = range(spec["n_ranges"])
        sealed = Sealed(spec)  # its boundaries are quantiles of predictions
        split = [submit(_pmm_split, self._key, p, self._done, sealed, workers=[where[p]], pure=False) for p in parts]
        shares = [[submit(operator.getitem, split[p], r, workers=[where[p]], pure=False) for p in parts]
                  for r in ranges]
        matched = [submit(_pmm_match, shares[r], sealed, workers=[where[r]], pure=False)
                   for r in ranges]
        back = [[submit(operator.getitem, matched[r], p, workers=[where[r]], pure=False) for r in ranges]
                for p in parts]
        collect = [submit(_pmm_collect, self._key, p, self._done, sealed, back[p], workers=[where[p]], pure=False)
                   for p in parts]
        try:
            self._wait(collect)
            scarce = self.client.gather(collect)
        except ChainsLost:
            raise
        except Exception as e:  # a task moved off a lost worker fails on its new one
            if not self._was_lost():
                raise
            raise self._lost(e) from e
        return [float(sum(s[c] for s in scarce)) for c in range(len(scarce[0]))] if scarce else []

    def append_chains(self, other: Engine) -> None:
        """Put the chains of ``other`` (the same partitions) after this engine's, partition by
        partition (its plan and models are the caller's to merge)."""
        self.blocks = [self.client.submit(_block.concat_chains, [a, b], pure=False)
                       for a, b in zip(self.blocks, other.blocks)]

    # -- state of the chains -------------------------------------------------------------
    def model_state(self) -> dict[str, Any]:
        """What the client side of the chains needs to continue: the Newton warm starts."""
        return {str(j): m.get_state() for j, m in self.models.items()}

    def load_model_state(self, state: dict[str, Any]) -> None:
        for j, m in self.models.items():
            if str(j) in state:
                m.set_state(state[str(j)])

    def save_state(self, url: str, storage_options: dict[str, Any] | None, meta: dict[str, Any],
                   chain_stats: Any) -> list[dict[str, Any]]:
        """Write the chains' state under ``url``: one file per partition from the workers, then the
        client's part (``state.json`` last).  Returns the manifest entries of the files written
        (paths relative to ``url``, bytes, SHA-256)."""
        from dmice import store

        blocks = self.blocks
        futs = [self.client.submit(store.write_state_partition, b, url, i, storage_options, pure=False)
                for i, b in enumerate(blocks)]
        if self._key is not None:  # mid-loop: the blocks are tasks pinned to the partitions' workers
            self._wait(blocks + futs)
        files = self.client.gather(futs)
        return files + store.write_state_meta(url, storage_options, {**meta, "iteration": self.iteration},
                                              self.model_state(), chain_stats)

    def load_state(self, url: str, storage_options: dict[str, Any] | None, models: dict[str, Any],
                   iteration: int) -> None:
        """Replace the imputed cells and model warm starts by those stored under ``url``."""
        from dmice import store

        self.blocks = [self.client.submit(store.apply_state_partition, b, self.plan, url, i,
                                          storage_options, pure=False)
                       for i, b in enumerate(self.blocks)]
        wait(self.blocks)
        for f in self.blocks:
            if f.status == "error":
                f.result()  # raises the worker's error here
        self.load_model_state(models)
        self.iteration = iteration

    def prefit(self, events: list[dict[str, Any]], extra: dict[str, Any] | None = None
               ) -> dict[str, Any] | None:
        """Cold-start Newton fits of all Newton models (logistic, Firth, multinomial, polr, Poisson)
        together, on the initial fill.

        Each round computes the statistics of every model still iterating, so the cold start
        costs as many rounds as the slowest model needs rather than their sum; the first visit
        of each model then starts warm.  The statistics of ``extra``, a request that depends
        only on the imputed cells (which these rounds leave as they are), are computed in the
        first round and returned (None when there is no Newton model, hence no round).
        """
        newton = set(NEWTON_STATS.values())
        pending = [m for m in self.models.values() if m.stat in newton]
        out = None
        while pending:
            requests = [m.request() for m in pending]
            res = self._round(None, requests + ([extra] if extra is not None and out is None else []))
            if extra is not None and out is None:
                out = _block.split_out(res, len(requests))
            pending = [m for i, m in enumerate(pending)
                       if not m.update(_block.split_out(res, i), 0, events)]
        return out

    def _record_chain(self, it: int, j: int, out: dict[str, Any]) -> None:
        v = self.plan.variables[j]
        ch = out["sum"]["chain"]
        for c in range(self.plan.m):
            if ch.shape[1] == 3 and v.levels is None:
                n, s, ss = ch[c]  # of the standardised values
                mean = s / n if n else np.nan
                var = (ss - n * mean * mean) / (n - 1) if n > 1 else np.nan
                self.chain_stats.append({"iteration": it, "variable": v.name, "chain": c + 1,
                                         "mean": v.center + v.scale * mean,
                                         "sd": v.scale * float(np.sqrt(max(var, 0.0)))})
            else:
                tot = ch[c].sum()
                for lev, cnt in zip(v.levels or [], ch[c]):
                    self.chain_stats.append({"iteration": it, "variable": v.name, "chain": c + 1,
                                             "level": str(lev), "proportion": cnt / tot if tot else np.nan})


# -- worker side of the resident blocks --------------------------------------------------------
#: (registry key, worker address) -> {"plan": Plan, "round": r, "blocks": {partition: Block after
#: round r}, "previous": {partition: Block after round r - 1}}; keyed by the worker too, since the
#: workers of an in-process cluster share this module
_RESIDENT: dict[tuple[str, str], dict[str, Any]] = {}


def _adopt(block: _block.Block, key: str, part: int, plan: _block.Plan) -> str:
    """Task: keep ``block`` in this worker's registry; returns the worker's address."""
    from distributed import get_worker

    address = get_worker().address
    entry = _RESIDENT.setdefault((key, address), {"plan": plan, "round": 0, "blocks": {}, "previous": {}})
    entry["blocks"][part] = block
    return address


def _snapshot(key: str, part: int, done: int) -> _block.Block:
    """Task: the block of partition ``part`` after round ``done`` of the residency (the client may
    not have taken in the last round the workers ran, e.g. when it was interrupted)."""
    from distributed import get_worker

    try:
        entry = _RESIDENT[(key, get_worker().address)]
        if entry["round"] == done:
            return entry["blocks"][part]
        if entry["round"] == done + 1:
            return entry["previous"][part]
    except KeyError:
        pass
    raise RuntimeError(f"the imputation chains of partition {part} are not on this worker: the "
                       "worker that held them was lost; run the imputation again")


def _cells(key: str, part: int, done: int) -> dict[str, np.ndarray] | None:
    """Task: the imputed cells of partition ``part`` after round ``done`` (:func:`dmice.block.cells`),
    for a snapshot; None when this worker does not hold them (the task rerun by the scheduler
    after the worker that ran it was lost: the snapshot's other copy is used then)."""
    from distributed import get_worker

    entry = _RESIDENT.get((key, get_worker().address))
    if entry is None or part not in entry["blocks"]:
        return None
    if entry["round"] == done:
        return _block.cells(entry["blocks"][part])
    if entry["round"] == done + 1:
        return _block.cells(entry["previous"][part])
    return None


def _holds_cells(x: Any) -> bool:
    """Task: whether a snapshot's copy holds cells (not the None of a recomputed one)."""
    return x is not None


def _same(x: Any) -> Any:
    """Task: its argument (a copy of a snapshot's cells on another worker)."""
    return x


def _resident(key: str, part: int, done: int) -> _block.Block:
    """In a task: the block of partition ``part`` held by this worker, after round ``done``."""
    from distributed import get_worker

    entry = _RESIDENT.get((key, get_worker().address))
    if entry is None or entry["round"] != done or part not in entry["blocks"]:
        raise RuntimeError(f"the imputation chains of partition {part} are not on this worker at "
                           f"round {done}")
    return entry["blocks"][part]


def _pmm_split(key: str, part: int, done: int, sealed: Sealed) -> list[Sealed]:
    """Task: partition ``part``'s share of every range, per chain (:func:`dmice.methods.pmm.range_pieces`)."""
    from dmice.methods import pmm as _pmm

    spec = sealed.value
    cand = _resident(key, part, done).cache[("pmm-cand", spec["var"])]
    per_chain = [_pmm.range_pieces(cand["s"][i], cand["v"][i], cand["q"][i], cand["u"][i], spec["bounds"][c],
                                   spec["donors"])
                 for i, c in enumerate(cand["chains"])]
    return [Sealed([pc[r] for pc in per_chain]) for r in range(spec["n_ranges"])]


def _pmm_match(shares: list[Sealed], sealed: Sealed) -> list[Sealed]:
    """Task: match one range of every chain; per partition, its cells' values and scarce counts."""
    from dmice.methods import pmm as _pmm

    spec = sealed.value
    parts = [s.value for s in shares]
    out: list[list[Any]] = [[] for _ in parts]
    for i in range(len(parts[0]) if parts else 0):
        for p, got in enumerate(_pmm.match_range([pp[i] for pp in parts], spec["donors"], spec["sigma"][i])):
            out[p].append(got)
    return [Sealed(o) for o in out]


def _pmm_collect(key: str, part: int, done: int, sealed: Sealed, pieces: list[Sealed]) -> list[int]:
    """Task: partition ``part``'s matched values, in the order of its sorted predictions, kept
    for the imputation round; returns each chain's scarce cells."""
    spec = sealed.value
    block = _resident(key, part, done)
    cand = block.cache.pop(("pmm-cand", spec["var"]))
    k, n_q = cand["q"].shape
    vals = np.empty((k, n_q))
    scarce = [0] * k
    for piece in pieces:
        for i, (q0, v, n_scarce) in enumerate(piece.value):
            vals[i, q0:q0 + len(v)] = v
            scarce[i] += int(n_scarce)
    if n_q:
        block.cache[("pmm-matched", spec["var"])] = vals
    return scarce


def _drop(key: str, dask_worker: Any = None) -> None:
    _RESIDENT.pop((key, dask_worker.address), None)


class Sealed:
    """An argument of a call on the workers whose text shows no content.

    distributed logs the arguments of a failed ``Client.run`` call as text on the worker; an
    order carries the donors' observed values and a request draws made from the data, so they
    travel sealed and a log line shows only their type."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<sealed {type(self.value).__name__}>"

    __str__ = __repr__


async def _visit_resident(key: str, rnd: int, order: Sealed, request: Sealed,
                          dask_worker: Any = None) -> dict[int, dict[str, Any]]:
    """Round ``rnd`` on this worker: :func:`dmice.block.visit` on each of its partitions, in its
    task thread pool; returns each partition's statistics.  The registry moves to the new blocks
    only when every partition succeeded (a failed round leaves the previous state in place) and
    keeps the previous ones, for a client that never took this round in.  ``order`` and
    ``request`` arrive :class:`Sealed`."""
    order, request = order.value, request.value
    entry = _RESIDENT[(key, dask_worker.address)]
    if entry["round"] != rnd - 1:
        raise RuntimeError(f"round {rnd} of the chains asked of a worker that holds round {entry['round']}")
    plan, blocks = entry["plan"], entry["blocks"]
    loop = asyncio.get_running_loop()
    pool = dask_worker.executors["default"]
    parts = sorted(blocks)
    new = await asyncio.gather(*[loop.run_in_executor(pool, _block.visit, blocks[p], plan, order, request)
                                 for p in parts])
    entry["previous"], entry["blocks"], entry["round"] = blocks, dict(zip(parts, new)), rnd
    return {p: _block.get_out(b) for p, b in zip(parts, new)}
