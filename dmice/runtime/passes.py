"""Passes over partitions: every computation of a dask collection in dmice goes through here.

A pass is one task per partition (of the input, of the blocks of the chains, or of the written
imputations), computed on the cluster and gathered in partition order: the schema's
summaries, the encoding of the blocks, the initial fill, writing, the analysis's passes and the
plots' counts.  :class:`Held` keeps per-group objects (the analysis's designs) in the workers'
memory between passes and runs every pass where they are held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from dask import delayed
from distributed import Client, Future, wait

from dmice import block as _block


def compute(client: Any, *objs: Any) -> tuple[Any, ...]:
    """Dask collections or delayed objects computed on ``client`` (None: the active client,
    else dask's local scheduler), in order."""
    import dask

    if client is not None:
        return tuple(client.gather(client.compute(list(objs))))
    return dask.compute(*objs)


def from_pandas(df: Any) -> Any:
    """A pandas frame as a dask one of dask config ``dmice.partition-rows`` rows per partition
    (the one way dmice partitions in-memory data), its columns keeping their own dtypes: dask
    would turn object columns into strings (numbers in them included), and the data would not
    be the data given."""
    import math

    import dask
    import dask.dataframe as dd

    from dmice import config

    nparts = max(1, math.ceil(len(df) / config.get("partition-rows")))
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(df, npartitions=nparts, sort=False)


def on_cluster(frames: Sequence[Any]) -> bool:
    """Whether any of the dask collections ``frames`` has partitions held on the cluster."""
    from distributed import futures_of

    return any(futures_of(f) for f in frames)


def scatter(client: Client, pieces: list[Any]) -> list[Future]:
    """In-memory pieces (e.g. pandas partitions) sent to the workers once."""
    return client.scatter(pieces)


def summarize(client: Client, parts: list[Any]) -> list[dict[str, Any]]:
    """Per-partition summaries, computed on the cluster (one pass over the data)."""
    from dmice.schema import summarize_partition

    return map_partitions(client, parts, summarize_partition)


def encode(client: Client, parts: list[Any], plan: _block.Plan) -> list[Future]:
    """Encode every partition into a block held on the workers."""
    futs = client.compute([delayed(_block.encode_partition)(p, plan, i) for i, p in enumerate(parts)])
    wait(futs)
    return futs


def gather_pools(client: Client, blocks: list[Future], plan: _block.Plan) -> dict[int, np.ndarray]:
    """The sampling pool of observed values of each imputed variable, in partition order."""
    pieces = client.gather([client.submit(_block.sample_values, b, pure=False) for b in blocks])
    return {j: np.concatenate([p[j] for p in pieces]) for j in pieces[0]} if pieces else {}


def init_fill(client: Client, blocks: list[Future], plan: _block.Plan,
              pools: dict[int, np.ndarray]) -> list[Future]:
    # nothing to scatter when no column is imputed (distributed refuses an empty scatter)
    pools_f = client.scatter(pools, broadcast=True) if len(blocks) > 1 and pools else pools
    return [client.submit(_block.init_fill, b, plan, pools_f, pure=False) for b in blocks]


def complete_frame(ddf: Any, blocks: list[Future], plan: _block.Plan, chain: int) -> Any:
    """Lazy dask DataFrame of one completed data set."""
    import dask.dataframe as dd

    from dmice.schema import conform

    parts = ddf.to_delayed()
    meta = conform(ddf._meta, plan.variables)  # categorical columns: the categories of every partition
    pieces = [delayed(_block.complete_partition)(p, b, plan, chain) for p, b in zip(parts, blocks)]
    import dask

    with dask.config.set({"dataframe.convert-string": False}):  # the input's own dtypes
        return dd.from_delayed(pieces, meta=meta, divisions=ddf.divisions, verify_meta=False)


def write_parquet(client: Client, ddf: Any, blocks: list[Future], plan: _block.Plan, url: str,
                  storage_options: dict[str, Any] | None, writer: Any = None) -> list[list[dict[str, Any]]]:
    """Write every imputation of every partition; one task per partition writes all m files
    (``writer``, default :func:`dmice.store.write_partition`, called with the same arguments)."""
    from dmice import store

    parts = ddf.to_delayed()
    tasks = [delayed(writer or store.write_partition)(p, b, plan, url, i, storage_options)
             for i, (p, b) in enumerate(zip(parts, blocks))]
    return list(compute(client, *tasks))


def map_partitions(client: Client, parts: list[Any], func: Callable[..., Any], *args: Any) -> list[Any]:
    """``func(partition, *args)`` computed on the cluster for every partition, gathered in order."""
    return list(compute(client, *[delayed(func)(p, *args) for p in parts]))


def _place(client: Any, loads: list[Any], spread: bool) -> list[Future]:
    """Compute ``loads`` on the cluster; with ``spread``, load i preferably on worker i modulo the
    number of workers.  Loads of data read from files have no input on any worker, and the
    scheduler may then place every one on the same worker, where all passes would follow them.
    Loads of data already held on the cluster (``spread`` False) are left where their data are."""
    addresses = sorted(client.scheduler_info()["workers"])
    if not spread or len(addresses) < 2:
        return client.compute(loads)
    return [client.compute(ld, workers=[addresses[i % len(addresses)]], allow_other_workers=True)
            for i, ld in enumerate(loads)]


def compute_spread(client: Any, tasks: list[Any], spread: bool) -> list[Any]:
    """:func:`compute` of ``tasks`` with ``spread`` as in :class:`Held` (``client`` None: the
    active client, else dask's local scheduler)."""
    if client is None:
        return list(compute(None, *tasks))
    return list(client.gather(_place(client, tasks, spread)))


class Held:
    """Objects computed once from ``loads`` (e.g. the analysis's design of each partition group)
    and kept where they are computed, for passes of tasks over them.

    With a client they stay in the workers' memory (placed as :func:`_place` does) and every
    pass runs where each object is held (not moved by work stealing; an object lost with its
    worker is recomputed anywhere); without one (``client`` None) they are computed by dask's
    local scheduler and the passes run in this process.
    """

    def __init__(self, client: Any, loads: list[Any], spread: bool = False) -> None:
        self.client = client
        self._extra: list[Future] = []
        if client is None:
            self._held: list[Any] = list(compute(None, *loads))
        else:
            self._held = _place(client, loads, spread)
            wait(self._held)

    def _where(self) -> list[list[str] | None]:
        where = self.client.who_has(self._held)
        return [list(where.get(h.key, ())) or None for h in self._held]

    def map(self, func: Callable[..., Any], args: list[tuple[Any, ...] | None]) -> list[Any]:
        """``func(object_i, *args[i])`` for every held object whose ``args[i]`` is not None,
        gathered in order."""
        if self.client is None:
            return [func(h, *a) for h, a in zip(self._held, args) if a is not None]
        where = self._where()
        futs = [self.client.submit(func, h, *a, pure=False, workers=w)
                for h, a, w in zip(self._held, args, where) if a is not None]
        return list(self.client.gather(futs))

    def queue(self, func: Callable[..., Any], items: list[tuple[int, tuple[Any, ...]]]) -> None:
        """Low-priority tasks ``func(object_i, *a)`` for ``(i, a)`` in ``items``, on the worker
        holding object i, queued behind the passes (they run in the workers' idle time between
        passes); nothing is waited for.  Without a client: nothing (the passes do it when needed)."""
        if self.client is None:
            return
        where = self._where()
        self._extra.extend(self.client.submit(func, self._held[i], *a, pure=False, priority=-1,
                                              workers=where[i])
                           for i, a in items)

    def release(self) -> None:
        """Release the held objects and the queued tasks on the workers."""
        if self.client is not None:
            self.client.cancel(self._extra + list(self._held))
        self._extra, self._held = [], []
