"""A synthetic EHR-like cohort with known truth, and the ``dmice demo`` run.

The cohort has age, sex, BMI, systolic blood pressure, cholesterol, smoking, a
three-level diet, diabetes and a binary outcome ``event`` drawn from a logistic
model with the coefficients in :data:`TRUE_COEF`.  :func:`ampute` then removes
values at random given the observed variables (MAR): the chance that a value is
missing depends on age, sex and the outcome, so complete-case estimates are
biased while multiple imputation with the outcome in the imputation models is not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit

#: true coefficients of the outcome model ``event ~ age + sex + bmi + sbp + chol + smoker + diabetes``
#: (age per 10 years, bmi per 5 kg/m2, sbp per 10 mmHg, chol per mmol/L)
TRUE_COEF = {
    "Intercept": -3.0,
    "age10": 0.35,
    "sex[M]": 0.30,
    "bmi5": 0.20,
    "sbp10": 0.15,
    "chol": 0.25,
    "smoker": 0.60,
    "diabetes": 0.50,
}

DIETS = ["omnivore", "vegetarian", "vegan"]


def make_cohort(n: int = 200_000, seed: int = 2026) -> pd.DataFrame:
    """Complete synthetic cohort of ``n`` patients (no missing values)."""
    g = np.random.default_rng(seed)
    age = np.clip(g.normal(55, 14, n), 18, 95).round(0)
    male = g.random(n) < 0.48
    diet = g.choice(3, n, p=[0.75, 0.18, 0.07])
    bmi = 27 + 0.04 * (age - 55) + 0.8 * male - 1.2 * (diet == 1) - 2.0 * (diet == 2) + g.normal(0, 4, n)
    smoker = g.random(n) < expit(-1.0 + 0.3 * male - 0.015 * (age - 55) - 0.5 * (diet > 0))
    sbp = 120 + 0.5 * (age - 55) + 0.8 * (bmi - 27) + 4 * male + 3 * smoker + g.normal(0, 12, n)
    chol = 5.2 + 0.01 * (age - 55) + 0.03 * (bmi - 27) - 0.3 * (diet > 0) + g.normal(0, 0.9, n)
    diabetes = g.random(n) < expit(-3.2 + 0.03 * (age - 55) + 0.15 * (bmi - 27) + 0.02 * (sbp - 120))
    lin = (TRUE_COEF["Intercept"] + TRUE_COEF["age10"] * (age - 55) / 10 + TRUE_COEF["sex[M]"] * male
           + TRUE_COEF["bmi5"] * (bmi - 27) / 5 + TRUE_COEF["sbp10"] * (sbp - 120) / 10
           + TRUE_COEF["chol"] * (chol - 5.2) + TRUE_COEF["smoker"] * smoker
           + TRUE_COEF["diabetes"] * diabetes)
    event = (g.random(n) < expit(lin)).astype(np.int64)
    return pd.DataFrame({
        "age": age,
        "sex": pd.Categorical(np.where(male, "M", "F"), categories=["F", "M"]),
        "bmi": bmi.round(1),
        "sbp": sbp.round(0),
        "chol": chol.round(2),
        "smoker": smoker.astype(np.int64),
        "diet": pd.Categorical(np.asarray(DIETS)[diet], categories=DIETS),
        "diabetes": diabetes,
        "event": event,
    })


def ampute(df: pd.DataFrame, seed: int = 7) -> pd.DataFrame:
    """Remove values MAR: missingness of bmi, sbp, chol, smoker and diet depends on age, sex, event."""
    g = np.random.default_rng(seed)
    out = df.copy()
    n = len(df)
    age = (df["age"].to_numpy() - 55) / 14
    male = (df["sex"] == "M").to_numpy()
    ev = df["event"].to_numpy()
    # patients with the event and older patients are measured more often (fewer missing values)
    rules = {
        "bmi": -1.0 - 0.6 * age - 1.2 * ev + 0.3 * male,
        "sbp": -0.8 - 0.8 * age - 1.5 * ev,
        "chol": -0.6 - 0.5 * age - 1.0 * ev + 0.4 * male,
        "smoker": -1.5 + 0.5 * age - 0.8 * ev,
        "diet": -1.2 - 0.3 * age + 0.2 * male,
    }
    for col, lin in rules.items():
        miss = g.random(n) < expit(lin)
        if isinstance(out[col].dtype, pd.CategoricalDtype):
            out.loc[miss, col] = np.nan
        else:
            out[col] = out[col].astype("Int64" if col == "smoker" else "float64")
            out.loc[miss, col] = pd.NA if col == "smoker" else np.nan
    out["diabetes"] = out["diabetes"].astype("boolean")
    return out


def outcome_design(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Design of the demo's outcome model (columns in the order of :data:`TRUE_COEF`)."""
    X = np.column_stack([
        np.ones(len(df)),
        (df["age"].to_numpy(dtype=float) - 55) / 10,
        (df["sex"] == "M").to_numpy(dtype=float),
        (df["bmi"].to_numpy(dtype=float) - 27) / 5,
        (df["sbp"].to_numpy(dtype=float) - 120) / 10,
        df["chol"].to_numpy(dtype=float) - 5.2,
        df["smoker"].to_numpy(dtype=float),
        df["diabetes"].to_numpy(dtype=float),
    ])
    return X, df["event"].to_numpy(dtype=float)


