"""What is written: the Parquet layout, the manifest and the commit marker.

Two layouts share one manifest format.  :meth:`MultipleImputation.to_parquet` writes straight
into the target::

    out/
      imputation=1/part.0.parquet ... part.N.parquet
      ...
      imputation=m/...
      _manifest.json
      _diagnostics.arrow  chain statistics (mean/sd or level proportions per iteration and chain)
      _state/             state of the chains, so that ``dmice.open(out).iterate(k)`` can continue
      _SUCCESS            written last, empty; readers trust only outputs that have it

Only the imputations are Parquet files, so ``dask.dataframe.read_parquet("out/")``
reads every imputation with an ``imputation`` column (dask reads every ``*.parquet``
file below the root, whatever its name).

A scheduled job (:mod:`dmice.job`) writes every file of a run under a run-scoped prefix and
commits by writing one small object last::

    out/
      runs/<run_id>/imputation=k/part.N.parquet     layout "full"
      runs/<run_id>/cells/var=J/part.N.parquet      layout "cells": only the imputed cells
      runs/<run_id>/_diagnostics.arrow
      runs/<run_id>/analysis/<name>.csv, .json      pooled tables of the job's analyses
      runs/<run_id>/_manifest.json                  every file with its size and SHA-256
      _SUCCESS                                      {"run_id", "manifest", "sha256"}: the commit
      _LOCK                                         the running job's lock (see acquire_lock)

Object stores have no atomic rename, but a single object is replaced atomically: a reader sees
the old ``_SUCCESS`` or the new one, never a mix.  Files of a run are never modified after the
run's manifest is written, so the pointer always names a complete, immutable set of files.  A
failed run leaves only its own staging prefix (never named by ``_SUCCESS``); a forced re-run
writes a new prefix, swaps the pointer, then deletes the prefix it replaced.  Run ids are one path
segment (:func:`check_run_id`), every path read from ``_SUCCESS`` or a manifest must lie below the
output root (:func:`below_root`), and only entries directly below ``runs/`` are ever deleted
(:func:`remove_run_prefix`).

Paths are fsspec URLs; ``storage_options`` are passed through unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import feather

from dmice.errors import InputError, OutputError

MANIFEST = "_manifest.json"
#: Arrow IPC (Feather), not Parquet: dask's read_parquet("out/") picks up every *.parquet file
#: below the root, "_"-prefixed ones included, which would break reading the imputations
DIAGNOSTICS = "_diagnostics.arrow"
SUCCESS = "_SUCCESS"
FORMAT_VERSION = 1
#: run-scoped prefixes of job outputs
RUNS = "runs"
CELLS = "cells"
ANALYSIS = "analysis"
#: reserved inside a run prefix for engine checkpoints (never listed in the manifest)
CHECKPOINT = "_checkpoint"
_CHUNK = 8 << 20


class VerifyError(OutputError):
    """A written output does not match its manifest."""


#: a run id is one path segment: letters, digits, ``._-``, starting with a letter or digit, no ``..``
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN_ID_RULE = ("letters, digits, '.', '_' or '-' (at most 128), starting with a letter or digit, "
                "without '..'")


def valid_run_id(run_id: Any) -> bool:
    return isinstance(run_id, str) and bool(RUN_ID.match(run_id)) and ".." not in run_id


def check_run_id(run_id: Any, what: str = "run id") -> str:
    """``run_id`` when it is a valid run id, else an :class:`InputError` naming ``what``."""
    if not valid_run_id(run_id):
        raise InputError(f"{what}: expected a run id of {_RUN_ID_RULE}")
    return run_id


def run_prefix(run_id: str) -> str:
    return f"{RUNS}/{check_run_id(run_id)}"


def below_root(rel: Any, url: str, what: str, allow_empty: bool = False) -> str:
    """``rel``, a path read from a commit record or a manifest, when it names something below the
    output root ``url``: relative, no URL scheme, no ``..`` leaving the root once normalised.
    Anything else is an :class:`OutputError` (``dmice verify``: exit 4)."""
    if allow_empty and rel == "":
        return rel
    ok = isinstance(rel, str) and rel and "://" not in rel and "\\" not in rel and "\0" not in rel
    if ok:
        norm = posixpath.normpath(rel)
        ok = not rel.startswith(("/", "~")) and norm not in (".", "..") and not norm.startswith("../")
    if not ok:
        shown = repr(rel)[:200] if isinstance(rel, str) else type(rel).__name__
        raise OutputError(f"{url!r}: {what} {shown} points outside the output")
    return rel


def remove_run_prefix(fs: Any, root: str, path: str) -> None:
    """Delete ``path`` recursively, refusing anything that is not one entry directly below
    ``runs/`` of the output root ``root`` (after normalisation, and on a local disk after
    resolving symbolic links): the only things a job run or ``vacuum`` deletes."""
    from fsspec.implementations.local import LocalFileSystem

    runs = posixpath.normpath(posixpath.join(root, RUNS))
    norm = posixpath.normpath(path)
    ok = posixpath.dirname(norm) == runs and posixpath.basename(norm) not in ("", ".", "..")
    if ok and isinstance(fs, LocalFileSystem):
        import os

        real_runs = os.path.realpath(runs)  # runs/ itself no link out of the root, nor the entry
        ok = (real_runs == os.path.join(os.path.realpath(root), RUNS)
              and os.path.dirname(os.path.realpath(norm)) == real_runs)
    if not ok:
        raise OutputError(f"refusing to delete {path!r}: a run deletes only entries directly below "
                          f"{RUNS}/ of its output")
    fs.rm(norm, recursive=True)


def sha256_file(fs: Any, path: str) -> str:
    """SHA-256 of a file, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def put_bytes(fs: Any, path: str, data: bytes) -> dict[str, Any]:
    """Write ``data`` as one object; returns its size and SHA-256."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _replace_atomically(fs: Any, path: str, data: bytes) -> None:
    """Replace one small object so that readers see the old or the new content, never a mix.

    A PUT of a single object is atomic on object stores; on a local disk the bytes go to a
    temporary file that is renamed over the target.
    """
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def part_path(root: str, k: int, i: int) -> str:
    return posixpath.join(root, f"imputation={k}", f"part.{i}.parquet")


def cells_path(root: str, j: int, i: int) -> str:
    return posixpath.join(root, CELLS, f"var={j}", f"part.{i}.parquet")


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(_to_table(df), buf)
    return buf.getvalue()


def _to_table(df: pd.DataFrame) -> pa.Table:
    keep_index = any(n is not None for n in df.index.names)
    return pa.Table.from_pandas(df, preserve_index=keep_index)


def write_partition(df: pd.DataFrame, block: Any, plan: Any, url: str, i: int,
                    storage_options: dict[str, Any] | None, prefix: str = "") -> list[dict[str, Any]]:
    """Write partition ``i`` of every imputation below ``url/prefix``; returns the files written
    (path relative to ``url``, rows, bytes, sha256)."""
    from dmice.block import complete_partition

    fs, root = filesystem(url, storage_options)
    base = posixpath.join(root, prefix) if prefix else root
    files = []
    for c in range(plan.m):
        out = complete_partition(df, block, plan, c)
        for j, rows in block.mis.items():
            check_filled(out[plan.variables[j].name].iloc[rows], plan.variables[j].name, c + 1, i)
        path = part_path(base, c + 1, i)
        info = put_bytes(fs, path, _parquet_bytes(out))
        files.append({"path": posixpath.relpath(path, root), "imputation": c + 1, "partition": i,
                      "rows": len(out), **info})
    return files


def check_filled(values: pd.Series, name: str, k: int, i: int) -> None:
    """Refuse to write imputed cells (``values``) of which some are missing: a bug guard, since
    every imputed cell must hold a value of its column's dtype."""
    bad = int(values.isna().sum())
    if bad:
        raise OutputError(f"{bad} of {len(values)} imputed cells of column {name!r} in imputation {k}, "
                          f"partition {i} are missing after imputation; this is a bug in dmice, please "
                          "report it (nothing was committed)")


