"""Nothing outside the output: run ids and the paths a pointer or manifest names stay below the
output root; an overwrite replaces the old output only once the new one is complete; one run per
output at a time (the lock)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest
from conftest import mixed_frame
from test_job import errors, write_input, write_job

import dmice
from dmice import job as jobmod
from dmice import store
from dmice.cli import main
from dmice.errors import InputError, OutputError


@pytest.fixture(scope="module")
def committed(cluster_client, tmp_path_factory):
    """A committed job output (run r1) of a small input."""
    root = tmp_path_factory.mktemp("paths")
    inp = write_input(root / "cohort", n_files=2, rows=200)
    job = write_job(root / "job.yaml", inp, root / "out")
    assert main(["run", str(job), "--run-id", "r1"]) == 0
    return {"root": root, "input": inp, "job": job, "out": root / "out"}


def _copy(committed, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the committed output (below ``tmp_path/a/b``) and a job file naming it."""
    out = tmp_path / "a" / "b" / "out"
    shutil.copytree(committed["out"], out)
    job = tmp_path / "job.yaml"
    job.write_text(committed["job"].read_text().replace(str(committed["out"]), str(out)))
    return out, job


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _victim(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "precious.txt").write_text("not dmice's")
    return d


def _recommit(out: Path, man: dict, run_id: str | None = None, manifest_rel: str | None = None) -> None:
    """Rewrite the committed manifest and a pointer that matches it (what an attacker with write
    access to the output, or a damaged tool, could leave)."""
    pointer = json.loads((out / "_SUCCESS").read_text())
    rel = manifest_rel or pointer["manifest"]
    data = json.dumps(man).encode()
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(data)
    pointer.update(manifest=rel, sha256=hashlib.sha256(data).hexdigest())
    if run_id is not None:
        pointer["run_id"] = run_id
    (out / "_SUCCESS").write_text(json.dumps(pointer))


# ---------------------------------------------------------------------------------------------
# paths


@pytest.mark.parametrize("bad", ["../../victim", "..", "r1/../../../victim", "/tmp", "a..b", ".hidden",
                                 "x" * 129, "r1\\..\\x", ""])
def test_run_id_pattern(bad):
    with pytest.raises(InputError, match="run id"):
        store.check_run_id(bad)


@pytest.mark.parametrize("good", ["r1", "20261203T093000Z-a1b2c3", "nightly_2026.12.03", "A" * 128])
def test_run_id_pattern_accepts(good):
    assert store.check_run_id(good) == good


def test_run_id_in_success_is_checked_and_force_deletes_nothing_outside(committed, tmp_path, capsys):
    out, job = _copy(committed, tmp_path)
    victim = _victim(tmp_path / "a" / "victim")  # out/runs/../../victim
    pointer = json.loads((out / "_SUCCESS").read_text())
    pointer["run_id"] = "../../victim"
    (out / "_SUCCESS").write_text(json.dumps(pointer))
    before = _tree(out)
    assert main(["verify", str(out)]) == 4
    (err,) = errors(capsys.readouterr().err)
    assert "run id" in err
    with pytest.raises(OutputError, match="run id"):
        dmice.open(str(out))
    assert main(["run", str(job), "--force", "--run-id", "r2"]) == 3
    assert main(["vacuum", str(out), "--retain-hours", "0"]) == 3
    assert (victim / "precious.txt").read_text() == "not dmice's"
    assert _tree(out) == before  # refused before anything was written or removed


