"""dmice's tunables in dask's configuration (``dmice.*``): the shipped defaults, their checks, the
ways dask users set them, and what each one changes (never a result)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import yaml
from conftest import mixed_frame

import dmice
from dmice import config
from dmice.errors import InputError


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_the_shipped_defaults_are_registered_and_read():
    shipped = yaml.safe_load((Path(config.__file__).with_name("dmice.yaml")).read_text())
    assert _leaves(shipped["dmice"]) == set(config.KEYS)  # every setting documented and checked
    assert dask.config.get("dmice.pmm.match-bytes") == "256 MiB"
    assert config.get("pmm.match-bytes") == 256 * 2**20
    assert config.get("partition-rows") == 500_000
    assert config.get("memory.fraction") == 0.6
    assert config.get("design-cache.observed") == 32 * 2**20
    assert config.get("design-cache.missing") == 8 * 2**20
    assert config.get("analysis.spec-sample-rows") == 100_000
    assert config.get("lock.ttl") == 600.0
    config.register()  # again, as a second import would: a value the user set stays
    with dask.config.set({"dmice.partition-rows": 7}):
        config.register()
        assert config.get("partition-rows") == 7


BAD = {
    "partition-rows": [0, -3, 2.5, "many", True],
    "memory.fraction": [0, 1.5, -0.1, "half"],
    "pmm.match-bytes": [0, "lots", -5],
    "design-cache.observed": [-1, "big"],
    "analysis.spec-sample-rows": [0, "all"],
    "lock.ttl": [0, "-5s", "soon"],
}


@pytest.mark.parametrize("key", list(BAD))
def test_a_bad_value_is_an_input_error_naming_the_key(key):
    for value in BAD[key]:
        with dask.config.set({f"dmice.{key}": value}):
            with pytest.raises(InputError, match=rf"^dask config dmice\.{key}: expected "):
                config.get(key)


def test_set_from_the_environment_as_any_dask_setting():
    env = {**os.environ, "DASK_DMICE__PARTITION_ROWS": "1234", "DASK_DMICE__PMM__MATCH_BYTES": "1 KiB",
           "DASK_DMICE__LOCK__TTL": "2 minutes"}
    code = ("import dmice; from dmice import config; "
            "print(config.get('partition-rows'), config.get('pmm.match-bytes'), config.get('lock.ttl'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1234", "1024", "120.0"]


def test_partition_rows_splits_a_pandas_frame(cluster_client):
    df = mixed_frame(3000, seed=4)
    with dask.config.set({"dmice.partition-rows": 1000}):
        imp = dmice.impute(df, m=1, max_iter=1, seed=2, client=cluster_client, progress=False)
    assert imp.complete(1).npartitions == 3
    imp.close()
    imp = dmice.impute(df, m=1, max_iter=1, seed=2, client=cluster_client, progress=False)
    assert imp.complete(1).npartitions == 1
    imp.close()


def test_match_bytes_sets_the_rounds_not_the_result(cluster_client):
    """One chain per matching round instead of all three: more rounds, the same imputations."""
    df = mixed_frame(3000, seed=5)
    got = {}
    for limit in ("256 MiB", "1 B"):
        with dask.config.set({"dmice.pmm.match-bytes": limit}):
            imp = dmice.impute(df, m=3, max_iter=2, seed=4, method={"x": "pmm"},
                               client=cluster_client, progress=False)
        got[limit] = (imp._engine.rounds, [imp.complete(k).compute()["x"].to_numpy() for k in (1, 2, 3)])
        imp.close()
    assert got["1 B"][0] == got["256 MiB"][0] + 2 * 2  # x is visited twice: two more rounds each
    for a, b in zip(got["1 B"][1], got["256 MiB"][1]):
        np.testing.assert_array_equal(a, b)


def test_memory_fraction_is_named_when_a_run_does_not_fit(cluster_client):
    with dask.config.set({"dmice.memory.fraction": 1e-6}):
        with pytest.raises(InputError, match=r"dask config dmice\.memory\.fraction"):
            dmice.impute(mixed_frame(2000, seed=1), m=2, max_iter=1, seed=1, client=cluster_client,
                         progress=False)


def test_the_design_caches_set_where_impute_is_called_reach_the_workers(cluster_client):
    """The workers keep the designs of the fitting rows between visits unless the client's
    settings say they may not; the imputations are the same either way."""
    df = mixed_frame(3000, seed=6)
    got = {}
    for size in ("32 MiB", 0):
        with dask.config.set({"dmice.design-cache.observed": size, "dmice.design-cache.missing": size}):
            imp = dmice.impute(df, m=2, max_iter=2, seed=3, client=cluster_client, progress=False)
        kept = cluster_client.submit(lambda b: sorted(str(k[2]) for k in b.cache if k[0] == "mdesign"),
                                     imp._engine.blocks[0]).result()
        got[size] = (kept, [imp.complete(k).compute() for k in (1, 2)])
        imp.close()
    assert got["32 MiB"][0] and got[0][0] == []
    for a, b in zip(got["32 MiB"][1], got[0][1]):
        assert a.equals(b)


def test_lock_ttl_from_dask_config_and_the_environment(monkeypatch):
    from dmice import store

    monkeypatch.delenv("DMICE_LOCK_TTL", raising=False)
    with dask.config.set({"dmice.lock.ttl": "5s"}):
        assert store.lock_ttl() == 5.0
        monkeypatch.setenv("DMICE_LOCK_TTL", "7")
        assert store.lock_ttl() == 7.0  # the variable the README names still decides