def write_cells_partition(df: pd.DataFrame, block: Any, plan: Any, url: str, i: int,
                          storage_options: dict[str, Any] | None, prefix: str = "",
                          offset: int = 0) -> list[dict[str, Any]]:
    """Write the imputed cells of partition ``i``: one file per imputed variable ``j`` with
    columns ``row`` (position in the input snapshot), ``imputation`` (1..m) and ``value`` (in
    the column's own dtype, so a completed set is exactly what the full layout holds)."""
    from dmice.schema import conform, from_codes

    fs, root = filesystem(url, storage_options)
    base = posixpath.join(root, prefix) if prefix else root
    files = []
    for j, rows in sorted(block.mis.items()):
        if not len(rows):
            continue
        v = plan.variables[j]
        col = conform(df[[v.name]], [v])[v.name]  # categorical: the categories of every partition
        values = pd.concat([from_codes(block.imp[j][c], v, col) for c in range(plan.m)],
                           ignore_index=True)
        for c in range(plan.m):
            check_filled(values.iloc[c * len(rows):(c + 1) * len(rows)], v.name, c + 1, i)
        rows = np.asarray(rows, dtype=np.int64)
        cells = pd.DataFrame({
            "row": np.tile(rows + offset, plan.m),
            "imputation": np.repeat(np.arange(1, plan.m + 1, dtype=np.int16), len(rows)),
            "value": values})
        path = cells_path(base, j, i)
        info = put_bytes(fs, path, _parquet_bytes(cells))
        files.append({"path": posixpath.relpath(path, root), "variable": v.name, "partition": i,
                      "rows": len(cells), **info})
    return files


def fill_cells(df: pd.DataFrame, cells: dict[str, pd.DataFrame], offset: int) -> pd.DataFrame:
    """Partition ``df`` of the input with the given cells (``row``, ``value``) filled in, the
    same way :func:`dmice.block.complete_partition` fills them."""
    out = df.copy(deep=False)  # the filled columns are new Series; the others are shared
    for name, c in cells.items():
        if not len(c):
            continue
        col = out[name]
        vals = c["value"]
        if str(vals.dtype) != str(col.dtype):
            vals = vals.astype(col.dtype)
        s = col.copy()
        rows = c["row"].to_numpy(dtype=np.int64) - offset
        s.iloc[rows] = vals.to_numpy() if not isinstance(col.dtype, pd.CategoricalDtype) else vals.values
        out[name] = s
    return out


def _entries(fs: Any, root: str) -> list[str]:
    return fs.ls(root, detail=False) if fs.exists(root) else []


def check_target(url: str, storage_options: dict[str, Any] | None, overwrite: bool) -> bool:
    """Refuse a non-empty target unless ``overwrite`` (nothing is changed); returns whether it
    holds anything.  Called before an imputation starts, so that a refusal costs nothing."""
    fs, root = filesystem(url, storage_options)
    entries = _entries(fs, root)
    if entries and not overwrite:
        raise OutputError(f"output {url!r} exists and is not empty ({len(entries)} entries); "
                          "pass overwrite=True (--overwrite) to replace it")
    return bool(entries)


def _sibling(fs: Any, root: str, kind: str) -> str:
    parent, base = posixpath.dirname(root), posixpath.basename(root)
    if not parent or not base or parent == root:
        raise OutputError(f"cannot replace {root!r} atomically: it has no parent directory to stage "
                          "the new output in; write into a sub-directory")
    # dot-prefixed: dask's read_parquet of the parent and dmice's input listing skip it
    return posixpath.join(parent, f".{base}.dmice-{kind}-{uuid.uuid4().hex[:12]}")


def prepare(url: str, storage_options: dict[str, Any] | None, overwrite: bool) -> str:
    """Where to write an output for ``url``: ``url`` itself when it is absent or empty, else (with
    ``overwrite``; refused without) a new directory beside it, which :func:`replace` moves into
    place once the new output is complete and :func:`discard` removes after a failed write.
    The old output stays complete and readable until then."""
    fs, root = filesystem(url, storage_options)
    if not check_target(url, storage_options, overwrite):
        fs.makedirs(root, exist_ok=True)
        return url
    staged = _sibling(fs, root, "new")
    fs.makedirs(staged, exist_ok=True)
    return fs.unstrip_protocol(staged)


def discard(staged_url: str, storage_options: dict[str, Any] | None) -> None:
    """Remove the staging directory of a failed overwrite (best effort: the error that made the
    write fail is the one to report)."""
    fs, staged = filesystem(staged_url, storage_options)
    try:
        if fs.exists(staged):
            fs.rm(staged, recursive=True)
    except OSError:
        pass


def replace(staged_url: str, url: str, storage_options: dict[str, Any] | None) -> None:
    """Replace the output at ``url`` by the complete output staged at ``staged_url``.

    On a local disk: two renames (old output aside, new one into place), then the old output is
    deleted; a reader sees the old output, the new one, or (for the instant between the renames)
    no output, never a mix.  On object stores, which cannot rename: the old ``_SUCCESS`` is
    removed first (readers stop trusting the old output), the old objects are deleted, the new
    ones copied in (server-side) and ``_SUCCESS`` last; if that copy fails the error names the
    staging URL, where the new output is still complete.
    """
    from fsspec.implementations.local import LocalFileSystem

    fs, root = filesystem(url, storage_options)
    _, staged = filesystem(staged_url, storage_options)
    if isinstance(fs, LocalFileSystem):
        import os
        import shutil

        old = _sibling(fs, root, "old")
        os.rename(root, old)
        try:
            os.rename(staged, root)
        except BaseException:
            os.rename(old, root)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        marker = posixpath.join(root, SUCCESS)
        if fs.exists(marker):
            fs.rm(marker)
        for e in _entries(fs, root):
            fs.rm(e, recursive=True)
        files = sorted(fs.find(staged))
        last = posixpath.join(staged, SUCCESS)
        for p in [f for f in files if f != last] + [last]:
            fs.copy(p, posixpath.join(root, posixpath.relpath(p, staged)))
    except Exception as e:
        raise OutputError(f"replacing {url!r} failed ({type(e).__name__}); the new output is complete "
                          f"at {staged_url!r}") from e
    fs.rm(staged, recursive=True)