def test_manifest_paths_outside_the_root_fail_verify(committed, tmp_path, capsys):
    out, _ = _copy(committed, tmp_path)
    outside = _victim(tmp_path / "a" / "elsewhere")
    man = store.read_manifest(str(out))
    good = man["files"][0]
    # a file outside the output with the size and checksum the manifest records
    shutil.copy(out / good["path"], outside / "part.parquet")
    variants = {
        "file": lambda m: m["files"][0].update(path="../../elsewhere/part.parquet"),
        "absolute file": lambda m: m["files"][0].update(path=str(outside / "part.parquet")),
        "url": lambda m: m["files"][0].update(path=f"file://{outside / 'part.parquet'}"),
        "aux file": lambda m: m["aux_files"][0].update(path="runs/r1/../../../elsewhere/part.parquet"),
        "data prefix": lambda m: m.update(data_prefix="../elsewhere"),
    }
    for name, change in variants.items():
        bad = json.loads(json.dumps(man))
        change(bad)
        _recommit(out, bad)
        assert main(["verify", str(out)]) == 4, name
        (err,) = errors(capsys.readouterr().err)
        assert "outside the output" in err, (name, err)
        with pytest.raises(OutputError, match="outside the output"):
            dmice.open(str(out))
    # the pointer naming a manifest outside the run's prefix
    _recommit(out, man, manifest_rel="runs/r1/../../../elsewhere/_manifest.json")
    assert main(["verify", str(out)]) == 4
    assert "outside the output" in capsys.readouterr().err
    assert (outside / "precious.txt").exists()


def test_urls_are_checked_after_normalisation(committed, tmp_path):
    out, _ = _copy(committed, tmp_path)
    man = store.read_manifest(f"file://{out}")
    assert man["run_id"] == "r1"
    assert store.verify(f"file://{out}/")["run_id"] == "r1"
    assert store.verify(f"file://{tmp_path}/a/b/../b/out")["run_id"] == "r1"


def test_s3_commit_records_are_checked(s3, capsys):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    out = "s3://lake/hostile/out"
    opts = ["--storage-options", json.dumps(s3)]
    record = {"run_id": "../../victim", "manifest": "runs/x/_manifest.json", "sha256": "0" * 64}
    fs.pipe(f"{out}/_SUCCESS", json.dumps(record).encode())
    assert main(["verify", out, *opts]) == 4
    assert "invalid run id" in errors(capsys.readouterr().err)[0]
    record.update(run_id="x", manifest="runs/x/../../../other/_manifest.json")
    fs.pipe(f"{out}/_SUCCESS", json.dumps(record).encode())
    assert main(["verify", out, *opts]) == 4
    assert "outside the output" in errors(capsys.readouterr().err)[0]
    assert main(["vacuum", out, "--retain-hours", "0", *opts]) == 3


def test_force_and_vacuum_delete_only_below_runs(committed, tmp_path, monkeypatch):
    out, _ = _copy(committed, tmp_path)
    fs, root = store.filesystem(str(out))
    for bad in (root, store.posixpath.join(root, "runs"), store.posixpath.join(root, "runs/../x"),
                store.posixpath.join(root, "_SUCCESS"), str(tmp_path)):
        with pytest.raises(OutputError, match="runs/"):
            store.remove_run_prefix(fs, root, bad)
    # an entry of runs/ that links out of the output
    victim = _victim(tmp_path / "victim")
    os.symlink(victim, out / "runs" / "link")
    with pytest.raises(OutputError, match="runs/"):
        store.remove_run_prefix(fs, root, store.posixpath.join(root, "runs/link"))
    assert (victim / "precious.txt").exists()
    store.remove_run_prefix(fs, root, store.posixpath.join(root, "runs/r1"))
    assert not (out / "runs" / "r1").exists()


# ---------------------------------------------------------------------------------------------
# atomic overwrite


@pytest.fixture(scope="module")
def small_imp(cluster_client):
    ddf = dd.from_pandas(mixed_frame(600, seed=2), npartitions=2)
    with dmice.impute(ddf, m=2, max_iter=1, seed=5) as imp:
        yield imp


