"""A job against a real S3-protocol server (moto in server mode, on loopback): input read from
the bucket by the workers, all m sets, the manifest and the commit record written to it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import mixed_frame

import dmice
from dmice.cli import main
from dmice.errors import OutputError

INPUT = "s3://lake/cohort/as_of=2026-11-01/"
OUTPUT = "s3://lake/imputed/cohort/as_of=2026-11-01/"


@pytest.fixture(scope="module")
def s3_job(s3, tmp_path_factory):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    df = mixed_frame(1500, seed=8)
    for i in range(3):
        with fs.open(f"{INPUT}part-{i}.parquet", "wb") as f:
            df.iloc[i * 500:(i + 1) * 500].reset_index(drop=True).to_parquet(f)
    endpoint = s3["endpoint_url"]
    d = tmp_path_factory.mktemp("s3job")
    job = d / "job.yaml"
    job.write_text(f"""\
version: 1
input: {{url: "{INPUT}", format: parquet, storage_options: {{endpoint_url: "{endpoint}"}}}}
output: {{url: "{OUTPUT}", layout: full, storage_options: {{endpoint_url: "{endpoint}"}}}}
imputation: {{m: 2, max_iter: 2, seed: 20261101, method: {{x: pmm, z: logreg}}}}
cluster: {{address: null}}
""")
    assert main(["validate", str(job)]) == 0
    assert main(["run", str(job), "--run-id", "nightly-1"]) == 0
    return {"fs": fs, "job": job, "df": df, "so": dict(s3)}


def test_job_reads_from_and_writes_to_s3(s3_job):
    fs, so = s3_job["fs"], s3_job["so"]
    keys = sorted(p.split("as_of=2026-11-01/", 1)[1] for p in fs.find(OUTPUT))
    assert keys == ["_SUCCESS", "runs/nightly-1/_diagnostics.arrow", "runs/nightly-1/_manifest.json",
                    *[f"runs/nightly-1/_state/{n}" for n in ("chains.arrow", "models.npz", "part.0.npz",
                                                            "part.1.npz", "part.2.npz", "state.json")],
                    *[f"runs/nightly-1/imputation={k}/part.{i}.parquet" for k in (1, 2) for i in range(3)]]
    pointer = json.loads(fs.cat_file(OUTPUT + "_SUCCESS"))
    assert pointer["run_id"] == "nightly-1"
    man = json.loads(fs.cat_file(OUTPUT + pointer["manifest"]))
    sizes = {p.split("as_of=2026-11-01/", 1)[1]: fs.size(p) for p in fs.find(OUTPUT)}
    assert all(sizes[f["path"]] == f["bytes"] for f in man["files"] + man["aux_files"])
    assert man["input_snapshot"]["url"] == INPUT and len(man["input_snapshot"]["files"]) == 3
    imp = dmice.open(OUTPUT, storage_options=so)
    assert imp.m == 2 and imp.method["z"] == "logreg"
    for k in (1, 2):
        done = imp.complete(k).compute().reset_index(drop=True)
        assert len(done) == 1500 and done.isna().sum().sum() == 0
        src = s3_job["df"]
        seen = src["x"].notna()
        pd.testing.assert_series_equal(done["x"][seen], src["x"][seen])
    # the pooled analysis reads the files on the workers; the same fits as from the frames
    res = dmice.analyze(imp, "y ~ x + z")
    assert res._files is not None and len(res._files[0]) == 3
    again = dmice.analyze([imp.complete(k).compute() for k in (1, 2)], "y ~ x + z")
    pd.testing.assert_frame_equal(res.pooled, again.pooled, rtol=1e-10)
    assert main(["verify", OUTPUT, "--storage-options", json.dumps(so)]) == 0


def test_second_run_is_a_no_op_and_a_changed_config_is_refused(s3_job, tmp_path, capsys):
    fs = s3_job["fs"]
    before = {p: fs.info(p)["ETag"] for p in fs.find(OUTPUT)}
    assert main(["run", str(s3_job["job"])]) == 0
    assert "already complete" in capsys.readouterr().err
    changed = tmp_path / "changed.yaml"
    changed.write_text(s3_job["job"].read_text().replace("m: 2,", "m: 3,"))
    assert main(["run", str(changed)]) == 3
    assert "another job configuration" in capsys.readouterr().err
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(OUTPUT)} == before


def test_open_refuses_an_s3_output_without_success(s3_job):
    fs, so = s3_job["fs"], s3_job["so"]
    partial = "s3://lake/imputed/partial/"
    for p in fs.find(OUTPUT):
        rel = p.split("as_of=2026-11-01/", 1)[1]
        if rel != "_SUCCESS":
            fs.copy(p, partial + rel)
    with pytest.raises(OutputError, match="_SUCCESS"):
        dmice.open(partial, storage_options=so)
    assert main(["verify", partial, "--storage-options", json.dumps(so)]) == 4


def test_cells_layout_on_s3_completes_to_the_full_layout(s3_job, tmp_path):
    so = s3_job["so"]
    cells_out = "s3://lake/imputed/cohort_cells/as_of=2026-11-01/"
    job = tmp_path / "cells.yaml"
    job.write_text(s3_job["job"].read_text().replace(OUTPUT, cells_out).replace("layout: full", "layout: cells"))
    assert main(["run", str(job)]) == 0
    full = dmice.open(OUTPUT, storage_options=so)
    cells = dmice.open(cells_out, storage_options=so)
    assert cells.manifest["layout"] == "cells"
    for k in (1, 2):
        pd.testing.assert_frame_equal(full.complete(k).compute().reset_index(drop=True),
                                      cells.complete(k).compute().reset_index(drop=True), check_exact=True)
    assert main(["verify", cells_out, "--storage-options", json.dumps(so)]) == 0


def test_vacuum_on_s3_keeps_the_committed_run(s3_job, capsys):
    """A dead run's objects below runs/ on S3 (whose objects' ages cannot be set: retention 0)."""
    fs, so = s3_job["fs"], s3_job["so"]
    committed = {p: fs.info(p)["ETag"] for p in fs.find(OUTPUT + "runs/nightly-1/")}
    fs.pipe(OUTPUT + "runs/nightly-0/imputation=1/part.0.parquet", b"PAR1 half-written")
    opts = ["--storage-options", json.dumps(so)]
    assert main(["vacuum", OUTPUT, *opts]) == 0  # written just now: kept by the default week
    assert "kept (recent): runs/nightly-0 (1 files, 17 bytes" in capsys.readouterr().err
    assert fs.exists(OUTPUT + "runs/nightly-0/imputation=1/part.0.parquet")
    assert main(["vacuum", OUTPUT, "--retain-hours", "0", *opts]) == 0
    assert "removed: runs/nightly-0" in capsys.readouterr().err
    assert not fs.find(OUTPUT + "runs/nightly-0/")
    assert {p: fs.info(p)["ETag"] for p in fs.find(OUTPUT + "runs/nightly-1/")} == committed
    assert main(["verify", OUTPUT, *opts]) == 0
