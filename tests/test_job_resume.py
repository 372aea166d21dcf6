"""A scheduled job killed with SIGKILL in the middle of its iterations resumes from its checkpoint
and writes exactly the files of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from test_job import write_input

from dmice import job as jobmod
from dmice import store

JOB = """\
version: 1
input: {{url: "{inp}", format: parquet}}
output: {{url: "{out}", checkpoint_every: 1}}
imputation: {{m: 3, max_iter: {iters}, seed: 7}}
cluster: {{address: "{address}"}}
"""


def _data_files(out: Path) -> dict[str, str]:
    """Data files of a committed output by path below the run prefix, with their checksums."""
    man = store.read_manifest(str(out))
    pre = man["data_prefix"] + "/"
    return {f["path"][len(pre):]: f["sha256"] for f in man["files"]}


def test_killed_run_resumes_and_matches_an_uninterrupted_run(cluster_client, tmp_path):
    inp = write_input(tmp_path / "lake", n_files=2, rows=4000, seed=5)
    address = cluster_client.scheduler.address
    iters = 12
    ref_job = tmp_path / "ref.yaml"
    ref_job.write_text(JOB.format(inp=inp, out=tmp_path / "ref", iters=iters, address=address))
    jobmod.run_job(jobmod.load_job(str(ref_job)), run_id="ref")

    path = tmp_path / "job.yaml"
    out = tmp_path / "out"
    path.write_text(JOB.format(inp=inp, out=out, iters=iters, address=address))
    ck = jobmod.checkpoint_url(jobmod.load_job(str(path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "dmice.cli", "run", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ptr = store.latest_checkpoint(ck, None)
        if ptr is not None and ptr["iteration"] >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = ptr["iteration"]
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (out / store.SUCCESS).exists()  # nothing committed
    saved = store.latest_checkpoint(ck, None)["iteration"]
    assert 3 <= saved < iters

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed the chains at iteration {saved}" in again.stderr
    lines = [ln for ln in again.stderr.splitlines() if "iteration=" in ln]
    assert len(lines) == iters - saved  # only the remaining iterations ran
    got, ref = _data_files(out), _data_files(tmp_path / "ref")
    assert len(ref) == 3 * 2 and got == ref  # same files, same checksums
    man, ref_man = store.read_manifest(str(out)), store.read_manifest(str(tmp_path / "ref"))
    np.testing.assert_equal(man["convergence"], ref_man["convergence"])
    assert not Path(ck).exists()  # the checkpoint goes once the run is committed
    assert json.loads((out / store.SUCCESS).read_text())["run_id"] == man["run_id"]