def test_failed_overwrite_keeps_the_old_output(small_imp, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    small_imp.to_parquet(out)
    old = dmice.open(out).complete(1).compute()
    files = _tree(Path(out))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_diagnostics", disk_full)
    with pytest.raises(OSError, match="No space left"):
        small_imp.to_parquet(out, overwrite=True)
    monkeypatch.undo()
    assert _tree(Path(out)) == files  # the old output, untouched
    pd.testing.assert_frame_equal(dmice.open(out).complete(1).compute(), old)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the staged copy was removed
    # the commit itself failing: the same
    monkeypatch.setattr(store, "commit", disk_full)
    with pytest.raises(OSError):
        small_imp.to_parquet(out, overwrite=True)
    monkeypatch.undo()
    assert _tree(Path(out)) == files and sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_replaces_the_whole_output(small_imp, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "imputation=9").mkdir()
    small_imp.to_parquet(str(out), overwrite=True)
    assert not (out / "stale.txt").exists() and not (out / "imputation=9").exists()
    assert store.verify(str(out))["m"] == 2
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_on_s3_keeps_the_old_output_on_failure(small_imp, s3, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    out = "s3://lake/overwrite/out"
    small_imp.to_parquet(out, storage_options=s3)
    before = {p: fs.info(p)["ETag"] for p in fs.find(out)}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_diagnostics", disk_full)
    with pytest.raises(OSError):
        small_imp.to_parquet(out, overwrite=True, storage_options=s3)
    monkeypatch.undo()
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(out)} == before
    assert fs.ls("s3://lake/overwrite/", detail=False) == ["lake/overwrite/out"]
    small_imp.to_parquet(out, overwrite=True, storage_options=s3)
    assert store.verify(out, s3)["m"] == 2
    fs.invalidate_cache()
    assert fs.ls("s3://lake/overwrite/", detail=False) == ["lake/overwrite/out"]


def test_s3_replacement_failing_names_the_complete_staged_output(small_imp, s3, monkeypatch):
    """On an object store the replacement copies the staged output in: if that fails, the error
    names the staging URL, where the new output is complete and readable."""
    import s3fs

    out = "s3://lake/overwrite2/out"
    small_imp.to_parquet(out, storage_options=s3)

    async def broken(self, *a, **k):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(s3fs.S3FileSystem, "_cp_file", broken)
    with pytest.raises(OutputError, match="the new output is complete at") as e:
        small_imp.to_parquet(out, overwrite=True, storage_options=s3)
    monkeypatch.undo()
    staged = str(e.value).split("complete at ")[1].strip("'")
    assert "/.out.dmice-new-" in staged
    assert store.verify(staged, s3)["m"] == 2
    assert dmice.open(staged, storage_options=s3).complete(1).compute().isna().sum().sum() == 0


def test_cli_refuses_a_non_empty_output_before_imputing(tmp_path, monkeypatch, capsys):
    import dmice.api

    inp = tmp_path / "in.parquet"
    mixed_frame(200, seed=1).to_parquet(inp)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")

    def must_not_run(*a, **k):
        raise AssertionError("imputed before the output was checked")

    monkeypatch.setattr(dmice.api, "impute", must_not_run)
    assert main(["impute", str(inp), str(out), "--m", "1", "--max-iter", "1"]) == 2
    (err,) = errors(capsys.readouterr().err)
    assert "not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# the lock


def _lock_record(run_id="other", pid=None, host=None, age=0.0, ttl=600.0) -> dict:
    now = time.time() - age
    return {"run_id": run_id, "host": host or socket.gethostname(), "pid": pid or os.getpid(),
            "started": now, "heartbeat": now, "ttl": ttl, "token": "t0"}


def test_a_held_lock_refuses_a_second_run_and_changes_nothing(committed, tmp_path, capsys):
    out, job = _copy(committed, tmp_path)
    (out / store.LOCK).write_text(json.dumps(_lock_record("nightly-7")))
    before = _tree(out)
    assert main(["run", str(job), "--force", "--run-id", "r2"]) == 3
    (err,) = errors(capsys.readouterr().err)
    assert "run 'nightly-7'" in err and "started" in err and "UTC" in err and store.LOCK in err
    assert main(["vacuum", str(out), "--retain-hours", "0"]) == 3
    assert _tree(out) == before


def test_stale_locks_are_broken(committed, tmp_path, capsys, caplog):
    out, job = _copy(committed, tmp_path)
    # no heartbeat for longer than its TTL
    (out / store.LOCK).write_text(json.dumps(_lock_record("crashed", age=120, ttl=60, host="elsewhere")))
    assert main(["run", str(job), "--force", "--run-id", "r2"]) == 0
    assert "stale lock of run 'crashed'" in caplog.text
    assert not (out / store.LOCK).exists()  # released after the run
    # a process of this host that no longer exists (killed): broken at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / store.LOCK).write_text(json.dumps(_lock_record("killed", pid=dead.pid)))
    assert main(["run", str(job), "--force", "--run-id", "r3"]) == 0
    assert not (out / store.LOCK).exists()
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == "r3"


def test_lock_is_released_when_the_run_fails(committed, tmp_path, monkeypatch):
    out, job = _copy(committed, tmp_path)

    def crash(*a, **k):
        raise OSError("storage unavailable")

    monkeypatch.setattr(jobmod, "impute_step", crash)
    assert main(["run", str(job), "--force", "--run-id", "r2"]) == 1
    assert not (out / store.LOCK).exists()


def test_heartbeat_keeps_a_long_run_locked(tmp_path):
    url = str(tmp_path / "out")
    with store.output_lock(url, None, "long", ttl=1.0) as lock:
        first = json.loads((tmp_path / "out" / store.LOCK).read_text())
        time.sleep(2.0)  # two TTLs: only the heartbeat keeps it alive
        now = json.loads((tmp_path / "out" / store.LOCK).read_text())
        assert now["heartbeat"] > first["heartbeat"] and now["token"] == first["token"]
        with pytest.raises(store.LockedError, match="run 'long'"):
            with store.output_lock(url, None, "second", ttl=1.0):
                pass
        assert lock.held()
    assert not (tmp_path / "out" / store.LOCK).exists()


def test_concurrent_acquisition_has_one_winner(tmp_path):
    url = str(tmp_path / "out")
    won, lost = [], []
    barrier = threading.Barrier(8)

    def try_lock(i):
        barrier.wait()
        try:
            lock = store.acquire_lock(url, None, f"r{i}")
            won.append(lock)
        except store.LockedError:
            lost.append(i)

    threads = [threading.Thread(target=try_lock, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and len(lost) == 7
    won[0].release()


def test_conditional_put_on_s3(s3):
    url = "s3://lake/locked/out"
    won, lost = [], []
    barrier = threading.Barrier(6)

    def try_lock(i):
        barrier.wait()
        try:
            won.append(store.acquire_lock(url, s3, f"r{i}"))
        except store.LockedError:
            lost.append(i)

    threads = [threading.Thread(target=try_lock, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and len(lost) == 5
    assert won[0].atomic  # created with If-None-Match: '*'
    won[0].release()
    import s3fs

    assert not s3fs.S3FileSystem(**s3).exists(f"{url}/{store.LOCK}")


def test_two_concurrent_runs_the_second_exits_3(cluster_client, tmp_path):
    """Two `dmice run` processes on one output: the second is refused while the first runs and
    changes nothing; the first, interrupted, releases the lock."""
    import signal

    inp = write_input(tmp_path / "lake", n_files=2, rows=500, seed=5)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    address = cluster_client.scheduler.address
    job.write_text(f"""\
version: 1
input: {{url: "{inp}", format: parquet}}
output: {{url: "{out}", checkpoint_every: 1}}
imputation: {{m: 2, max_iter: 500, seed: 7}}
cluster: {{address: "{address}"}}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "dmice.cli", "run", str(job)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = Path(jobmod.checkpoint_url(jobmod.load_job(str(job))))
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        ptr = store.latest_checkpoint(str(ck), None)
        if ptr is not None and ptr["iteration"] >= 2:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started"
    lock = json.loads((out / store.LOCK).read_text())
    assert lock["pid"] == first.pid
    before = _tree(out)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second was refused"
    assert second.returncode == 3, second.stderr[-2000:]
    assert f"run {lock['run_id']!r}" in second.stderr and "started" in second.stderr
    assert "Traceback" not in second.stderr
    now = _tree(out)
    # the second run removed nothing (the first rotates its checkpoints and beats its lock)
    assert {k for k in set(before) - set(now) if "iter=" not in k} == set()
    assert not (out / store.SUCCESS).exists() and not (out / "runs" / "r2").exists()
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert first.returncode != 0
    assert not (out / store.LOCK).exists()  # released by the interrupted run
