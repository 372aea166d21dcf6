"""Runs that lose workers: the chains are rebuilt from the input and the last snapshot, and the
result equals an undisturbed run's.

Each test starts its own cluster of worker processes (the nannies restart a killed worker, as
a deployment's would), and kills workers with SIGKILL at chosen points of the loop.
"""

from __future__ import annotations

import os
import signal

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dmice
from dmice.runtime import engine as _engine
from tests.conftest import mixed_frame


@pytest.fixture(scope="module")
def cluster3():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cl:
        with Client(cl) as c:
            yield c


def _data() -> dd.DataFrame:
    df = mixed_frame(2400, seed=11)
    return dd.from_pandas(df, npartitions=6)


def _completed(imp, m: int) -> list[pd.DataFrame]:
    return [imp.complete(c).compute().reset_index(drop=True) for c in range(1, m + 1)]


def _kill_at(monkeypatch, client, at: list[int], pick=lambda eng: eng._where[0]) -> list[str]:
    """Kill (SIGKILL) the worker ``pick(engine)`` when a round of iteration ``at[i]`` starts, once each."""
    killed: list[str] = []
    original = _engine.Engine._round

    def round_(self, order, request):
        it = self.iteration + 1
        if at and it == at[0] and self._key is not None and self._where:
            at.pop(0)
            address = pick(self)
            pid = client.run(os.getpid, workers=[address])[address]
            os.kill(pid, signal.SIGKILL)
            killed.append(address)
        return original(self, order, request)

    monkeypatch.setattr(_engine.Engine, "_round", round_)
    return killed


def test_two_workers_killed_at_different_iterations_give_the_undisturbed_result(cluster3, monkeypatch):
    ddf = _data()
    kw = dict(m=2, max_iter=6, seed=7, client=cluster3, progress=None)
    plain = dmice.impute(ddf, **kw)
    want = _completed(plain, 2)
    assert not plain._engine.recoveries
    want_stats = pd.DataFrame(plain._engine.chain_stats)
    plain.close()

    monkeypatch.setattr(_engine, "SNAPSHOT_SHARE", 1e9)  # a snapshot after every iteration
    killed = _kill_at(monkeypatch, cluster3, [2, 5], pick=lambda eng: eng._where[len(eng._where) - 1])
    imp = dmice.impute(ddf, **kw)
    got = _completed(imp, 2)
    rec = imp._engine.recoveries
    assert len(killed) == 2 and killed[0] != killed[1]
    assert [r["iteration"] for r in rec] == [2, 5]
    assert all(r["replayed_from"] < r["iteration"] for r in rec)
    lost = [e for e in imp._session.events if "was lost at iteration" in e["event"]]
    assert len(lost) == 2
    for a, b in zip(want, got):
        pd.testing.assert_frame_equal(a, b)
    # the chain statistics (trace plots, R-hat) are those of the undisturbed run too
    pd.testing.assert_frame_equal(want_stats, pd.DataFrame(imp._engine.chain_stats))
    imp.close()


def test_a_lost_worker_during_pmm_matching_among_workers(cluster3, monkeypatch):
    """pmm's matching tasks run on the workers between rounds; a worker lost there is recovered too."""
    import dask

    ddf = _data()
    kw = dict(m=2, max_iter=4, seed=5, client=cluster3, progress=None)
    with dask.config.set({"dmice.pmm.worker-match-bytes": 0}):
        plain = dmice.impute(ddf, **kw)
        want = _completed(plain, 2)
        plain.close()
        killed: list[str] = []
        original = _engine.Engine._match_ranges

        def match(self, spec):
            if not killed and self.iteration + 1 == 3:
                address = self._where[0]
                os.kill(cluster3.run(os.getpid, workers=[address])[address], signal.SIGKILL)
                killed.append(address)
            return original(self, spec)

        monkeypatch.setattr(_engine.Engine, "_match_ranges", match)
        imp = dmice.impute(ddf, **kw)
        got = _completed(imp, 2)
    assert killed and len(imp._engine.recoveries) == 1
    for a, b in zip(want, got):
        pd.testing.assert_frame_equal(a, b)
    imp.close()


def test_snapshots_follow_their_cost():
    eng = _engine.Engine.__new__(_engine.Engine)
    eng._snap = {"seconds": 0.2}
    # 0.2 s per snapshot against 1 s iterations: every 4 iterations keeps them at 5%
    assert eng._snapshot_interval(1.0) == 4
    assert eng._snapshot_interval(100.0) == 1
    assert eng._snapshot_interval(0.001) == _engine.SNAPSHOT_MAX_EVERY