def commit(url: str, storage_options: dict[str, Any] | None, manifest: dict[str, Any],
           run_id: str | None = None) -> None:
    """Write the manifest, then the commit marker.

    Without ``run_id``: ``_manifest.json`` at the root and an empty ``_SUCCESS``.  With it: the
    manifest inside ``runs/<run_id>/`` and a ``_SUCCESS`` naming it with its SHA-256, replaced
    atomically (the single commit point of a run).
    """
    fs, root = filesystem(url, storage_options)
    data = json.dumps(manifest, indent=1, default=str).encode()
    if run_id is None:
        with fs.open(posixpath.join(root, MANIFEST), "wb") as f:
            f.write(data)
        with fs.open(posixpath.join(root, SUCCESS), "w") as f:
            f.write("")
        return
    rel = posixpath.join(run_prefix(run_id), MANIFEST)
    put_bytes(fs, posixpath.join(root, rel), data)
    pointer = {"run_id": run_id, "manifest": rel, "sha256": hashlib.sha256(data).hexdigest()}
    _replace_atomically(fs, posixpath.join(root, SUCCESS), json.dumps(pointer).encode())


def read_pointer(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The content of ``_SUCCESS``: ``None`` when absent, ``{}`` for an output written
    without a run prefix, else ``{"run_id", "manifest", "sha256"}``."""
    fs, root = filesystem(url, storage_options)
    try:
        raw = fs.cat_file(posixpath.join(root, SUCCESS))
    except FileNotFoundError:
        return None
    if not raw.strip():
        return {}
    try:
        pointer = json.loads(raw)
    except ValueError:
        raise OutputError(f"{url!r}: {SUCCESS} is neither empty nor a dmice commit record") from None
    if not isinstance(pointer, dict) or not {"run_id", "manifest", "sha256"} <= set(pointer):
        raise OutputError(f"{url!r}: {SUCCESS} is neither empty nor a dmice commit record")
    if not valid_run_id(pointer["run_id"]):
        raise OutputError(f"{url!r}: {SUCCESS} names an invalid run id (expected {_RUN_ID_RULE})")
    below_root(pointer["manifest"], url, f"the manifest named by {SUCCESS}")
    return pointer


def check_manifest_paths(url: str, man: dict[str, Any]) -> dict[str, Any]:
    """``man`` when every path it names lies below the output root (and every input file below
    the input snapshot's URL); else an :class:`OutputError`."""
    for key in ("files", "aux_files"):
        for i, f in enumerate(man.get(key) or []):
            below_root(f.get("path") if isinstance(f, dict) else f, url, f"{key}[{i}]")
    for key in ("data_prefix", "state"):
        if man.get(key):
            below_root(man[key], url, key)
    for i, a in enumerate(man.get("analysis") or []):
        for key in ("csv", "json"):
            if isinstance(a, dict) and a.get(key):
                below_root(a[key], url, f"analysis[{i}].{key}")
    snap = man.get("input_snapshot") or {}
    for i, f in enumerate(snap.get("files") or []):
        below_root(f.get("path") if isinstance(f, dict) else f, url, f"input_snapshot.files[{i}]",
                   allow_empty=True)
    return man


#: ``vacuum``'s default: uncommitted run prefixes are kept while anything in them is younger
#: than this many hours (a run still writing is never removed; Delta Lake's VACUUM keeps 7 days too)
VACUUM_RETAIN_HOURS = 168.0


def _modified(fs: Any, info: dict[str, Any]) -> float:
    """Last modification of a listed file, as POSIX seconds."""
    import datetime as _dt

    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)).timestamp()
        if isinstance(v, str) and v:
            try:
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
    m = fs.modified(info["name"])
    return (m if m.tzinfo else m.replace(tzinfo=_dt.timezone.utc)).timestamp()


def vacuum(url: str, storage_options: dict[str, Any] | None = None,
           retain_hours: float = VACUUM_RETAIN_HOURS, dry_run: bool = False,
           now: float | None = None) -> list[dict[str, Any]]:
    """Remove what killed or superseded job runs left below ``runs/``.

    Every prefix ``runs/<name>/`` but the committed run's (named by ``_SUCCESS``) is removed
    when its newest file is older than ``retain_hours``: uncommitted attempts of killed runs,
    and checkpoints of runs never retried.  Younger prefixes are kept, since a run may still
    be writing them (or a retry may resume from its checkpoint).  The committed run and the
    files outside ``runs/`` are never touched, and nothing is removed while a run holds the
    output's lock (:class:`LockedError`).  Returns one record per uncommitted prefix:
    ``prefix``, ``files``, ``bytes``, ``newest`` (POSIX seconds), ``expired`` (older than
    ``retain_hours``) and ``removed`` (expired, and not ``dry_run``).
    """
    if not retain_hours >= 0:
        raise InputError(f"retain_hours must be a number of hours >= 0, got {retain_hours!r}")
    fs, root = filesystem(url, storage_options)
    if not fs.exists(posixpath.join(root, RUNS)):
        read_pointer(url, storage_options)  # raises on a _SUCCESS that is not dmice's
        return []
    if dry_run:
        return _vacuum(url, storage_options, retain_hours, dry_run, now)
    # no run may start (or resume a checkpoint), or commit, while prefixes are removed
    with output_lock(url, storage_options, "vacuum"):
        return _vacuum(url, storage_options, retain_hours, dry_run, now)


def _vacuum(url: str, storage_options: dict[str, Any] | None, retain_hours: float, dry_run: bool,
            now: float | None) -> list[dict[str, Any]]:
    import time

    fs, root = filesystem(url, storage_options)
    pointer = read_pointer(url, storage_options)  # raises on a _SUCCESS that is not dmice's
    committed = pointer.get("run_id") if pointer else None
    runs = posixpath.join(root, RUNS)
    now = time.time() if now is None else now
    out = []
    for entry in sorted(fs.ls(runs, detail=False)):
        name = posixpath.basename(entry.rstrip("/"))
        if name == committed:
            continue
        files = fs.find(entry, detail=True) if fs.isdir(entry) else {entry: fs.info(entry)}
        infos = list(files.values())
        newest = max((_modified(fs, i) for i in infos), default=0.0)
        old = now - newest > retain_hours * 3600.0
        rec = {"prefix": f"{RUNS}/{name}", "files": len(infos),
               "bytes": int(sum(i.get("size") or 0 for i in infos)), "newest": newest,
               "expired": bool(old), "removed": bool(old and not dry_run)}
        if rec["removed"]:
            remove_run_prefix(fs, root, entry)
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# one run per output: the lock
#
#   <output>/_LOCK   {"run_id", "host", "pid", "started", "heartbeat", "ttl", "token"}
#
# Created atomically: a hard link of a complete temporary file on a local disk (fails if the lock
# exists), a conditional PUT (If-None-Match: *) on S3, mode "xb" elsewhere.  A heartbeat rewrites
# it every ttl/4 seconds while the run lives; a lock whose heartbeat is older than its ttl, or whose
# process no longer exists on this host, is stale and broken by the next run.

