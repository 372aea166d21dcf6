"""Scheduled jobs on a local file system: the job file's schema and errors, idempotent runs,
conflicts, verification, commit on failure, the compact cells layout and the pooled analyses."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import mixed_frame

import dmice
from dmice import job as jobmod
from dmice.cli import main
from dmice.errors import InputError, OutputError

JOB = """\
version: 1
input: {{url: "{inp}", format: {fmt}}}
output: {{url: "{out}", layout: {layout}}}
imputation: {{m: {m}, max_iter: 2, seed: 11, method: {{x: norm}}}}
{extra}
"""


def write_input(d: Path, n_files: int = 3, rows: int = 500, seed: int = 3, fmt: str = "parquet") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    df = mixed_frame(n_files * rows, seed=seed)
    df["sbp"] = np.round(120 + 10 * df["y"].to_numpy()).astype(np.int64)  # integers without gaps
    for i in range(n_files):
        part = df.iloc[i * rows:(i + 1) * rows].reset_index(drop=True)
        if fmt == "parquet":
            part.to_parquet(d / f"part-{i}.parquet")
        else:
            part.to_csv(d / f"part-{i}.csv", index=False)
    (d / "_SUCCESS").write_text("")  # an upstream marker is not data
    return d


def write_job(path: Path, inp: Path, out: Path, layout: str = "full", m: int = 2, fmt: str = "parquet",
              extra: str = "") -> Path:
    path.write_text(JOB.format(inp=inp, out=out, layout=layout, m=m, fmt=fmt, extra=extra))
    return path


ANALYSIS = 'analysis: [{formula: "y ~ x + z + C(c)", family: gaussian, name: linear}]'


# ---------------------------------------------------------------------------------------------
# the job file


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    return write_input(tmp_path_factory.mktemp("lake") / "cohort", n_files=2, rows=200)


BASE = {"version": 1, "input": {"url": "INPUT", "format": "parquet"}, "output": {"url": "OUT"},
        "imputation": {"m": 2, "max_iter": 2, "seed": 1, "method": {"x": "norm"}}}


def _variant(change):
    job = json.loads(json.dumps(BASE))
    change(job)
    return job


INVALID = {
    "unknown key": (lambda j: j["imputation"].update(maxiter=3), "imputation.maxiter: unknown key"),
    "unknown top-level key": (lambda j: j.update(clutser={}), "clutser: unknown key; allowed: version"),
    "wrong type": (lambda j: j["imputation"].update(m="twenty"), "imputation.m: expected a valid integer"),
    "negative m": (lambda j: j["imputation"].update(m=0), "imputation.m: expected"),
    "missing input": (lambda j: j.pop("input"), "input: required key is missing"),
    "missing seed": (lambda j: j["imputation"].pop("seed"), "imputation.seed: required key is missing"),
    "bad version": (lambda j: j.update(version=2), "version: expected 1"),
    "unknown method name": (lambda j: j["imputation"]["method"].update(x="pmx"),
                            "imputation.method.x: expected 'norm', 'pmm'"),
    "unknown column in method": (lambda j: j["imputation"]["method"].update(bmi="pmm"),
                                 "imputation.method.bmi: unknown column 'bmi'"),
    "unknown column in formula": (lambda j: j.update(analysis=[{"formula": "y ~ x + age"}]),
                                  "analysis.0.formula: unknown column 'age'"),
    "unknown marker column": (lambda j: j["imputation"].update(where={"x": "recheck"}),
                              "imputation.where.x: unknown column 'recheck'"),
    "unknown ignore column": (lambda j: j["imputation"].update(ignore="holdout"),
                              "imputation.ignore: unknown column 'holdout'"),
    "marker column not boolean": (lambda j: j["imputation"].update(where={"x": "y"}),
                                  "imputation.where.x: column 'y' has dtype float64; a marker column "
                                  "must be boolean"),
    "bad layout": (lambda j: j["output"].update(layout="compact"), "output.layout: expected 'full' or 'cells'"),
    "secret in file": (lambda j: j["input"].update(storage_options={"secret": "x"}),
                       "input.storage_options.secret: credentials do not belong in the job file"),
    "missing input data": (lambda j: j["input"].update(url="NOWHERE"), "input.url: "),
    "csv format on parquet files": (lambda j: j["input"].update(format="csv"), "input.url: no csv files"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_job_file_gets_its_error_and_exit_code_2(case, small_input, tmp_path, capsys):
    change, expected = INVALID[case]
    raw = _variant(change)
    text = json.dumps(raw).replace("INPUT", str(small_input)).replace("OUT", str(tmp_path / "out"))
    text = text.replace("NOWHERE", str(tmp_path / "nowhere"))
    path = tmp_path / "job.yaml"
    path.write_text(text)  # JSON is YAML
    assert main(["validate", str(path)]) == 2
    (err,) = errors(capsys.readouterr().err)
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_valid_job_file_and_yaml_errors(small_input, tmp_path, capsys):
    path = write_job(tmp_path / "job.yaml", small_input, tmp_path / "out", extra=ANALYSIS)
    assert main(["validate", str(path)]) == 0
    assert "2 input files" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ninput: {url: [\n")
    assert main(["validate", str(bad)]) == 2
    assert "not valid YAML (line" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_environment_overrides(small_input, tmp_path):
    path = write_job(tmp_path / "job.yaml", small_input, tmp_path / "out")
    env = {"DMICE_OUTPUT_URL": "memory://elsewhere/out", "DMICE_CLUSTER_ADDRESS": "tcp://127.0.0.1:8786",
           "DMICE_CLUSTER_N_WORKERS": "3", "DMICE_INPUT_STORAGE_OPTIONS": '{"anon": true}'}
    job = jobmod.load_job(str(path), environ=env)
    assert job.output.url == "memory://elsewhere/out" and job.cluster.address == "tcp://127.0.0.1:8786"
    assert job.cluster.n_workers == 3 and job.input.storage_options == {"anon": True}
    # what only locates the output does not change the job's identity
    assert job.config_hash() == jobmod.load_job(str(path), environ={}).config_hash()
    with pytest.raises(jobmod.JobError, match="DMICE_CLUSTER_N_WORKERS: expected an integer"):
        jobmod.load_job(str(path), environ={"DMICE_CLUSTER_N_WORKERS": "two"})
    with pytest.raises(jobmod.JobError, match=r"cluster.n_workers: expected.*\[overrides from DMICE_CLUSTER"):
        jobmod.load_job(str(path), environ={"DMICE_CLUSTER_N_WORKERS": "0"})


def test_committed_json_schema_is_up_to_date(capsys):
    committed = (Path(dmice.__file__).parent / "job.schema.json").read_text()
    assert committed == jobmod.schema_text(), "regenerate with: dmice schema > dmice/job.schema.json"
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["additionalProperties"] is False and printed["required"] == [
        "version", "input", "output", "imputation"]
    # the schema accepts the example job and rejects an unknown key, as the loader does
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    example = yaml.safe_load((Path(__file__).parents[1] / "examples" / "job.yaml").read_text())
    jsonschema.validate(example, printed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example, "extra": 1}, printed)


# ---------------------------------------------------------------------------------------------
# runs


@pytest.fixture(scope="module")
def lake(cluster_client, tmp_path_factory):
    """The same input imputed by a full-layout job and a cells-layout job."""
    root = tmp_path_factory.mktemp("jobs")
    inp = write_input(root / "cohort")
    full = write_job(root / "full.yaml", inp, root / "out_full", "full", extra=ANALYSIS)
    cells = write_job(root / "cells.yaml", inp, root / "out_cells", "cells")
    assert main(["run", str(full), "--run-id", "r1"]) == 0
    assert main(["run", str(cells), "--run-id", "c1"]) == 0
    return {"root": root, "input": inp, "full": full, "cells": cells,
            "out_full": root / "out_full", "out_cells": root / "out_cells"}


def errors(err: str) -> list[str]:
    """The error lines the command printed (log lines aside)."""
    return [line for line in err.splitlines() if line.startswith("dmice: error: ")]


def _snapshot_tree(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")
            if p.is_file()}


def test_full_run_layout_and_manifest(lake):
    out = lake["out_full"]
    pointer = json.loads((out / "_SUCCESS").read_text())
    assert pointer["run_id"] == "r1" and pointer["manifest"] == "runs/r1/_manifest.json"
    man = json.loads((out / pointer["manifest"]).read_text())
    assert man["layout"] == "full" and man["data_prefix"] == "runs/r1" and man["m"] == 2
    assert sorted(f["path"] for f in man["files"]) == sorted(
        f"runs/r1/imputation={k}/part.{i}.parquet" for k in (1, 2) for i in range(3))
    for f in man["files"] + man["aux_files"]:
        data = (out / f["path"]).read_bytes()
        assert len(data) == f["bytes"]
        import hashlib

        assert hashlib.sha256(data).hexdigest() == f["sha256"]
    assert [f["path"] for f in man["input_snapshot"]["files"]] == [f"part-{i}.parquet" for i in range(3)]
    assert [f["offset"] for f in man["input_snapshot"]["files"]] == [0, 500, 1000]
    assert man["job"]["config"]["imputation"]["seed"] == 11 and "url" not in man["job"]["config"]["output"]
    assert "dmice" in man["versions"] and "pandas" in man["versions"]
    imp = dmice.open(str(out))
    done = imp.complete(2).compute()
    assert len(done) == 1500 and done.isna().sum().sum() == 0
    assert imp.method["x"] == "norm"
    assert not imp.chain_stats.empty


def test_second_run_is_a_no_op(lake, monkeypatch, capsys):
    before = _snapshot_tree(lake["out_full"])

    def must_not_run(*a, **k):
        raise AssertionError("imputed again")

    monkeypatch.setattr(jobmod, "impute_step", must_not_run)
    assert main(["run", str(lake["full"])]) == 0
    assert "already complete" in capsys.readouterr().err
    assert main(["run", str(lake["full"]), "--run-id", "other"]) == 0
    assert _snapshot_tree(lake["out_full"]) == before


def test_changed_config_on_the_same_output_is_refused(lake, tmp_path, capsys):
    before = _snapshot_tree(lake["out_full"])
    changed = tmp_path / "changed.yaml"
    changed.write_text(lake["full"].read_text().replace("seed: 11", "seed: 12"))
    for extra in ([], ["--force"]):
        assert main(["run", str(changed), *extra]) == 3
        (err,) = errors(capsys.readouterr().err)
        assert "another job configuration (differs in: imputation)" in err
    other_layout = tmp_path / "layout.yaml"
    other_layout.write_text(lake["full"].read_text().replace("layout: full", "layout: cells"))
    assert main(["run", str(other_layout)]) == 3
    assert "differs in: output" in capsys.readouterr().err
    assert _snapshot_tree(lake["out_full"]) == before


def test_output_with_foreign_content_is_refused(lake, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "report.txt").write_text("not ours")
    job = write_job(tmp_path / "j.yaml", lake["input"], out)
    assert main(["run", str(job)]) == 3
    assert "is not empty" in capsys.readouterr().err
    assert (out / "report.txt").read_text() == "not ours"


def test_verify_and_open_refuse_damaged_outputs(lake, tmp_path, capsys):
    import shutil

    assert main(["verify", str(lake["out_full"])]) == 0
    assert main(["verify", str(lake["out_cells"])]) == 0
    capsys.readouterr()
    copy = tmp_path / "copy"
    shutil.copytree(lake["out_full"], copy)
    part = copy / "runs/r1/imputation=2/part.1.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 4
    err = capsys.readouterr().err
    assert "runs/r1/imputation=2/part.1.parquet: checksum differs" in err
    part.unlink()
    assert main(["verify", str(copy)]) == 4
    assert "part.1.parquet: missing" in capsys.readouterr().err
    (copy / "runs/r1/imputation=1/part.9.parquet").write_bytes(b"x")
    shutil.copy(lake["out_full"] / "runs/r1/imputation=2/part.1.parquet", part)
    assert main(["verify", str(copy)]) == 4
    assert "part.9.parquet: not listed in the manifest" in capsys.readouterr().err
    (copy / "_SUCCESS").unlink()
    with pytest.raises(OutputError, match="_SUCCESS"):
        dmice.open(str(copy))
    assert main(["verify", str(copy)]) == 4
    # a commit record that does not match the manifest
    shutil.copy(lake["out_full"] / "_SUCCESS", copy / "_SUCCESS")
    man = copy / "runs/r1/_manifest.json"
    man.write_text(man.read_text().replace('"m": 2', '"m": 3'))
    with pytest.raises(OutputError, match="does not match the checksum"):
        dmice.open(str(copy))


def test_cells_layout_completes_to_the_full_layout(lake):
    full = dmice.open(str(lake["out_full"]))
    cells = dmice.open(str(lake["out_cells"]))
    man = cells.manifest
    assert man["layout"] == "cells" and all("/cells/var=" in f["path"] for f in man["files"])
    inp = pd.concat([pd.read_parquet(lake["input"] / f"part-{i}.parquet") for i in range(3)],
                    ignore_index=True)
    n_cells = sum(inp[c].isna().sum() for c in ("x", "z", "c", "s"))
    assert sum(f["rows"] for f in man["files"]) == 2 * n_cells  # only the imputed cells, m times
    cell_bytes = sum(f["bytes"] for f in man["files"])
    full_bytes = sum(f["bytes"] for f in full.manifest["files"])
    assert cell_bytes < full_bytes
    for k in (1, 2):
        a = full.complete(k).compute().reset_index(drop=True)
        b = cells.complete(k).compute().reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        observed = inp.notna()
        for c in inp.columns:  # observed values untouched, every gap filled
            assert (a[c][observed[c]].astype(str) == inp[c][observed[c]].astype(str)).all()
        assert a.isna().sum().sum() == 0


def test_pooled_analysis_of_a_cells_output_reads_each_input_file_once(lake):
    from dmice.store import CellsPart

    formula = "y ~ x + z + C(c) + s"
    cells = dmice.analyze(str(lake["out_cells"]), formula)
    assert isinstance(cells._files[0][0], CellsPart)
    full = dmice.analyze(str(lake["out_full"]), formula)
    pd.testing.assert_frame_equal(cells.pooled, full.pooled, rtol=1e-10)
    frames = [dmice.open(str(lake["out_cells"])).complete(k).compute() for k in (1, 2)]
    pd.testing.assert_frame_equal(dmice.analyze(frames, formula).pooled, cells.pooled, rtol=1e-10)


def test_cells_layout_refuses_a_changed_input(lake, tmp_path, capsys):
    import shutil

    inp = tmp_path / "cohort"
    shutil.copytree(lake["input"], inp)
    out = tmp_path / "out"
    shutil.copytree(lake["out_cells"], out)
    man_path = out / "runs/c1/_manifest.json"
    text = man_path.read_text().replace(str(lake["input"]), str(inp))
    man_path.write_text(text)
    pointer = json.loads((out / "_SUCCESS").read_text())
    import hashlib

    pointer["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (out / "_SUCCESS").write_text(json.dumps(pointer))
    assert dmice.open(str(out)).complete(1).compute().isna().sum().sum() == 0
    df = pd.read_parquet(inp / "part-1.parquet")
    df.loc[df.index[5], "y"] += 1.0
    df.to_parquet(inp / "part-1.parquet")
    with pytest.raises(InputError, match="input file 'part-1.parquet' changed"):
        dmice.open(str(out)).complete(1).compute()
    assert main(["verify", str(out)]) == 4
    assert "input file part-1.parquet" in capsys.readouterr().err


def test_analysis_tables_are_written_and_listed(lake):
    assert dmice.open(str(lake["out_cells"])).manifest["analysis"] == []
    for out in (lake["out_full"],):
        imp = dmice.open(str(out))
        man = imp.manifest
        (entry,) = man["analysis"]
        listed = {f["path"] for f in man["aux_files"]}
        assert entry["csv"] in listed and entry["json"] in listed and entry["name"] == "linear"
        table = pd.read_csv(out / entry["csv"])
        expect = dmice.analyze(imp, "y ~ x + z + C(c)").summary()
        np.testing.assert_allclose(table["estimate"], expect["estimate"], rtol=1e-10)
        np.testing.assert_allclose(table["std_error"], expect["std_error"], rtol=1e-10)
        body = json.loads((out / entry["json"]).read_text())
        assert body["m"] == 2 and body["nobs"] == 1500 and len(body["table"]) == len(table)
        assert {"fmi", "riv", "ubar", "b", "df"} <= set(table.columns)


def test_force_recomputes_and_a_failed_run_loses_nothing(lake, tmp_path, monkeypatch, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(lake["out_full"], out)
    job = tmp_path / "job.yaml"
    job.write_text(lake["full"].read_text().replace(str(lake["out_full"]), str(out)))
    before = dmice.open(str(out)).complete(1).compute()
    assert main(["run", str(job), "--force", "--run-id", "r1"]) == 3  # the committed run's own id
    assert "needs a new run id" in capsys.readouterr().err

    # a forced run that dies half-way through writing: the committed output is untouched
    def crash(job, ddf, client, checkpoint_url):
        staged = Path(job.output.url) / "runs" / "r2" / "imputation=1"
        staged.mkdir(parents=True)
        (staged / "part.0.parquet").write_bytes(b"PAR1 half-written")
        raise OSError("storage unavailable")

    monkeypatch.setattr(jobmod, "impute_step", crash)
    assert main(["run", str(job), "--force", "--run-id", "r2"]) == 1
    (err,) = errors(capsys.readouterr().err)
    assert err.startswith("dmice: error: unexpected OSError at ") and "storage unavailable" in err
    assert (out / "runs/r2/imputation=1/part.0.parquet").exists()  # staged, never named by _SUCCESS
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == "r1"
    assert main(["verify", str(out)]) == 0  # the committed run is intact; staged files are not part of it
    pd.testing.assert_frame_equal(dmice.open(str(out)).complete(1).compute(), before)
    monkeypatch.undo()

    # the retry of the same run id replaces the staged files and commits
    assert main(["run", str(job), "--force", "--run-id", "r2"]) == 0
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == "r2"
    assert not (out / "runs/r1").exists()  # superseded
    assert main(["verify", str(out)]) == 0
    again = dmice.open(str(out)).complete(1).compute()
    pd.testing.assert_frame_equal(again, before)  # same seed and partitioning: same imputations


def test_csv_input(cluster_client, tmp_path):
    inp = write_input(tmp_path / "csv_in", n_files=2, rows=500, fmt="csv")
    job = write_job(tmp_path / "job.yaml", inp, tmp_path / "out", "cells", m=1, fmt="csv")
    assert main(["run", str(job)]) == 0
    imp = dmice.open(str(tmp_path / "out"))
    done = imp.complete(1).compute()
    assert len(done) == 1000 and done.isna().sum().sum() == 0
    assert str(done["sbp"].dtype) == "Int64"
    ref = pd.concat([pd.read_csv(inp / f"part-{i}.csv") for i in range(2)], ignore_index=True)
    assert (done["sbp"].to_numpy(dtype=float) == ref["sbp"].to_numpy(dtype=float)).all()
    assert posixpath.basename(imp.manifest["input_snapshot"]["files"][1]["path"]) == "part-1.csv"
    assert os.path.exists(tmp_path / "out" / "_SUCCESS")


def test_the_commit_record_is_the_only_commit_point(lake, tmp_path, monkeypatch):
    import shutil

    from dmice import store

    out = tmp_path / "out"
    shutil.copytree(lake["out_full"], out)
    first = store.read_manifest(str(out))
    second = {**first, "run_id": "r9", "iterations": first["iterations"] + 1}

    def fail(*a, **k):
        raise OSError("connection reset")

    # the run's manifest is written, the commit record is not: readers keep the committed run
    monkeypatch.setattr(store, "_replace_atomically", fail)
    with pytest.raises(OSError):
        store.commit(str(out), None, second, run_id="r9")
    assert (out / "runs/r9/_manifest.json").exists()
    assert store.read_manifest(str(out)) == first
    monkeypatch.undo()
    store.commit(str(out), None, second, run_id="r9")
    assert store.read_manifest(str(out)) == second
    assert not list(out.glob("_SUCCESS.tmp-*"))  # the local replacement left no temporary file


def test_existing_job_files_keep_their_configuration_hash():
    """Settings added to the job schema later are left out of the hash at their defaults: the hash
    below is the one the schema without them computed for this job, so outputs written before
    stay the same configuration (a re-run stays a no-op instead of a conflict)."""
    spec = jobmod.JobSpec.model_validate({"version": 1, "input": {"url": "in/"}, "output": {"url": "out/"},
                                          "imputation": {"seed": 1, "m": 3, "method": {"bmi": "norm"}}})
    assert spec.config_hash() == "5e059caffa0846e30a35a043fe0e23c1e655ccea1c303616b59f635241a3c7fa"
    changed = spec.model_copy(update={"imputation": spec.imputation.model_copy(update={"separation": "ridge"})})
    assert changed.config_hash() != spec.config_hash()
    # an explicit donor_pool matches against a sample, which imputes differently from no donor_pool
    # (all observed rows): even the former default 10000 is another configuration
    sampled = spec.model_copy(update={"imputation": spec.imputation.model_copy(update={"donor_pool": 10_000})})
    assert sampled.config_hash() != spec.config_hash()


MODEL_JOB = """\
version: 1
input: {url: "INPUT", format: parquet}
output: {url: "OUTPUT", layout: full}
imputation:
  m: 2
  max_iter: 2
  seed: 11
  method: {x: norm}
  formulas: {x: "x ~ y * z"}
  passive: {x2: "2 * x"}
  post: {x: {squeeze: [-1.0, 1.0]}}
  collapse: {c: {a: ab, b: ab}}
  separation: ridge
  shrinkage: null
