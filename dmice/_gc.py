"""Python's cyclic garbage collector during a call that coordinates many rounds.

The client process of a run holds the objects of dask, distributed (with an embedded
cluster, the scheduler's too), pandas and the libraries: some hundred thousand objects
that live as long as the process.  A full collection traverses all of them, about
0.15 s here, and pauses every thread of the process, the scheduler's included; one
that falls between two rounds delays the next by as much (measured in
benchmarks/RESULTS.md).  :func:`frozen` moves the objects that exist when a call starts
out of the collector's reach until it returns (:func:`gc.freeze`), so collections during
the call traverse only what the call created.  Garbage is still collected: cycles made
during the call as usual, older ones once the call has returned.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_depth = 0


def frozen(func: F) -> F:
    """Decorator: run ``func`` with the objects older than the call frozen (see the module)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _depth
        with _lock:
            if _depth == 0:
                gc.freeze()
            _depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    gc.unfreeze()

    return wrapper  # type: ignore[return-value]