LOCK = "_LOCK"
#: the time to live of a lock whose record names none (:func:`lock_ttl` gives a new lock's)
LOCK_TTL = 600.0


class LockedError(OutputError):
    """Another run holds the output's lock (``dmice run``: exit 3)."""


def lock_ttl() -> float:
    """Seconds without a heartbeat after which a lock is stale: ``DMICE_LOCK_TTL``, else dask
    config ``dmice.lock.ttl`` (600 s)."""
    import os

    from dmice import config

    raw = os.environ.get("DMICE_LOCK_TTL")
    if raw is None:
        return config.get("lock.ttl")
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not ttl > 0:
        raise InputError("DMICE_LOCK_TTL: expected a number of seconds > 0")
    return ttl


def _utc(t: Any) -> str:
    import datetime as _dt

    try:
        return _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "at an unknown time"


def _pid_alive(pid: Any) -> bool:
    import os

    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _read_lock(fs: Any, path: str) -> dict[str, Any] | None:
    """The lock record, ``None`` when there is no lock; an unreadable lock is returned as a record
    of an unknown run whose heartbeat is the file's modification time."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(raw)
        if isinstance(rec, dict):
            return rec
    except ValueError:
        pass
    try:
        mtime = _modified(fs, fs.info(path))
    except FileNotFoundError:
        return None
    return {"run_id": "(unreadable lock)", "started": mtime, "heartbeat": mtime}


def _stale(rec: dict[str, Any], now: float) -> str | None:
    """Why the lock ``rec`` is stale, or ``None`` while it is held."""
    import socket

    if rec.get("host") == socket.gethostname() and rec.get("pid") is not None and not _pid_alive(rec["pid"]):
        return f"its process {rec['pid']} on this host no longer exists"
    try:
        ttl = float(rec.get("ttl", LOCK_TTL))
        age = now - float(rec.get("heartbeat"))
    except (TypeError, ValueError):
        return None
    if age > ttl:
        return f"no heartbeat for {age:.0f} s, longer than its TTL of {ttl:g} s"
    return None


def _create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists (``FileExistsError``).  Returns whether the
    file system made that atomic; where it cannot (a file system without exclusive create), an
    existence check precedes the write and a warning is logged."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        import os

        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # atomic, and the lock is complete the moment it exists
        finally:
            os.unlink(tmp)
        return True
    try:
        with fs.open(path, "xb") as f:  # s3fs: PUT with If-None-Match: *
            f.write(data)
        return True
    except (ValueError, NotImplementedError, TypeError):
        pass
    import logging

    logging.getLogger("dmice").warning("%s cannot create files exclusively; the output lock is "
                                       "checked, then written (not atomic)", type(fs).__name__)
    if fs.exists(path):
        raise FileExistsError(path)
    with fs.open(path, "wb") as f:
        f.write(data)
    return False


class OutputLock:
    """The lock of one output, held by this process: refreshed by a heartbeat thread until
    :meth:`release`."""

    def __init__(self, fs: Any, path: str, url: str, record: dict[str, Any], atomic: bool):
        import threading

        self.fs, self.path, self.url, self.record, self.atomic = fs, path, url, record, atomic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dmice-lock-heartbeat", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """Whether the lock on storage is still this one."""
        rec = _read_lock(self.fs, self.path)
        return bool(rec) and rec.get("token") == self.record["token"]

    def _beat(self) -> None:
        import logging
        import time

        interval = max(0.05, self.record["ttl"] / 4)
        while not self._stop.wait(interval):
            try:
                if not self.held():
                    logging.getLogger("dmice").error("the lock of %s was taken over by another run",
                                                     self.url)
                    return
                self.record["heartbeat"] = time.time()
                _replace_atomically(self.fs, self.path, json.dumps(self.record).encode())
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the TTL is the margin
                logging.getLogger("dmice").warning("lock heartbeat of %s failed (%s)", self.url,
                                                   type(e).__name__)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still this one."""
        self._stop.set()
        self._thread.join()
        try:
            if self.held():
                self.fs.rm(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire_lock(url: str, storage_options: dict[str, Any] | None, run_id: str,
                 ttl: float | None = None) -> OutputLock:
    """Take the lock of the output ``url`` for the run ``run_id``, breaking a stale one.

    Raises
    ------
    LockedError
        Another run holds it: the message names that run, its host and process, and when it
        started and last beat.
    """
    import logging
    import os
    import secrets
    import socket
    import time

    ttl = lock_ttl() if ttl is None else float(ttl)
    fs, root = filesystem(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, LOCK)
    now = time.time()
    record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": now,
              "heartbeat": now, "ttl": ttl, "token": secrets.token_hex(16)}
    other: dict[str, Any] | None = None
    for _ in range(3):
        try:
            atomic = _create_exclusive(fs, path, json.dumps(record).encode())
            return OutputLock(fs, path, url, record, atomic)
        except FileExistsError:
            pass
        other = _read_lock(fs, path)
        if other is None:
            continue  # released meanwhile
        why = _stale(other, time.time())
        if why is None:
            break
        logging.getLogger("dmice").warning("breaking the stale lock of run %r on %s: %s",
                                           str(other.get("run_id")), url, why)
        again = _read_lock(fs, path)
        if again is not None and again.get("token") == other.get("token"):
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
    other = other or {}
    lock_url = posixpath.join(url.rstrip("/"), LOCK)
    raise LockedError(
        f"output.url: {url!r} is locked by run {str(other.get('run_id', '?'))!r} (host "
        f"{other.get('host', '?')}, pid {other.get('pid', '?')}), started {_utc(other.get('started'))}, "
        f"last heartbeat {_utc(other.get('heartbeat'))}; one run per output at a time.  A lock "
        f"without a heartbeat for {float(other.get('ttl', ttl)):g} s is stale and broken by the next "
        f"run; if that run is dead, delete {lock_url} to break it now")


def output_lock(url: str, storage_options: dict[str, Any] | None, run_id: str,
                ttl: float | None = None) -> OutputLock:
    """:func:`acquire_lock` as a context manager: released when the block ends, however."""
    return acquire_lock(url, storage_options, run_id, ttl)


def write_diagnostics(url: str, storage_options: dict[str, Any] | None, chain_stats: pd.DataFrame,
                      prefix: str = "") -> dict[str, Any]:
    """Chain statistics (mean/sd or level proportions per variable, iteration and chain);
    returns the file written (path relative to ``url``, bytes, sha256)."""
    fs, root = filesystem(url, storage_options)
    buf = io.BytesIO()
    feather.write_feather(pa.Table.from_pandas(chain_stats, preserve_index=False), buf)
    rel = posixpath.join(prefix, DIAGNOSTICS) if prefix else DIAGNOSTICS
    return {"path": rel, **put_bytes(fs, posixpath.join(root, rel), buf.getvalue())}


