"""R-hat against ArviZ's values on hand-made chains; convergence tables of a real run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import mixed_frame

import dmice
from dmice.diagnostics import autocorrelation, convergence, rhat

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "rhat_golden.json").read_text())


@pytest.mark.parametrize("name", [k for k in GOLDEN if not k.startswith("_")])
def test_rhat_equals_arviz_rank_rhat(name):
    case = GOLDEN[name]
    assert rhat(np.array(case["chains"])) == pytest.approx(case["rhat_rank"], rel=1e-10)


def test_rhat_flags_chains_that_disagree():
    assert GOLDEN["iid"]["rhat_rank"] < 1.1 < GOLDEN["shifted_chain"]["rhat_rank"]
    assert np.isnan(rhat(np.zeros((3, 2))))  # too few draws


def test_autocorrelation_by_hand():
    x = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    d = x - x.mean(axis=1, keepdims=True)
    expect = (d[:, 1:] * d[:, :-1]).sum() / (d**2).sum()
    assert autocorrelation(x) == pytest.approx(expect)
    ar = np.zeros((2, 500))
    g = np.random.default_rng(1)
    for t in range(1, 500):
        ar[:, t] = 0.8 * ar[:, t - 1] + g.normal(size=2)
    assert autocorrelation(ar) == pytest.approx(0.8, abs=0.06)


def test_convergence_of_a_run_and_diagnostics_file(cluster_client, tmp_path):
    df = mixed_frame(2000, seed=9)
    imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=3, max_iter=6, seed=2)
    conv = imp.convergence()
    assert set(conv["variable"]) == {"x", "z", "c", "s"}
    assert {"mean", "sd"} <= set(conv.loc[conv.variable == "x", "statistic"])
    assert conv["rhat"].notna().all()
    by_hand = imp.chain_stats.query("variable == 'x'").pivot_table(
        index="chain", columns="iteration", values="mean").to_numpy()
    assert conv.query("variable == 'x' and statistic == 'mean'")["rhat"].iloc[0] == rhat(by_hand)
    assert "R-hat" in repr(imp)
    out = str(tmp_path / "o")
    imp.to_parquet(out)
    assert os.path.exists(f"{out}/_diagnostics.arrow")
    again = dmice.open(out)
    pd.testing.assert_frame_equal(again.chain_stats, imp.chain_stats)
    man = json.load(open(f"{out}/_manifest.json"))
    assert "verdict" in man["convergence"] and "x mean" in man["convergence"]["rhat"]
    pd.testing.assert_frame_equal(convergence(again.chain_stats), conv)


def test_verdict_threshold_is_calibrated_on_well_mixed_chains():
    """Independent draws (perfect mixing) are called converged about 95% of the time, whatever the
    number of iterations; chains stuck at different levels are not."""
    from dmice.diagnostics import convergence, rhat, rhat_batch, threshold, verdict

    g = np.random.default_rng(7)
    x = g.standard_normal((30, 4, 6))
    np.testing.assert_allclose(rhat_batch(x), [rhat(a) for a in x], rtol=1e-12)

    def stats(chains, iters, shift=0.0):
        rows = []
        for var in ("a", "b", "c"):
            for c in range(chains):
                for it in range(1, iters + 1):
                    rows.append({"iteration": it, "variable": var, "chain": c + 1,
                                 "mean": g.normal() + shift * c, "sd": 1 + 0.1 * g.normal()})
        return pd.DataFrame(rows)

    for chains, iters in ((5, 10), (5, 40)):
        w = iters // 2
        ok = [verdict(convergence(stats(chains, iters), window=w), (iters - w + 1, iters), chains=chains)
              .split(": ")[-1].startswith("converged") for _ in range(200)]
        # family-wise 5% false alarms over the 6 statistics (binomial SE of the rate about 0.015)
        assert 0.88 < np.mean(ok) <= 1.0, (chains, iters, np.mean(ok))
    assert threshold(5, 5, 6) > 1.3 and threshold(5, 200, 6) == 1.05
    stuck = verdict(convergence(stats(5, 10, shift=3.0), window=5), (6, 10), chains=5)
    assert "NOT converged" in stuck