def run_demo(*, n: int = 200_000, m: int = 5, max_iter: int = 10, seed: int = 1,
             output: str | None = None, n_workers: int | None = None, echo=print) -> pd.DataFrame:
    """Generate, ampute, impute on an embedded cluster, write, and compare with the truth."""
    import os
    import tempfile
    import time

    import dask.dataframe as dd
    import statsmodels.api as sm

    from dmice.analysis import fit_glm
    from dmice.api import impute
    from dmice.pooling import pool
    from dmice.runtime import cluster as _cluster
    from dmice.runtime import passes as _passes

    t0 = time.perf_counter()
    full = make_cohort(n, seed=seed)
    data = ampute(full, seed=seed + 1)
    miss = data.isna().sum()
    echo(f"dmice demo: synthetic cohort of {n:,} patients, {len(data.columns)} columns")
    echo("missing values (MAR, depending on age, sex and the outcome): "
         + ", ".join(f"{c} {v / n:.0%}" for c, v in miss.items() if v))
    client, cluster = _cluster.get_client(n_workers=n_workers)
    try:
        echo(f"cluster: {len(_cluster.workers(client))} workers "
             f"({'embedded LocalCluster' if cluster is not None else 'existing client'})")
        # the partitions go to the workers once, rather than inside every task graph
        nparts = max(2, n // 100_000)
        bounds = np.linspace(0, n, nparts + 1).astype(int)
        chunks = _passes.scatter(client, [data.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
        ddf = dd.from_delayed(chunks, meta=data.iloc[:0], verify_meta=False)
        t1 = time.perf_counter()

        def progress(it: int, total: int, secs: float) -> None:
            echo(f"  iteration {it}/{total}  {secs:5.2f} s")

        echo(f"imputing m={m} data sets, {max_iter} iterations ...")
        imp = impute(ddf, m=m, max_iter=max_iter, seed=seed, client=client, progress=progress)
        t_imp = time.perf_counter() - t1
        echo(repr(imp))
        out = output or os.path.join(tempfile.mkdtemp(prefix="dmice-demo-"), "imputed")
        imp.to_parquet(out, overwrite=output is not None)
        echo(f"wrote {m} imputations to {out}")

        terms = list(TRUE_COEF)
        frames = [imp.complete(k) for k in range(1, m + 1)]
        fit = fit_glm(frames, outcome_design, terms, family="binomial", client=client)
        pooled_res = pool(fit.params, fit.cov, dfcom=fit.df_resid, terms=terms)
        pooled, pooled_full = pooled_res.summary(), pooled_res.pooled
        X_full, y_full = outcome_design(full)
        full_fit = sm.GLM(y_full, X_full, family=sm.families.Binomial()).fit()
        cc = data.dropna()
        X_cc, y_cc = outcome_design(cc)
        cc_fit = sm.GLM(y_cc, X_cc, family=sm.families.Binomial()).fit()
    finally:
        _cluster.close(client, cluster)
    table = pd.DataFrame({
        "term": terms,
        "truth": [TRUE_COEF[t] for t in terms],
        "full_data": full_fit.params,
        "complete_case": cc_fit.params,
        "cc_se": cc_fit.bse,
        "pooled": pooled["estimate"].to_numpy(),
        "pooled_se": pooled["std_error"].to_numpy(),
        "conf_low": pooled["conf_low"].to_numpy(),
        "conf_high": pooled["conf_high"].to_numpy(),
        "df": pooled["df"].to_numpy(),
        "fmi": pooled_full["fmi"].to_numpy(),
    })
    echo(f"\noutcome model: event ~ age + sex + bmi + sbp + chol + smoker + diabetes "
         f"(logistic; complete cases: {len(cc):,} of {n:,} rows)")
    echo(table.to_string(index=False, float_format=lambda v: f"{v:8.3f}", formatters={"df": "{:8.0f}".format}) + "\n")
    for ref in ("truth", "full_data"):
        cc_bias = np.abs(table["complete_case"] - table[ref]) / table["cc_se"]
        mi_bias = np.abs(table["pooled"] - table[ref]) / table["pooled_se"]
        echo(f"largest |estimate - {ref}| / SE: complete cases {cc_bias.max():.1f}, "
             f"multiple imputation {mi_bias.max():.1f}")
    echo("(full_data: the same model fitted before any value was removed)")
    echo(f"imputation took {t_imp:.1f} s; whole demo {time.perf_counter() - t0:.1f} s")
    return table
