"""Diagnostics of an imputation: trace plots, observed against imputed values, missing-data pattern.

Run with ``python examples/diagnostics.py``; writes the figures shown in the README into
``examples/figures/`` and an HTML report next to the imputations (``dmice diagnose``).
"""

import os
import tempfile

import dask.dataframe as dd

import dmice
from dmice.demo import ampute, make_cohort
from dmice.report import build_report

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")

if __name__ == "__main__":
    os.makedirs(HERE, exist_ok=True)
    data = ampute(make_cohort(20_000, seed=3))
    ddf = dd.from_pandas(data, npartitions=4)
    print(dmice.md_pattern(ddf))  # R's md.pattern: patterns, their counts, missing values per column
    dmice.plot_pattern(ddf).savefig(os.path.join(HERE, "pattern.png"), dpi=80)

    with dmice.impute(ddf, m=5, max_iter=15, seed=1) as imp:
        print(imp.convergence())  # R-hat and lag-1 autocorrelation of every chain statistic
        imp.plot_trace(["bmi", "chol", "smoker"]).savefig(os.path.join(HERE, "trace.png"), dpi=70)
        imp.plot_densities(["bmi", "sbp", "chol", "smoker", "diet"]).savefig(
            os.path.join(HERE, "densities.png"), dpi=80)
        out = tempfile.mkdtemp() + "/imputed"
        imp.to_parquet(out)  # keeps binned counts and the pattern in the manifest

    # the same figures from the written output, plus an HTML report (as `dmice diagnose OUT`)
    written = build_report(out)
    print(written["report"])
