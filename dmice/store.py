"""What is written: the Parquet layout, the manifest and the commit marker.

::

    out/
      imputation=1/part.0.parquet ... part.N.parquet
      ...
      imputation=m/...
      _manifest.json
      _diagnostics.arrow  chain statistics (mean/sd or level proportions per iteration and chain)
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
