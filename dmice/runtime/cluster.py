"""Finding the cluster, and what dmice asks of it beyond running tasks.

:func:`get_client` returns the client a run computes on: the one given (an address), the
active one, or an embedded ``LocalCluster`` on loopback that dmice starts and closes
(:func:`close`).  The rest reads the cluster (workers, their memory limits, the dashboard)
or tunes the workers' allocator.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from distributed import Client

log = logging.getLogger("dmice")

#: the only interface the embedded cluster listens on
LOOPBACK = "127.0.0.1"


def get_client(address: str | None = None, n_workers: int | None = None) -> tuple[Client, Any]:
    """The client to compute on, and the embedded cluster when dmice started one (else None).

    Parameters
    ----------
    address : str, optional
        Scheduler address to connect to (a new client, which the caller closes).
    n_workers : int, optional
        Workers of an embedded cluster (default: the number of cores, at most 4).

    Returns
    -------
    (Client, LocalCluster or None)
        Without ``address``: the active client and None, else a new embedded cluster on
        loopback (scheduler, workers and dashboard unreachable from other machines).
    """
    from distributed import LocalCluster
    from distributed import get_client as _get

    if address:
        return Client(address), None
    try:
        return _get(), None
    except ValueError:
        pass
    n = n_workers or max(1, min(os.cpu_count() or 1, 4))
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host=LOOPBACK,
                           dashboard_address=f"{LOOPBACK}:0", silence_logs=logging.ERROR)
    client = Client(cluster)
    log.info("dmice: embedded cluster of %d workers at %s, dashboard %s", n, cluster.scheduler_address,
             client.dashboard_link)
    return client, cluster


def close(client: Any, cluster: Any, quiet: bool = False) -> None:
    """Close ``client`` and ``cluster`` when dmice started the cluster (``cluster`` not None).
    ``quiet``: errors are ignored (e.g. at interpreter shutdown)."""
    if cluster is None:
        return
    try:
        client.close()
        cluster.close()
    except Exception:  # noqa: BLE001 - only where the caller asked for quiet
        if not quiet:
            raise


def default_client() -> Any:
    """The active client, or None (dask's local scheduler then computes)."""
    try:
        from distributed import default_client as _default

        return _default()
    except (ImportError, ValueError):
        return None


def workers(client: Any) -> dict[str, dict[str, Any]]:
    """The scheduler's information on every worker, by address."""
    try:
        return client.scheduler_info(n_workers=-1).get("workers", {})
    except TypeError:  # older distributed: no n_workers
        return client.scheduler_info().get("workers", {})


def memory_limits(client: Any) -> list[int]:
    """Each worker's memory limit in bytes (0 where none is set)."""
    return [int(w.get("memory_limit") or 0) for w in workers(client).values()]


def dashboard_link(client: Any) -> str | None:
    """The dashboard's address, or None when the cluster has none."""
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard is not an error
        return None


def tune_workers(client: Client) -> None:
    """Allocator settings that keep numpy temporaries off mmap in the workers (see dmice._malloc)."""
    from dmice import _malloc

    try:
        client.run(_malloc.tune)
    except Exception as e:  # noqa: BLE001 - a performance setting, never a reason to fail
        log.debug("could not tune worker allocators: %s", type(e).__name__)
