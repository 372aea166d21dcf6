"""The ``dmice`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dmice.errors import DmiceError, InputError, OutputError

#: exit codes (also those of the job commands, see dmice.job)
OK, INVALID_INPUT, FAILED = 0, 2, 1
CONFLICT, VERIFY_FAILED = 3, 4


def _read(path: str, fmt: str | None, storage_options: dict[str, Any] | None) -> Any:
    import dask.dataframe as dd
    import fsspec

    from dmice import store

    fmt = fmt or ("csv" if path.rstrip("/").endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")) else "parquet")
    if fmt == "csv":
        return store.read_csv(path, storage_options)
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    found = fs.glob(root) if fsspec.core.has_magic(root) else fs.exists(root)
    if not found:
        raise InputError(f"input: no file found at {path!r}")
    return dd.read_parquet(path, storage_options=storage_options)


def _methods(items: list[str] | None) -> dict[str, str] | None:
    out = {}
    for kv in items or []:
        name, eq, method = kv.partition("=")
        if not eq or not name or not method:
            raise InputError("--method: expected COLUMN=METHOD, e.g. --method bmi=norm")
        out[name] = method
    return out or None


def _impute(args: argparse.Namespace) -> int:
    import dmice.api
    from dmice import store

    method = _methods(args.method)
    # a non-empty output is refused before anything is read or imputed
    store.check_target(args.output, None, args.overwrite)
    ddf = _read(args.input, args.format, None)
    logging.getLogger("dmice").setLevel(logging.INFO)  # one key=value line per iteration
    with dmice.api.impute(ddf, m=args.m, max_iter=args.max_iter, seed=args.seed, method=method,
                          until_rhat=args.until_rhat, progress="auto") as imp:
        print(imp, file=sys.stderr)
        imp.to_parquet(args.output, overwrite=args.overwrite)
    print(args.output)
    return OK


def _analyze(args: argparse.Namespace) -> int:
    import json

    import dmice.analysis

    res = dmice.analysis.analyze(args.output_dir, args.formula, family=args.family, link=args.link,
                                 weights=args.weights, offset=args.offset, cov_type=args.cov_type)
    table = res.table(exponentiate=args.exponentiate)
    full = table.merge(res.pooled.drop(columns=["estimate", "fmi"]), on="term")
    print(repr(res))
    extra: dict[str, Any] = {}
    if res.family == "gaussian" and res.m >= 2:
        r2 = {"R^2": res.r_squared(), "adj R^2": res.r_squared(adjusted=True)}
        for name, t in r2.items():
            row = t.iloc[0]
            print(f"pooled {name}: {row['est']:.4g} (95% CI {row['lo_95']:.4g} to {row['hi_95']:.4g}, "
                  f"fmi {row['fmi']:.3g})")
        extra["r_squared"] = {name: t.iloc[0].to_dict() for name, t in r2.items()}
    if args.csv:
        full.to_csv(args.csv, index=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"formula": args.formula, "family": args.family, "m": res.m, "nobs": res.nobs,
                       "dfcom": res.dfcom, "table": full.to_dict(orient="records"), **extra}, f,
                      indent=1, default=float)
    return OK


def _validate(args: argparse.Namespace) -> int:
    from dmice.job import validate

    job, info = validate(args.job)
    print(f"ok: {args.job}: {len(info.files)} input files, {len(info.columns)} columns, "
          f"m={job.imputation.m}, layout={job.output.layout}", file=sys.stderr)
    return OK


def _run(args: argparse.Namespace) -> int:
    from dmice.job import load_job, run_job

    job = load_job(args.job)
    out = run_job(job, run_id=args.run_id, force=args.force)
    what = "already complete, nothing to do" if out.status == "noop" else "committed"
    print(f"{what}: run {out.run_id} at {out.url}", file=sys.stderr)
    return OK


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    import json
    import os

    raw = args.storage_options or os.environ.get("DMICE_OUTPUT_STORAGE_OPTIONS")
    try:
        so = json.loads(raw) if raw else None
    except ValueError:
        raise InputError("--storage-options: expected a JSON object of storage options") from None
    if so is not None and not isinstance(so, dict):
        raise InputError("--storage-options: expected a JSON object of storage options")
    return so


def _verify(args: argparse.Namespace) -> int:
    from dmice.store import verify

    man = verify(args.output, _storage_options(args))
    n = len(man.get("files", [])) + len(man.get("aux_files", []))
    print(f"ok: {args.output}: {n} files match the manifest (run {man.get('run_id', '-')})",
          file=sys.stderr)
    return OK


def _vacuum(args: argparse.Namespace) -> int:
    import datetime as _dt

    from dmice.store import VACUUM_RETAIN_HOURS, vacuum

    if args.retain_hours is None:
        args.retain_hours = VACUUM_RETAIN_HOURS
    recs = vacuum(args.output, _storage_options(args), args.retain_hours, args.dry_run)
    for r in recs:
        when = _dt.datetime.fromtimestamp(r["newest"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        verb = "removed" if r["removed"] else "would remove" if r["expired"] else "kept (recent)"
        print(f"{verb}: {r['prefix']} ({r['files']} files, {r['bytes']:,} bytes, last written {when})",
              file=sys.stderr)
    gone = [r for r in recs if r["expired"]]
    print(f"{'would free' if args.dry_run else 'freed'} {sum(r['bytes'] for r in gone):,} bytes in "
          f"{len(gone)} uncommitted run prefixes of {args.output}; kept {len(recs) - len(gone)} "
          f"written in the last {args.retain_hours:g} hours", file=sys.stderr)
    return OK


def _schema(args: argparse.Namespace) -> int:
    from dmice.job import schema_text

    sys.stdout.write(schema_text())
    return OK


def _exit_code(e: BaseException) -> int:
    from dmice.job import ConflictError
    from dmice.store import VerifyError

    if isinstance(e, VerifyError):
        return VERIFY_FAILED
    if isinstance(e, (ConflictError, OutputError)):
        return CONFLICT
    if isinstance(e, DmiceError):
        return INVALID_INPUT
    return FAILED


def _unexpected(e: BaseException) -> str:
    """One line for an unexpected error, without data values: the exception type and where it
    was raised; the message only for I/O errors (storage, network), which carry no data."""
    import traceback

    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    msg = ""
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        msg = ": " + str(e).splitlines()[0][:300] if str(e) else ""
    return f"unexpected {type(e).__name__}{where}{msg} (DMICE_DEBUG=1 prints the traceback)"


def _demo(args: argparse.Namespace) -> int:
    from dmice.demo import run_demo

    run_demo(n=args.rows, m=args.m, max_iter=args.max_iter, seed=args.seed, output=args.output)
    return OK


def _diagnose(args: argparse.Namespace) -> int:
    from dmice import store
    from dmice.report import build_report

    store.read_manifest(args.output_dir)  # a missing or incomplete output is named before anything else
    try:
        written = build_report(args.output_dir, bins=args.bins, variables=args.variable or None)
    except ImportError as e:
        print(f"dmice: error: {e}", file=sys.stderr)
        return FAILED
    for name in ("trace", "densities", "pattern"):
        if name not in written:
            print(f"dmice: {name} plot not drawn (see the report)", file=sys.stderr)
    print(written["report"])
    return OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dmice", description="Multiple imputation by chained "
                                     "equations on Dask.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("impute", help="impute a Parquet or CSV data set and write m Parquet sets")
    p.add_argument("input", help="Parquet directory/file or CSV file (fsspec URL)")
    p.add_argument("output", help="output directory (fsspec URL)")
    p.add_argument("--m", type=int, default=5, help="number of imputations (default 5)")
    p.add_argument("--max-iter", type=int, default=10, help="iterations (default 10)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and recorded)")
    p.add_argument("--until-rhat", type=float, default=None, metavar="R",
                   help="stop before --max-iter once every R-hat is below R (e.g. 1.05)")
    p.add_argument("--method", action="append", metavar="COLUMN=METHOD",
                   help="method for a column, e.g. --method bmi=norm (repeatable)")
    p.add_argument("--format", choices=["parquet", "csv"], default=None, help="input format")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    p.set_defaults(func=_impute)
    a = sub.add_parser("analyze", help="fit a GLM on every imputation of an output and pool it")
    a.add_argument("output_dir", help="directory written by `dmice impute` (fsspec URL)")
    a.add_argument("--formula", required=True, help='e.g. "event ~ age + sbp + C(diet)"')
    a.add_argument("--family", default="gaussian", choices=["gaussian", "binomial", "poisson"])
    a.add_argument("--link", default=None, help="binomial: logit (default), probit or cloglog")
    a.add_argument("--weights", default=None, help="column of weights")
    a.add_argument("--offset", default=None, help="column of the offset")
    a.add_argument("--cov-type", default="nonrobust", choices=["nonrobust", "HC0", "HC1"])
    a.add_argument("--exponentiate", action="store_true", help="odds or rate ratios")
    a.add_argument("--csv", default=None, help="also write the table as CSV here")
    a.add_argument("--json", default=None, help="also write the table as JSON here")
    a.set_defaults(func=_analyze)
    d = sub.add_parser("demo", help="impute a synthetic cohort and compare with the truth")
    d.add_argument("--rows", type=int, default=200_000)
    d.add_argument("--m", type=int, default=5)
    d.add_argument("--max-iter", type=int, default=10)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--output", default=None, help="where to write the imputations (default: a "
                   "temporary directory)")
    d.set_defaults(func=_demo)
    g = sub.add_parser("diagnose", help="write trace, density and pattern plots and an HTML report "
                       "into OUTPUT_DIR/_diagnostics/")
    g.add_argument("output_dir", help="directory written by `dmice impute` (fsspec URL)")
    g.add_argument("--bins", type=int, default=40, help="bins of the density plots; must divide 120 "
                   "(default 40)")
    g.add_argument("--variable", action="append", metavar="COLUMN",
                   help="plot only this imputed column (repeatable; default: all imputed columns)")
    g.set_defaults(func=_diagnose)
    v = sub.add_parser("validate", help="check a job file and its input's columns (exit 0, or 2 "
                       "with the bad key)")
    v.add_argument("job", help="job file (YAML or JSON)")
    v.set_defaults(func=_validate, job_command=True)
    r = sub.add_parser("run", help="run a job: impute, write under a run prefix, commit; a no-op "
                       "when the output is already complete")
    r.add_argument("job", help="job file (YAML or JSON)")
    r.add_argument("--run-id", default=None, help="name of this run's prefix (default: UTC time "
                   "and a random suffix); a retry with the same id replaces its uncommitted files")
    r.add_argument("--force", action="store_true", help="recompute a complete output of the same job")
    r.set_defaults(func=_run, job_command=True)
    f = sub.add_parser("verify", help="check an output's files against its manifest (exit 0, or 4 "
                       "naming the bad file)")
    f.add_argument("output", help="output directory (fsspec URL)")
    f.add_argument("--storage-options", default=None, help="JSON object passed to fsspec (default: "
                   "$DMICE_OUTPUT_STORAGE_OPTIONS)")
    f.set_defaults(func=_verify, job_command=True)
    w = sub.add_parser("vacuum", help="remove the uncommitted run prefixes of killed or superseded "
                       "job runs (older than --retain-hours) below an output's runs/")
    w.add_argument("output", help="output directory of a job (fsspec URL)")
    w.add_argument("--retain-hours", type=float, default=None, help="keep prefixes with a file "
                   "written in the last this many hours: a run may still be writing them, or a retry "
                   "resume from its checkpoint (default: one week)")
    w.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    w.add_argument("--storage-options", default=None, help="JSON object passed to fsspec (default: "
                   "$DMICE_OUTPUT_STORAGE_OPTIONS)")
    w.set_defaults(func=_vacuum, job_command=True)
    s = sub.add_parser("schema", help="print the JSON Schema of job files")
    s.set_defaults(func=_schema, job_command=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "job_command", False):
        logging.getLogger("dmice").setLevel(logging.INFO)
    try:
        return args.func(args)
    except DmiceError as e:
        print(f"dmice: error: {e}", file=sys.stderr)
        if not getattr(args, "job_command", False):
            return INVALID_INPUT
        return _exit_code(e)
    except Exception as e:  # noqa: BLE001 - every command promises an exit code and one line
        import os

        if os.environ.get("DMICE_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"dmice: error: {_unexpected(e)}", file=sys.stderr)
        return FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