def test_without_a_snapshot_the_loss_is_reported(cluster3, monkeypatch):
    """A lost worker that cannot be recovered from ends the run with the error naming it."""
    ddf = _data()
    monkeypatch.setattr(_engine, "MAX_RECOVERIES", 0)
    _kill_at(monkeypatch, cluster3, [2])
    with pytest.raises(RuntimeError, match="was lost at iteration 2"):
        dmice.impute(ddf, m=2, max_iter=3, seed=1, client=cluster3, progress=None)
    # the cluster still works
    assert np.isfinite(dmice.impute(ddf, m=1, max_iter=1, seed=1, client=cluster3,
                                    progress=None).complete(1)["x"].compute()).all()


def test_a_paused_worker_ends_the_run_with_an_error_naming_it(monkeypatch):
    """A worker paused by dask (memory above its pause threshold) runs no task: the chains do not
    wait for it for ever, the run ends with an error naming its partitions and what to change."""
    import dask
    from distributed import Client, LocalCluster

    def pause(dask_worker):
        from distributed.core import Status

        dask_worker.status = Status.paused

    # no memory limit: nothing un-pauses the worker behind the test's back
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                      memory_limit=0) as cl, Client(cl) as c:
        monkeypatch.setattr(_engine, "SNAPSHOT_SHARE", 1e9)  # a snapshot after every iteration
        original = _engine.Engine._round

        def round_(self, order, request):
            if self.iteration + 1 == 2 and self._where:
                c.run(pause, workers=[self._where[0]])
            return original(self, order, request)

        monkeypatch.setattr(_engine.Engine, "_round", round_)
        with dask.config.set({"dmice.faults.paused-wait": "2s"}):
            with pytest.raises(RuntimeError, match=r"partitions \[0.*paused by dask for 2 s"):
                dmice.impute(_data(), m=2, max_iter=4, seed=1, client=c, progress=None)


def test_a_worker_lost_after_the_run_keeps_the_result(cluster3):
    """The result's blocks at rest are the encoded blocks with a snapshot of the final cells: a
    worker lost after the run (before the imputations are written) costs a recomputation, not
    the result."""
    import time

    imp = dmice.impute(_data(), m=2, max_iter=3, seed=4, client=cluster3, progress=None)
    want = _completed(imp, 2)
    blocks = imp._engine.blocks
    address = sorted(cluster3.who_has(blocks)[blocks[0].key])[0]
    os.kill(cluster3.run(os.getpid, workers=[address])[address], signal.SIGKILL)
    t0 = time.time()
    while address in cluster3.nthreads() and time.time() - t0 < 30:
        time.sleep(0.1)
    assert address not in cluster3.nthreads()
    for a, b in zip(want, _completed(imp, 2)):
        pd.testing.assert_frame_equal(a, b)
    imp.close()


def test_a_worker_lost_while_a_checkpoint_is_written(cluster3, monkeypatch, tmp_path):
    """A checkpoint's files are written from the workers mid-loop; a worker lost just then is
    recovered from like any other (the write waited for ever on a task pinned to it)."""
    ddf = _data()
    kw = dict(m=2, max_iter=4, seed=9, client=cluster3, progress=None)
    plain = dmice.impute(ddf, **kw)
    want = _completed(plain, 2)
    plain.close()
    killed: list[str] = []
    original = _engine.Engine.save_state

    def save(self, *a, **k):
        if not killed and self.iteration == 2:
            address = self._where[0]
            os.kill(cluster3.run(os.getpid, workers=[address])[address], signal.SIGKILL)
            killed.append(address)
        return original(self, *a, **k)

    monkeypatch.setattr(_engine.Engine, "save_state", save)
    imp = dmice.impute(ddf, checkpoint=str(tmp_path / "ckpt"), **kw)
    assert killed and len(imp._engine.recoveries) == 1
    for a, b in zip(want, _completed(imp, 2)):
        pd.testing.assert_frame_equal(a, b)
    imp.close()


def test_a_snapshot_copy_recomputed_after_the_loss_is_not_used(cluster3, monkeypatch):
    """The scheduler recomputes a lost snapshot task on another worker, where it finds no cells:
    the recovery must take the other copy, not that empty one (found by a kill followed by a
    pause long enough for the recomputation to finish before the loss is noticed)."""
    import time

    ddf = _data()
    kw = dict(m=2, max_iter=3, seed=13, client=cluster3, progress=None)
    plain = dmice.impute(ddf, **kw)
    want = _completed(plain, 2)
    plain.close()
    original = _engine.Engine._round
    killed: list[str] = []

    def round_(self, order, request):
        if not killed and self.iteration + 1 == 2 and self._where:
            address = self._where[0]
            os.kill(cluster3.run(os.getpid, workers=[address])[address], signal.SIGKILL)
            killed.append(address)
            time.sleep(3)
        return original(self, order, request)

    monkeypatch.setattr(_engine.Engine, "_round", round_)
    imp = dmice.impute(ddf, **kw)
    assert killed and len(imp._engine.recoveries) == 1
    for a, b in zip(want, _completed(imp, 2)):
        pd.testing.assert_frame_equal(a, b)
    imp.close()
