"""dmice's tunables in dask's configuration, under ``dmice.*``.

The defaults ship in ``dmice.yaml`` beside this module and are registered with
:func:`dask.config.update_defaults` when dmice is imported, so a user sets them as any dask
setting: ``dask.config.set``, a YAML file in dask's configuration directory, or
``DASK_DMICE__...`` environment variables.  :func:`get` reads one, checked: a value of the wrong
kind is an :class:`~dmice.errors.InputError` naming the key and what it takes.

None of these settings changes a result; they size partitions, rounds and caches.  They are read
on the client, where a run starts (the face and the runtime), and handed to the models and the
per-partition code as plain values: those import no dask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import yaml

from dmice.errors import InputError

_DEFAULTS = Path(__file__).with_name("dmice.yaml")

#: key -> (kind, description of what it takes)
KEYS: dict[str, tuple[str, str]] = {
    "partition-rows": ("count", "a whole number of rows >= 1"),
    "memory.fraction": ("fraction", "a number > 0 and <= 1"),
    "pmm.match-bytes": ("bytes", "a size in bytes >= 1, such as '256 MiB'"),
    "pmm.worker-match-bytes": ("bytes0", "a size in bytes >= 0, such as '32 MiB'"),
    "design-cache.observed": ("bytes0", "a size in bytes >= 0, such as '32 MiB'"),
    "design-cache.missing": ("bytes0", "a size in bytes >= 0, such as '8 MiB'"),
    "analysis.spec-sample-rows": ("count", "a whole number of rows >= 1"),
    "lock.ttl": ("seconds", "a duration > 0, such as '600s' or '10 minutes'"),
    "faults.paused-wait": ("seconds", "a duration > 0, such as '120s' or '5 minutes'"),
}


def register() -> None:
    """Register the shipped defaults (idempotent: values a user set stay)."""
    with _DEFAULTS.open() as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)


def get(key: str) -> Any:
    """The checked value of ``dmice.<key>``: an int (counts, bytes), a float (fractions,
    seconds)."""
    from dask.utils import parse_bytes, parse_timedelta

    kind, expected = KEYS[key]
    name = f"dmice.{key}"
    raw = dask.config.get(name)
    try:
        if kind == "count":
            value = int(raw) if not isinstance(raw, bool) and float(raw) == int(float(raw)) else None
            ok = value is not None and value >= 1
        elif kind == "fraction":
            value = float(raw)
            ok = 0 < value <= 1
        elif kind in ("bytes", "bytes0"):
            value = int(parse_bytes(raw)) if isinstance(raw, str) else int(raw)
            ok = value >= (1 if kind == "bytes" else 0) and not isinstance(raw, bool)
        else:
            value = float(parse_timedelta(raw, default="seconds"))
            ok = value > 0
    except (TypeError, ValueError, KeyError, OverflowError):
        ok, value = False, None
    if not ok:
        raise InputError(f"dask config {name}: expected {expected}, got {raw!r}")
    return value


register()
