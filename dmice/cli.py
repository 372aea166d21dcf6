"""The ``dmice`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dmice.errors import DmiceError

#: exit codes
OK, INVALID_INPUT, FAILED = 0, 2, 1


def _read(path: str, fmt: str | None, storage_options: dict[str, Any] | None) -> Any:
    import dask.dataframe as dd

    fmt = fmt or ("csv" if path.rstrip("/").endswith((".csv", ".csv.gz")) else "parquet")
    if fmt == "csv":
        return dd.read_csv(path, storage_options=storage_options)
    return dd.read_parquet(path, storage_options=storage_options)


def _impute(args: argparse.Namespace) -> int:
    from dmice.api import impute

    ddf = _read(args.input, args.format, None)
    method = dict(kv.split("=", 1) for kv in args.method or [])
    with impute(ddf, m=args.m, max_iter=args.max_iter, seed=args.seed, method=method or None,
                progress=lambda it, tot, s: print(f"iteration {it}/{tot} {s:.2f} s", file=sys.stderr)
                ) as imp:
        print(imp, file=sys.stderr)
        imp.to_parquet(args.output, overwrite=args.overwrite)
    print(args.output)
    return OK


def _analyze(args: argparse.Namespace) -> int:
    import json

    from dmice.analysis import analyze

    res = analyze(args.output_dir, args.formula, family=args.family, link=args.link,
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


def _demo(args: argparse.Namespace) -> int:
    from dmice.demo import run_demo

    run_demo(n=args.rows, m=args.m, max_iter=args.max_iter, seed=args.seed, output=args.output)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except DmiceError as e:
        print(f"dmice: error: {e}", file=sys.stderr)
        return INVALID_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