"""


def test_job_file_takes_the_model_settings_of_impute(cluster_client, tmp_path):
    """formulas, passive, post, collapse, separation and shrinkage reach dmice.impute from a job."""
    inp = write_input(tmp_path / "in", n_files=2, rows=400)
    path = tmp_path / "job.yaml"
    path.write_text(MODEL_JOB.replace("INPUT", str(inp)).replace("OUTPUT", str(tmp_path / "out")))
    spec = jobmod.load_job(str(path), environ={})
    assert spec.imputation.formulas == {"x": "x ~ y * z"} and spec.imputation.shrinkage is None
    assert main(["run", str(path)]) == 0
    imp = dmice.open(str(tmp_path / "out"))
    src = pd.concat([pd.read_parquet(inp / f"part-{i}.parquet") for i in range(2)], ignore_index=True)
    miss = src["x"].isna().to_numpy()
    for k in (1, 2):
        done = imp.complete(k).compute().reset_index(drop=True)
        assert done["x"][miss].between(-1.0, 1.0).all() and (done["x"][miss].abs() == 1.0).any()
        np.testing.assert_array_equal(done["x2"].to_numpy(), 2 * done["x"].to_numpy())
    params = imp.manifest["parameters"]
    assert params["formulas"] == {"x": "x ~ y * z"} and params["separation"] == "ridge"
    assert imp.manifest["collapse"]["c"]


def test_job_file_marks_where_and_ignore_by_columns(cluster_client, tmp_path):
    """where and ignore name boolean marker columns of the input: the marked observed cells of
    x are imputed too, the markers stay as they were, and the run equals dmice.impute given
    the same columns on the same files."""
    inp = write_input(tmp_path / "in", n_files=2, rows=300)
    g = np.random.default_rng(5)
    for i in range(2):
        f = inp / f"part-{i}.parquet"
        part = pd.read_parquet(f)
        part["recheck"] = part["x"].notna().to_numpy() & (g.random(len(part)) < 0.2)
        part["holdout"] = g.random(len(part)) < 0.25
        part.to_parquet(f)
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(inp=inp, out=tmp_path / "out", layout="full", m=2, fmt="parquet", extra="")
                    .replace("method: {x: norm}}", "method: {x: norm}, where: {x: recheck}, ignore: holdout}"))
    assert jobmod.load_job(str(path), environ={}).imputation.where == {"x": "recheck"}
    assert main(["run", str(path)]) == 0
    imp = dmice.open(str(tmp_path / "out"))
    src = pd.concat([pd.read_parquet(inp / f"part-{i}.parquet") for i in range(2)], ignore_index=True)
    over, miss = src["recheck"].to_numpy(), src["x"].isna().to_numpy()
    direct = dmice.impute(dd.read_parquet([str(inp / f"part-{i}.parquet") for i in range(2)]), m=2,
                          max_iter=2, seed=11, method={"x": "norm"}, where={"x": "recheck"},
                          ignore="holdout")
    assert imp.n_missing["x"] == int(miss.sum() + over.sum())
    for k in (1, 2):
        done = imp.complete(k).compute().reset_index(drop=True)
        assert done[["recheck", "holdout"]].equals(src[["recheck", "holdout"]])
        np.testing.assert_array_equal(done["x"].to_numpy()[~over & ~miss], src["x"].to_numpy()[~over & ~miss])
        assert np.mean(done["x"].to_numpy()[over] != src["x"].to_numpy()[over]) > 0.9
        np.testing.assert_array_equal(done["x"].to_numpy(),
                                      direct.complete(k).compute().reset_index(drop=True)["x"].to_numpy())


def test_vacuum_removes_old_uncommitted_run_prefixes_only(lake, tmp_path, monkeypatch, capsys):
    """Runs that died before their commit leave their prefix below runs/; `dmice vacuum` removes
    those last written before the retention window, and nothing else."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(lake["out_full"], out)
    job = tmp_path / "job.yaml"
    job.write_text(lake["full"].read_text().replace(str(lake["out_full"]), str(out)))

    def crash(job, ddf, client, checkpoint_url):
        staged = Path(job.output.url) / "runs" / dying[0] / "imputation=1"
        staged.mkdir(parents=True)
        (staged / "part.0.parquet").write_bytes(b"PAR1 half-written")
        raise OSError("storage unavailable")

    dying = ["dead-old"]
    monkeypatch.setattr(jobmod, "impute_step", crash)
    assert main(["run", str(job), "--force", "--run-id", "dead-old"]) == 1
    dying[0] = "dead-new"
    assert main(["run", str(job), "--force", "--run-id", "dead-new"]) == 1
    monkeypatch.undo()
    ck = out / "runs" / "_checkpoint-0123456789abcdef" / "iter=000003"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text("{}")
    week = 8 * 24 * 3600
    for d in (out / "runs" / "dead-old", ck.parent):
        for p in [d, *d.rglob("*")]:
            st = p.stat()
            os.utime(p, (st.st_atime - week, st.st_mtime - week))
    committed = {str(p.relative_to(out)): p.read_bytes() for p in (out / "runs" / "r1").rglob("*")
                 if p.is_file()}
    capsys.readouterr()

    assert main(["vacuum", str(out), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "would remove: runs/dead-old (1 files" in err and "kept (recent): runs/dead-new" in err
    assert "would remove: runs/_checkpoint-0123456789abcdef" in err and "runs/r1" not in err
    assert (out / "runs" / "dead-old").exists()  # a dry run removes nothing

    assert main(["vacuum", str(out)]) == 0
    assert "freed" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["dead-new", "r1"]
    assert {str(p.relative_to(out)): p.read_bytes() for p in (out / "runs" / "r1").rglob("*")
            if p.is_file()} == committed
    assert main(["verify", str(out)]) == 0
    # with no retention the recent uncommitted prefix goes too; the committed run stays
    assert main(["vacuum", str(out), "--retain-hours", "0"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["r1"]
    assert main(["verify", str(out)]) == 0
    assert main(["vacuum", str(out), "--retain-hours", "-1"]) == 2
    assert "retain_hours must be a number of hours >= 0" in capsys.readouterr().err
