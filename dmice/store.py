"""What is written: the Parquet layout, the manifest and the commit marker.

::

    out/
      imputation=1/part.0.parquet ... part.N.parquet
      ...
      imputation=m/...
      _manifest.json
      _diagnostics.arrow  chain statistics (mean/sd or level proportions per iteration and chain)
      _state/             state of the chains, so that ``dmice.open(out).iterate(k)`` can continue
      _SUCCESS            written last; readers trust only outputs that have it

Only the imputations are Parquet files, so ``dask.dataframe.read_parquet("out/")``
reads every imputation with an ``imputation`` column (dask reads every ``*.parquet``
file below the root, whatever its name).  Paths are fsspec URLs; ``storage_options`` are passed
through unchanged.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import feather

from dmice.errors import OutputError

MANIFEST = "_manifest.json"
#: Arrow IPC (Feather), not Parquet: dask's read_parquet("out/") picks up every *.parquet file
#: below the root, "_"-prefixed ones included, which would break reading the imputations
DIAGNOSTICS = "_diagnostics.arrow"
SUCCESS = "_SUCCESS"
FORMAT_VERSION = 1


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")


def part_path(root: str, k: int, i: int) -> str:
    return posixpath.join(root, f"imputation={k}", f"part.{i}.parquet")


def _to_table(df: pd.DataFrame) -> pa.Table:
    keep_index = any(n is not None for n in df.index.names)
    return pa.Table.from_pandas(df, preserve_index=keep_index)


def write_partition(df: pd.DataFrame, block: Any, plan: Any, url: str, i: int,
                    storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Write partition ``i`` of every imputation; returns the files written (path, rows, bytes)."""
    from dmice.block import complete_partition

    fs, root = filesystem(url, storage_options)
    files = []
    for c in range(plan.m):
        out = complete_partition(df, block, plan, c)
        path = part_path(root, c + 1, i)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(_to_table(out), f)
        files.append({"path": posixpath.relpath(path, root), "imputation": c + 1, "partition": i,
                      "rows": len(out), "bytes": int(fs.size(path))})
    return files


def prepare(url: str, storage_options: dict[str, Any] | None, overwrite: bool) -> None:
    """Refuse a non-empty target unless ``overwrite``; then clear it, commit marker first."""
    fs, root = filesystem(url, storage_options)
    if fs.exists(root):
        entries = fs.ls(root, detail=False)
        if entries and not overwrite:
            raise OutputError(f"output {url!r} exists and is not empty ({len(entries)} entries); "
                              "pass overwrite=True to replace it")
        if entries:
            marker = posixpath.join(root, SUCCESS)
            if fs.exists(marker):
                fs.rm(marker)  # readers stop trusting the old output before anything is removed
            for e in fs.ls(root, detail=False):
                fs.rm(e, recursive=True)
    fs.makedirs(root, exist_ok=True)


def commit(url: str, storage_options: dict[str, Any] | None, manifest: dict[str, Any]) -> None:
    """Write the manifest, then the commit marker."""
    fs, root = filesystem(url, storage_options)
    with fs.open(posixpath.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, default=str)
    with fs.open(posixpath.join(root, SUCCESS), "w") as f:
        f.write("")


def write_diagnostics(url: str, storage_options: dict[str, Any] | None, chain_stats: pd.DataFrame) -> None:
    """Chain statistics (mean/sd or level proportions per variable, iteration and chain)."""
    fs, root = filesystem(url, storage_options)
    with fs.open(posixpath.join(root, DIAGNOSTICS), "wb") as f:
        feather.write_feather(pa.Table.from_pandas(chain_stats, preserve_index=False), f)


def read_diagnostics(url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, DIAGNOSTICS)
    if not fs.exists(path):
        return pd.DataFrame()
    with fs.open(path, "rb") as f:
        return feather.read_table(f).to_pandas()


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a complete output; refuses outputs without the commit marker."""
    fs, root = filesystem(url, storage_options)
    if not fs.exists(posixpath.join(root, SUCCESS)):
        raise OutputError(f"{url!r} is not a complete dmice output (no {SUCCESS} marker)")
    with fs.open(posixpath.join(root, MANIFEST), "r") as f:
        return json.load(f)


def restore_dtypes(df: pd.DataFrame, dtypes: dict[str, str]) -> pd.DataFrame:
    """Cast columns back to the dtypes recorded in the manifest where Parquet lost them."""
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


def write_state_partition(block: Any, url: str, i: int, storage_options: dict[str, Any] | None) -> int:
    """Write the imputed cells of one block (runs on a worker); returns the bytes written."""
    import io

    import numpy as np

    from dmice.block import cells

    fs, root = filesystem(url, storage_options)
    buf = io.BytesIO()
    np.savez(buf, **{k.replace("/", "_"): v for k, v in cells(block).items()})
    fs.makedirs(root, exist_ok=True)
    with fs.open(posixpath.join(root, f"part.{i}.npz"), "wb") as f:
        f.write(buf.getvalue())
    return len(buf.getvalue())


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
                     models: dict[str, Any], chain_stats: pd.DataFrame) -> None:
    """Client side of the state: model states (arrays in ``models.npz``), chain statistics, then
    ``state.json`` last."""
    import io

    import numpy as np

    fs, root = filesystem(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    arrays: dict[str, Any] = {}
    skeleton = _split_state(models, "m", arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with fs.open(posixpath.join(root, "models.npz"), "wb") as f:
        f.write(buf.getvalue())
    with fs.open(posixpath.join(root, "chains.arrow"), "wb") as f:
        feather.write_feather(pa.Table.from_pandas(chain_stats, preserve_index=False), f)
    with fs.open(posixpath.join(root, "state.json"), "w") as f:
        json.dump({**meta, "models": skeleton}, f, indent=1, default=str)


def read_state_meta(url: str, storage_options: dict[str, Any] | None
                    ) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame]:
    """``(meta, models, chain_stats)`` as written by :func:`write_state_meta`."""
    import io

    import numpy as np

    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, "state.json")
    if not fs.exists(path):
        raise OutputError(f"no stored chain state under {url!r}")
    with fs.open(path, "r") as f:
        meta = json.load(f)
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
    """Point ``LATEST.json`` at a complete checkpoint directory, then drop older ones."""
    fs, root = filesystem(url, storage_options)
    with fs.open(posixpath.join(root, LATEST), "w") as f:
        json.dump(pointer, f)
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


def incomplete_partition(url: str, path: str, state_url: str, i: int, columns: list[str],
                         dtypes: dict[str, str], storage_options: dict[str, Any] | None) -> pd.DataFrame:
    """Partition ``i`` of the input as it was before imputation: completed data with the imputed
    cells (as recorded in the stored state) missing again."""
    fs, root = filesystem(url, storage_options)
    with fs.open(posixpath.join(root, path), "rb") as f:
        df = pq.read_table(f).to_pandas()
    df = restore_dtypes(df[columns], dtypes)
    cells = read_state_partition(state_url, i, storage_options)
    for key, rows in cells.items():
        if key.startswith("mis/") and len(rows):
            col = columns[int(key[4:])]
            s = df[col].copy()
            s.iloc[rows] = None
            df[col] = s
    return df