def read_diagnostics(url: str, storage_options: dict[str, Any] | None = None,
                     prefix: str = "") -> pd.DataFrame:
    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, prefix, DIAGNOSTICS) if prefix else posixpath.join(root, DIAGNOSTICS)
    if not fs.exists(path):
        return pd.DataFrame()
    with fs.open(path, "rb") as f:
        return feather.read_table(f).to_pandas()


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a complete output; refuses outputs without the commit marker."""
    fs, root = filesystem(url, storage_options)
    pointer = read_pointer(url, storage_options)
    if pointer is None:
        raise OutputError(f"{url!r} is not a complete dmice output (no {SUCCESS} marker)")
    if not pointer:
        with fs.open(posixpath.join(root, MANIFEST), "r") as f:
            return check_manifest_paths(url, json.load(f))
    try:
        data = fs.cat_file(posixpath.join(root, pointer["manifest"]))
    except FileNotFoundError:
        raise OutputError(f"{url!r}: the manifest {pointer['manifest']!r} named by {SUCCESS} "
                          "is missing") from None
    if hashlib.sha256(data).hexdigest() != pointer["sha256"]:
        raise OutputError(f"{url!r}: the manifest {pointer['manifest']!r} does not match the "
                          f"checksum in {SUCCESS}")
    return check_manifest_paths(url, json.loads(data))


def verify(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file of a complete output against its manifest (presence, size, SHA-256).

    For the ``cells`` layout the input snapshot it refers to is checked too.  Files inside the
    run prefix that the manifest does not list are reported (checkpoints excepted).

    Returns
    -------
    dict
        The manifest, when everything matches.

    Raises
    ------
    VerifyError
        Naming the first bad file and what is wrong with it, and how many are bad.
    """
    try:
        man = read_manifest(url, storage_options)
    except OutputError as e:
        raise VerifyError(str(e)) from None
    fs, root = filesystem(url, storage_options)
    listed = list(man.get("files", [])) + list(man.get("aux_files", []))
    problems = []
    for f in listed:
        if "sha256" not in f:
            problems.append(f"{f['path']}: no checksum in the manifest")
            continue
        problems += _check_file(fs, root, f["path"], f, label=f["path"])
    prefix = man.get("data_prefix", "")
    if prefix:
        known = {posixpath.join(root, f["path"]) for f in listed}
        known.add(posixpath.join(root, prefix, MANIFEST))
        ignore = posixpath.join(root, prefix, CHECKPOINT) + "/"
        for p in fs.find(posixpath.join(root, prefix)):
            if p not in known and not p.startswith(ignore):
                problems.append(f"{posixpath.relpath(p, root)}: not listed in the manifest")
    if not problems:
        problems += _unfilled(fs, root, man)
    snap = man.get("input_snapshot")
    if man.get("layout") == "cells" and snap:
        ifs, iroot = filesystem(snap["url"], storage_options)
        for f in snap["files"]:
            p = f["path"] or posixpath.basename(iroot)
            problems += _check_file(ifs, iroot, f["path"], f, label=f"input file {p}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerifyError(f"{url!r}: {problems[0]}{more}")
    return man


def _null_count(fs: Any, path: str, column: str) -> int:
    """Missing values of one column of a Parquet file: from the row groups' statistics when every
    one has a null count, else by reading the column."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if column not in names:
            return -1
        md = pf.metadata
        idx = [i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] == column]
        stats = [md.row_group(r).column(i).statistics for r in range(md.num_row_groups) for i in idx]
        if len(idx) == 1 and all(st is not None and st.has_null_count for st in stats):
            return int(sum(st.null_count for st in stats))
        return int(pf.read(columns=[column]).column(0).null_count)


def _unfilled(fs: Any, root: str, man: dict[str, Any]) -> list[str]:
    """Data files whose imputed columns (layout ``full``) or imputed cells (``cells``) hold missing
    values: the manifest says every missing cell of those columns was imputed."""
    method, n_missing = man.get("method") or {}, man.get("n_missing") or {}
    imputed = [c for c in man.get("columns", []) if method.get(c) and n_missing.get(c, 0)]
    problems = []
    for f in man.get("files", []):
        path = posixpath.join(root, f["path"])
        cols = ["value"] if "variable" in f else imputed if "imputation" in f else []
        for col in cols:
            bad = _null_count(fs, path, col)
            name = f.get("variable", col)
            if bad < 0:
                problems.append(f"{f['path']}: no column {col!r}")
            elif bad:
                problems.append(f"{f['path']}: {bad} missing values in imputed column {name!r}, whose "
                                f"{n_missing.get(name, 0)} missing cells the manifest says were imputed")
    return problems


def _check_file(fs: Any, root: str, rel: str, entry: dict[str, Any], label: str) -> list[str]:
    path = posixpath.join(root, rel) if rel else root
    try:
        size = int(fs.size(path))
    except FileNotFoundError:
        return [f"{label}: missing"]
    if size != entry["bytes"]:
        return [f"{label}: {size} bytes, the manifest says {entry['bytes']}"]
    if sha256_file(fs, path) != entry["sha256"]:
        return [f"{label}: checksum differs from the manifest"]
    return []


# ---------------------------------------------------------------------------------------------
# input of a job: a snapshot of files read one partition per file

_HIVE = re.compile(r"^[^=/]+=[^/]*$")
INPUT_SUFFIXES = {"parquet": (".parquet", ".parq", ".pq"), "csv": (".csv", ".csv.gz", ".tsv")}


def list_input(url: str, fmt: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Data files of an input URL (a file or a directory), sorted: ``path`` relative to the URL
    (``""`` for a single file) and ``bytes``.  Names starting with ``_`` or ``.`` are skipped."""
    fs, root = filesystem(url, storage_options)
    if not fs.exists(root):
        raise InputError(f"input.url: {url!r} does not exist")
    if fs.isfile(root):
        return [{"path": "", "bytes": int(fs.size(root))}]
    out = []
    for p, info in sorted(fs.find(root, detail=True).items()):
        rel = posixpath.relpath(p, root)
        parts = rel.split("/")
        if any(q.startswith(("_", ".")) for q in parts) or info.get("type") == "directory":
            continue
        if not rel.endswith(INPUT_SUFFIXES[fmt]):
            continue
        if any(_HIVE.match(q) for q in parts[:-1]):
            raise InputError(f"input.url: {url!r} holds key=value subdirectories; point the URL at "
                             "one leaf directory (its partition values would not be columns)")
        out.append({"path": rel, "bytes": int(info["size"])})
    if not out:
        raise InputError(f"input.url: no {fmt} files found at {url!r} (expected names ending with "
                         f"{' or '.join(INPUT_SUFFIXES[fmt])})")
    return out


def snapshot_input(url: str, fmt: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The input files with size and SHA-256, and one checksum over all of them."""
    fs, root = filesystem(url, storage_options)
    files = list_input(url, fmt, storage_options)
    for f in files:
        f["sha256"] = sha256_file(fs, posixpath.join(root, f["path"]) if f["path"] else root)
    whole = hashlib.sha256(json.dumps([[f["path"], f["bytes"], f["sha256"]] for f in files]).encode())
    return {"url": url, "format": fmt, "files": files, "sha256": whole.hexdigest()}


def _normalise(df: pd.DataFrame, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        # a CSV column of integers may hold gaps in another file: keep it integer and nullable
        for c in df.columns:
            if pd.api.types.is_integer_dtype(df[c].dtype) and not isinstance(df[c].dtype, pd.Int64Dtype):
                df[c] = df[c].astype("Int64")
    return df


def _csv_sep(name: str) -> str:
    """The field separator of a CSV input file: tabs for ``.tsv`` (and ``.tsv.gz``), else commas."""
    return "\t" if name.endswith((".tsv", ".tsv.gz")) else ","


def _csv_meta(fs: Any, path: str) -> pd.DataFrame:
    """Empty frame with the columns and dtypes of a CSV file, from its first 1000 rows."""
    with fs.open(path, "rb", compression="gzip" if path.endswith(".gz") else None) as f:
        head = pd.read_csv(f, sep=_csv_sep(path), nrows=1000)
    return _normalise(head, "csv").head(0)


def _parse(data: bytes, rel: str, fmt: str, nrows: int | None = None) -> pd.DataFrame:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)).to_pandas()
    comp = "gzip" if rel.endswith(".gz") else None
    return pd.read_csv(io.BytesIO(data), sep=_csv_sep(rel), compression=comp, nrows=nrows)


def input_meta(url: str, fmt: str, first: str, storage_options: dict[str, Any] | None) -> pd.DataFrame:
    """Empty frame with the columns and dtypes of the input (from its first file)."""
    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, first) if first else root
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).empty_table().to_pandas()
    return _csv_meta(fs, path)


def read_input_file(url: str, rel: str, fmt: str, storage_options: dict[str, Any] | None,
                    sha256: str | None, dtypes: dict[str, str]) -> pd.DataFrame:
    """One input file as a partition; refuses a file whose checksum is not ``sha256``."""
    fs, root = filesystem(url, storage_options)
    data = fs.cat_file(posixpath.join(root, rel) if rel else root)
    name = rel or posixpath.basename(root)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise InputError(f"input file {name!r} changed since its snapshot was taken (checksum differs)")
    return coerce_columns(_normalise(_parse(data, rel or url, fmt), fmt), dtypes, name)


def coerce_columns(df: pd.DataFrame, dtypes: dict[str, str], name: str) -> pd.DataFrame:
    """``df``, read from the input file ``name``, with the columns and dtypes of the first input
    file; an :class:`InputError` naming the column and the file (never a value) otherwise."""
    if [str(c) for c in df.columns] != list(dtypes):
        raise InputError(f"input file {name!r} has other columns than the first input file")
    for c, dt in dtypes.items():
        if dt != "category" and str(df[c].dtype) != dt:
            if dt == "bool" and df[c].isna().any():
                # astype(bool) would read a missing cell as True
                raise InputError(f"column {c!r} of input file {name!r} has missing values, but is "
                                 "boolean without any in the first input file")
            try:
                df[c] = df[c].astype(dt)
            except (TypeError, ValueError):
                raise InputError(f"column {c!r} of input file {name!r} cannot be read as {dt}, the "
                                 "dtype of its first rows in the first input file") from None
    return df


def parse_csv_block(data: bytes, header: bytes | None, name: str, dtypes: dict[str, str]) -> pd.DataFrame:
    """One block of a CSV file (``header``: the file's first line, for blocks after the first)
    with the first file's columns and dtypes (:func:`coerce_columns`)."""
    try:
        df = pd.read_csv(io.BytesIO(data if header is None else header + data), sep=_csv_sep(name))
    except (ValueError, pd.errors.ParserError) as e:
        raise InputError(f"input file {name!r} cannot be read as CSV ({type(e).__name__})") from None
    return coerce_columns(_normalise(df, "csv"), dtypes, name)


def read_csv(urlpath: str, storage_options: dict[str, Any] | None = None,
             blocksize: int = 64 << 20) -> Any:
    """CSV files (a path, a glob or a directory) as a dask DataFrame, in blocks of ``blocksize``
    bytes (whole files when compressed), every block read with the columns and dtypes of the
    first file (integer columns nullable, as ``dmice run`` reads them).  A file that does not
    fit is an :class:`InputError` naming the column and the file when its block is read."""
    import dask.dataframe as dd
    from dask import delayed
    from dask.bytes import read_bytes

    fs, path = fsspec.core.url_to_fs(urlpath, **(storage_options or {}))
    if fsspec.core.has_magic(path):
        files = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        files = [p["path"] for p in list_input(urlpath, "csv", storage_options)]
        files = [posixpath.join(path.rstrip("/"), p) for p in files]
    else:
        files = [path] if fs.exists(path) else []
    if not files:
        raise InputError(f"input: no file found at {urlpath!r}")
    meta = _csv_meta(fs, files[0])
    dtypes = {str(c): str(t) for c, t in meta.dtypes.items()}
    parts = []
    for p in files:
        name = posixpath.basename(p)
        gz = p.endswith(".gz")
        with fs.open(p, "rb", compression="gzip" if gz else None) as f:
            header = f.readline()
        _, blocks = read_bytes(fs.unstrip_protocol(p), delimiter=b"\n", blocksize=None if gz else blocksize,
                               sample=False, compression="gzip" if gz else None,
                               **(storage_options or {}))
        for i, b in enumerate(blocks[0]):
            parts.append(delayed(parse_csv_block)(b, None if i == 0 else header, name, dtypes))
    return dd.from_delayed(parts, meta=meta, verify_meta=False)


def complete_cells_partition(item: tuple[dict[str, Any], list[dict[str, Any]]], url: str,
                             storage_options: dict[str, Any] | None, snapshot_url: str, fmt: str,
                             dtypes: dict[str, str], k: int,
                             categories: dict[str, Any] | None = None) -> pd.DataFrame:
    """Imputation ``k`` of one partition of a ``cells`` output: the input file (``item[0]``, an
    entry of the snapshot, checked against its checksum) with the imputed cells of the files
    ``item[1]`` (manifest entries of that partition) filled in."""
    f, entries = item
    df = read_input_file(snapshot_url, f["path"], fmt, storage_options, f["sha256"], dtypes)
    df = restore_dtypes(df, {}, categories)
    return fill_cells(df, read_cells(url, storage_options, entries, k), f["offset"])


def cells_items(man: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Per partition of a ``cells`` output: its input file (an entry of the input snapshot)
    and the manifest entries of its cells files."""
    return [(f, [e for e in man["files"] if e["partition"] == i])
            for i, f in enumerate(man["input_snapshot"]["files"])]


def read_cells(url: str, storage_options: dict[str, Any] | None, entries: list[dict[str, Any]],
               k: int | None = None) -> dict[str, pd.DataFrame]:
    """The imputed cells (``row``, ``imputation``, ``value``) of each variable of the cells files
    ``entries`` (manifest entries): of imputation ``k`` only, or of all imputations."""
    fs, root = filesystem(url, storage_options)
    filters = None if k is None else [("imputation", "==", k)]
    cells = {}
    for entry in entries:
        with fs.open(posixpath.join(root, entry["path"]), "rb") as fh:
            cells[entry["variable"]] = pq.read_table(fh, filters=filters).to_pandas()
    return cells


def part_files(man: dict[str, Any], k: int) -> list[str] | None:
    """Paths (relative to the output root, as the manifest lists them) of the Parquet files of
    imputation ``k`` of a ``full`` output, in partition order; ``None`` when the manifest
    does not list one file per partition."""
    if man.get("layout", "full") != "full":
        return None
    by = {int(f["partition"]): f["path"] for f in man.get("files", []) if int(f["imputation"]) == k}
    if not by or set(by) != set(range(len(by))):
        return None
    return [by[i] for i in range(len(by))]


def read_part(rel: str, url: str, storage_options: dict[str, Any] | None, dtypes: dict[str, str],
              columns: list[str] | None = None) -> pd.DataFrame:
    """The ``columns`` (default: all) of one Parquet file of a ``full`` output (``rel``: its path
    in the manifest) with the dtypes recorded in the manifest, read by pyarrow directly."""
    fs, root = filesystem(url, storage_options)
    with fs.open(posixpath.join(root, rel), "rb") as f:
        table = pq.read_table(f, columns=None if columns is None else list(columns))
    # column by column, each Arrow buffer released once converted (no consolidating copy)
    df = table.to_pandas(split_blocks=True, self_destruct=True)
    df.index = pd.RangeIndex(len(df))
    return restore_dtypes(df, dtypes)


def part_meta(rel: str, url: str, storage_options: dict[str, Any] | None, dtypes: dict[str, str],
              columns: list[str]) -> pd.DataFrame:
    """Empty frame with the ``columns`` and dtypes of a file read by :func:`read_part`
    (categorical columns with unknown categories)."""
    fs, root = filesystem(url, storage_options)
    with fs.open(posixpath.join(root, rel), "rb") as f:
        meta = pq.read_schema(f).empty_table().to_pandas()
    from dask.dataframe.utils import clear_known_categories

    meta.index = pd.RangeIndex(0)
    # categories are known per file only (as dask's read_parquet says of them)
    return clear_known_categories(restore_dtypes(meta[columns], dtypes))


def restore_dtypes(df: pd.DataFrame, dtypes: dict[str, str],
                   categories: dict[str, Any] | None = None) -> pd.DataFrame:
    """Cast columns back to the dtypes recorded in the manifest where Parquet lost them;
    categorical columns to the categories recorded in the manifest (``categories``: column ->
    ``{"categories", "ordered"}``, every partition's categories), when they hold them all."""
    for col, spec in (categories or {}).items():
        if col in df.columns and isinstance(df[col].dtype, pd.CategoricalDtype):
            cats = list(spec["categories"])
            have = list(df[col].cat.categories)
            if have != cats and set(have) <= set(cats):
                df[col] = df[col].astype(pd.CategoricalDtype(cats, ordered=bool(spec["ordered"])))
    for col, dt in dtypes.items():
        if col in df.columns and str(df[col].dtype) != dt and dt != "category":
            try:
                df[col] = df[col].astype(dt)
            except (TypeError, ValueError):
                pass
    return df


# ---------------------------------------------------------------------------
# state of the chains: what continuing a run or resuming from a checkpoint needs
#
#   <dir>/part.N.npz     imputed cells of partition N: rows and values of every chain
#   <dir>/models.npz     Newton warm starts of the conditional models
#   <dir>/state.json     iteration, configuration hash, logged events
#   <dir>/chains.arrow   chain statistics so far
#
# Checkpoints keep one such directory per saved iteration under the checkpoint URL and a
# pointer, LATEST.json, rewritten (after the directory is complete) to name the newest.

STATE_DIR = "_state"
LATEST = "LATEST.json"


def write_state_partition(block: Any, url: str, i: int, storage_options: dict[str, Any] | None
                          ) -> dict[str, Any]:
    """Write the imputed cells of one block (runs on a worker); returns the file's manifest entry
    (path relative to ``url``, bytes, SHA-256)."""
    import io

    import numpy as np

    from dmice.block import cells

    fs, root = filesystem(url, storage_options)
    buf = io.BytesIO()
    np.savez(buf, **{k.replace("/", "_"): v for k, v in cells(block).items()})
    name = f"part.{i}.npz"
    return {"path": name, **put_bytes(fs, posixpath.join(root, name), buf.getvalue())}


def read_state_partition(url: str, i: int, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The imputed cells written by :func:`write_state_partition` (runs on a worker)."""
    import io

    import numpy as np

    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, f"part.{i}.npz")
    if not fs.exists(path):
        raise OutputError(f"state of partition {i} is missing under {url!r}")
    with fs.open(path, "rb") as f:
        z = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return {k.replace("_", "/", 1): z[k] for k in z.files}


def _split_state(obj: Any, path: str, arrays: dict[str, Any]) -> Any:
    """JSON-able copy of a nested state with its numpy arrays moved to ``arrays``."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _split_state(v, f"{path}__{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        arrays[path] = obj
        return {"__array__": path}
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def _join_state(obj: Any, arrays: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _join_state(v, arrays) for k, v in obj.items()}
    return obj


def write_state_meta(url: str, storage_options: dict[str, Any] | None, meta: dict[str, Any],
                     models: dict[str, Any], chain_stats: pd.DataFrame) -> list[dict[str, Any]]:
    """Client side of the state: model states (arrays in ``models.npz``), chain statistics, then
    ``state.json`` last.  Returns the files' manifest entries (paths relative to ``url``)."""
    import io

    import numpy as np

    fs, root = filesystem(url, storage_options)
    arrays: dict[str, Any] = {}
    skeleton = _split_state(models, "m", arrays)
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    arrow = io.BytesIO()
    feather.write_feather(pa.Table.from_pandas(chain_stats, preserve_index=False), arrow)
    state = json.dumps({**meta, "models": skeleton}, indent=1, default=str).encode()
    return [{"path": name, **put_bytes(fs, posixpath.join(root, name), data)}
            for name, data in (("models.npz", npz.getvalue()), ("chains.arrow", arrow.getvalue()),
                               ("state.json", state))]


def read_state_json(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The ``state.json`` of a state written by :func:`write_state_meta` (without its arrays)."""
    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, "state.json")
    if not fs.exists(path):
        raise OutputError(f"no stored chain state under {url!r}")
    with fs.open(path, "r") as f:
        return json.load(f)


def read_state_meta(url: str, storage_options: dict[str, Any] | None
                    ) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame]:
    """``(meta, models, chain_stats)`` as written by :func:`write_state_meta`."""
    import io

    import numpy as np

    meta = read_state_json(url, storage_options)
    fs, root = filesystem(url, storage_options)
    with fs.open(posixpath.join(root, "models.npz"), "rb") as f:
        z = np.load(io.BytesIO(f.read()), allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    models = _join_state(meta.pop("models"), arrays)
    with fs.open(posixpath.join(root, "chains.arrow"), "rb") as f:
        chains = feather.read_table(f).to_pandas()
    return meta, models, chains


def checkpoint_dir(url: str, iteration: int) -> str:
    return posixpath.join(url.rstrip("/"), f"iter={iteration:06d}")


def latest_checkpoint(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pointer to the newest complete checkpoint under ``url``, or None."""
    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, LATEST)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def publish_checkpoint(url: str, storage_options: dict[str, Any] | None, pointer: dict[str, Any]) -> None:
    """Point ``LATEST.json`` at a complete checkpoint directory (replacing it atomically), then
    drop older ones."""
    fs, root = filesystem(url, storage_options)
    # atomic: a run killed here, or a reader polling, sees the old pointer or the new one
    _replace_atomically(fs, posixpath.join(root, LATEST), json.dumps(pointer).encode())
    keep = posixpath.basename(pointer["dir"].rstrip("/"))
    for e in fs.ls(root, detail=False):
        name = posixpath.basename(e.rstrip("/"))
        if name.startswith("iter=") and name != keep:
            fs.rm(e, recursive=True)


def apply_state_partition(block: Any, plan: Any, url: str, i: int,
                          storage_options: dict[str, Any] | None) -> Any:
    """``block`` with the imputed cells stored for partition ``i`` (runs on a worker)."""
    from dmice.block import with_cells

    return with_cells(block, read_state_partition(url, i, storage_options), plan)


def incomplete_partition(df: pd.DataFrame, state_url: str, i: int, columns: list[str],
                         storage_options: dict[str, Any] | None) -> pd.DataFrame:
    """Partition ``i`` of the input as it was before imputation: completed data (``df``) with the
    imputed cells, as recorded in the stored state, missing again."""
    df = df[columns].copy()
    cells = read_state_partition(state_url, i, storage_options)
    for key, rows in cells.items():
        if key.startswith("mis/") and len(rows):
            col = columns[int(key[4:])]
            s = df[col].copy()
            s.iloc[rows] = None
            df[col] = s
    return df


# -- reading the m imputations of a partition together (the analysis's passes) -----------------
@dataclass(frozen=True)
class StoredPart:
    """One partition of one imputation of an output written by dmice (``full`` layout), read
    by the task that uses it (the analysis's design of a partition group) instead of by a dask
    task of its own:
    the m versions of a partition are read where they are designed, in one task, without
    moving frames between workers.

    ``shared`` names the columns that no imputation changes (the complete ones, which
    the manifest records as not imputed): a group reads them from its first
    imputation's file only.
    """

    url: str
    path: str  # relative to url, as listed in the manifest
    storage_options: dict[str, Any] | None
    dtypes: dict[str, str]
    shared: tuple[str, ...] = ()

    def read(self, columns: list[str] | None) -> pd.DataFrame:
        return read_part(self.path, self.url, self.storage_options, self.dtypes, columns)

    def onto(self, first: pd.DataFrame, first_path: str) -> tuple[pd.DataFrame, list[str]]:
        """This imputation's frame of the partition: ``first`` (the first imputation's, read
        from ``first_path``) with the columns this file does not share replaced by its own,
        which alone are read; and those columns."""
        mine = [c for c in first.columns if c not in self.shared]
        df = self.read(mine)
        if len(df) != len(first):
            raise InputError(f"the imputations' files {first_path!r} and {self.path!r} have "
                             "different numbers of rows")
        full = pd.DataFrame({c: (df if c in mine else first)[c].array for c in first.columns},
                            index=first.index, copy=False)  # no column copied
        return full, mine


@dataclass(frozen=True)
class CellsPart:
    """One partition of imputation ``k`` of a ``cells`` output: its input file (``item[0]``,
    an entry of the input snapshot) and the files of its imputed cells (``item[1]``).  The
    group of the m imputations reads the input file and each cells file once (see
    :func:`read_group`)."""

    item: tuple[dict[str, Any], list[dict[str, Any]]]
    k: int
    url: str
    storage_options: dict[str, Any] | None
    snapshot_url: str
    fmt: str
    dtypes: dict[str, str]


def read_cells_group(parts: tuple[CellsPart, ...], columns: list[str] | None
                      ) -> tuple[list[pd.DataFrame], list[str]]:
    """The m completed frames of one partition of a ``cells`` output: the input file read
    once (checked against its snapshot checksum), each variable's cells read once and
    filled in for every imputation."""
    first = parts[0]
    f, entries = first.item
    df = read_input_file(first.snapshot_url, f["path"], first.fmt, first.storage_options,
                               f["sha256"], first.dtypes)
    df = df if columns is None else df[columns]
    df.index = pd.RangeIndex(len(df))
    cells = read_cells(first.url, first.storage_options,
                             [e for e in entries if e["variable"] in df.columns])
    frames = []
    for p in parts:
        frames.append(fill_cells(df, {v: c[c["imputation"] == p.k] for v, c in cells.items()},
                                       int(f["offset"])))
    return frames, sorted(cells)


def read_group(parts: tuple[Any, ...], columns: list[str] | None
                ) -> tuple[list[pd.DataFrame], list[str] | None]:
    """The pandas frames of a group's parts (stored parts are read here) and the columns that
    can differ between them (``None``: any)."""
    if parts and isinstance(parts[0], CellsPart):
        return read_cells_group(parts, columns)
    if not parts or not isinstance(parts[0], StoredPart):
        return list(parts), None
    first = parts[0].read(columns)
    frames, own = [first], None
    for p in parts[1:]:
        full, own = p.onto(first, parts[0].path)
        frames.append(full)
    return frames, own


def stored_parts(url: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None, m: int,
                 columns: list[str], imputed: set[str], dtypes: dict[str, str]) -> list[list[Any]] | None:
    """The files of a written output by imputation and partition, to be read a partition group
    at a time (:func:`read_group`): :class:`StoredPart` of a ``full`` output, :class:`CellsPart`
    of a ``cells`` one; None when a ``full`` output does not hold one file per imputation and
    partition (read it through dask instead)."""
    man = manifest
    if man.get("layout") == "cells" and man.get("input_snapshot"):
        snap = man["input_snapshot"]
        items = cells_items(man)
        return [[CellsPart(item, k, url, storage_options, snap["url"], snap["format"], man["input_dtypes"])
                 for item in items] for k in range(1, m + 1)]
    files = [part_files(man, k) for k in range(1, m + 1)]
    if any(f is None or len(f) != len(files[0]) for f in files):
        return None
    shared = tuple(c for c in columns if c not in imputed)
    return [[StoredPart(url, rel, storage_options, dict(dtypes), shared if k > 0 else ()) for rel in f]
            for k, f in enumerate(files)]
