"""The Python API in a few lines: impute a dask DataFrame, look at the result, write and reopen it.

Run with ``python examples/quickstart.py``.
"""

import tempfile

import dask.dataframe as dd

import dmice
from dmice.demo import ampute, make_cohort

if __name__ == "__main__":
    data = ampute(make_cohort(50_000, seed=3))  # a cohort with values missing at random
    ddf = dd.from_pandas(data, npartitions=2)

    with dmice.impute(ddf, m=5, max_iter=10, seed=1) as imp:  # embedded LocalCluster
        print(imp)  # m, iterations, variables, methods, missing counts
        first = imp.complete(1)  # lazy dask DataFrame, original columns and dtypes
        print(first.head())
        out = tempfile.mkdtemp() + "/imputed"
        imp.to_parquet(out)  # out/imputation=k/part.N.parquet, _manifest.json, _SUCCESS

    again = dmice.open(out)  # the same imputations, read lazily from disk
    print(again)
    print(dd.read_parquet(out).groupby("imputation").size().compute())
