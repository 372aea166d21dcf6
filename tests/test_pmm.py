"""Predictive mean matching on all observed rows (exact distributed type-1 matching).

The scenario of von Hippel (2025): X ~ N(0, 1), Y = X + e, P(Y missing) = expit(-1 + 3X), so
nearly every row with X > 1.5 has Y missing and the few observed ones are the only donors
there.  Matching against a sample of the observed rows (the former default, ``donor_pool=10_000``)
takes donors from farther down; matching on all observed rows (as R mice) takes the nearest.
"""

from __future__ import annotations

import importlib.util

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

import dmice


def _scenario(n: int, seed: int) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    x = g.standard_normal(n)
    y = x + g.standard_normal(n)
    y[g.random(n) < expit(-1 + 3 * x)] = np.nan
    return pd.DataFrame({"x": x, "y": y})


def _nearest_run(s: np.ndarray, t: np.ndarray, d: int) -> np.ndarray:
    """Start of the run of the ``d`` values of sorted ``s`` nearest to each ``t``."""
    hi = np.searchsorted(s, t)
    lo = hi.copy()
    ext = np.concatenate([[-np.inf], s, [np.inf]])
    for _ in range(d):
        left = (t - ext[lo]) <= (ext[hi + 1] - t)
        lo -= left
        hi += ~left
    return lo


def _reference_offsets(df: pd.DataFrame, reps: int, seed: int, tail: float = 1.5) -> np.ndarray:
    """Single-machine type-1 pmm on all observed rows (mice's draw: beta* from the posterior,
    donors from beta_hat, one of the 5 nearest at random): per replication, the mean of (donor's
    x - recipient's x) over the recipients with x > ``tail``."""
    g = np.random.default_rng(seed)
    obs = df["y"].notna().to_numpy()
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    X = np.column_stack([np.ones(obs.sum()), x[obs]])
    V = np.linalg.inv(X.T @ X)
    bhat = V @ X.T @ y[obs]
    rss = float(np.sum((y[obs] - X @ bhat) ** 2))
    yh_obs = X @ bhat
    srt = np.argsort(yh_obs)
    xm = x[~obs]
    sel = xm > tail
    out = []
    for _ in range(reps):
        sigma = np.sqrt(rss / g.chisquare(obs.sum() - 2))
        bstar = bhat + sigma * np.linalg.cholesky(V) @ g.standard_normal(2)
        t = bstar[0] + bstar[1] * xm
        donor = srt[_nearest_run(yh_obs[srt], t, 5) + g.integers(0, 5, len(t))]
        out.append(np.mean(x[obs][donor][sel] - xm[sel]))
    return np.array(out)


def _donor_offsets(df: pd.DataFrame, imp: dmice.MultipleImputation, tail: float = 1.5) -> np.ndarray:
    """Per imputation, the mean of (donor's x - recipient's x) over the recipients with x > ``tail``;
    the donor is found from its value (the observed y are distinct)."""
    obs = df["y"].notna().to_numpy()
    yo = df["y"].to_numpy()[obs]
    xo = df["x"].to_numpy()[obs]
    srt = np.argsort(yo)
    out = []
    for k in range(1, imp.m + 1):
        c = imp.complete(k).compute().sort_index()
        vals = c["y"].to_numpy()[~obs]
        pos = np.searchsorted(yo[srt], vals)
        assert np.array_equal(yo[srt][pos], vals)  # every imputed value is an observed one
        xd = xo[srt][pos]
        xm = df["x"].to_numpy()[~obs]
        sel = xm > tail
        out.append(np.mean(xd[sel] - xm[sel]))
    return np.array(out)


def test_pmm_default_matches_on_all_observed_rows(cluster_client):
    """Finding 10: at 60,000 rows (about 38,000 observed, more than the former sample of 10,000),
    the donors of the recipients in the sparse tail are as near as with matching on all
    observed rows.  The former default took them about 0.1 sd of x farther down (-0.21 against
    -0.11), 8 standard errors of this comparison."""
    df = _scenario(60_000, 3)
    imp = dmice.impute(dd.from_pandas(df, npartitions=3), m=5, max_iter=1, seed=11,
                       client=cluster_client, progress=None)
    got = _donor_offsets(df, imp)
    ref = _reference_offsets(df, 40, 7)
    se = np.sqrt(got.var(ddof=1) / len(got) + ref.var(ddof=1) / len(ref))
    assert abs(got.mean() - ref.mean()) < 4 * se + 0.01, (got.mean(), ref.mean(), se)


def _exact_visit(df, parts, m=3, seed=5, match_bytes=256 * 2**20):
    """One exact pmm visit of ``y`` on in-memory blocks, as the engine runs it: statistics, fit,
    draws, matching rounds, imputation.  Returns ``(model, plan, blocks, order, new_blocks)``."""
    from conftest import encoded_blocks

    from dmice import block as B
    from dmice.models import make_model

    variables, plan, blocks, pools = encoded_blocks(df, {"y": "pmm"}, m=m, parts=parts, seed=seed)
    j = [v.name for v in variables].index("y")
    own = set(range(*variables[j].cols))
    xcols = np.array([c for c in range(plan.n_cols) if c not in own])
    model = make_model(j, variables[j], xcols, m=m, seed=plan.seed, sample_pool=pools[j], exact=True,
                        match_bytes=match_bytes)
    req = model.request()
    assert "pool" not in req
    assert model.update(B.combine([B.get_out(B.visit(b, plan, None, req)) for b in blocks]), 1, [])
    order = model.order(1)
    assert order["match"]
    for phase in model.match_phases(order):
        model.take_match(phase, B.combine([B.get_out(B.visit(b, plan, phase, None)) for b in blocks]))
    raw = dict(order)
    order = model.matched_order(order, 1, [])
    new = [B.visit(b, plan, order, None) for b in blocks]
    return model, plan, blocks, raw, new, j


@pytest.mark.parametrize("parts", [1, 3])
def test_exact_matching_takes_one_of_the_five_nearest_of_all_observed_rows(parts, monkeypatch):
    """Brute force on one machine: each chain's predictions of all observed rows (beta_hat) and of
    the missing rows (beta*), the 5 nearest by absolute difference; every imputed value is the
    value of one of them (or of a row whose prediction ties with the fifth).  Also when the chains are split over several matching rounds."""
    from conftest import chain_design_stack, mixed_frame


    df = mixed_frame(3000, seed=2)
    df.loc[np.random.default_rng(9).random(len(df)) < 0.3, "y"] = np.nan
    model, plan, blocks, order, new, j = _exact_visit(df, parts, match_bytes=1)  # a chain per round
    cols = model.xcols
    for c in range(plan.m):
        Xo = np.concatenate([chain_design_stack(b, plan, b.obs[j], cols)[c] for b in blocks])
        Xm = np.concatenate([chain_design_stack(b, plan, b.mis[j], cols)[c] for b in blocks])
        yo = np.concatenate([b.values[j][b.obs[j]] for b in blocks])
        yh = Xo @ model._fits[c].coef
        t = Xm @ order["beta"][c]
        got = np.concatenate([nb.imp[j][c] for nb in new])
        assert len(got) == len(t) > 100
        for ti, v in zip(t, got):
            dist = np.abs(yh - ti)  # rows whose predictions tie may stand in for each other
            assert dist[yo == v].min() <= np.partition(dist, 4)[4] + 1e-12


def test_exact_matching_uses_every_one_of_the_five_and_breaks_ties_at_random():
    """For one prediction, each of the 5 nearest is drawn about equally often; observed rows with
    equal predictions stand in for each other: every row of a tie that reaches into the 5
    nearest is drawn equally often, not only the 5 that the sorted order puts first."""
    from dmice.methods import pmm as P

    g = np.random.default_rng(0)
    s = np.sort(g.normal(size=100))
    pos, _ = P.match(s, np.full(20000, s[50] + 1e-9), 5, P.uniforms(g, 20000), 1.0)
    counts = np.bincount(pos, minlength=100)
    near = np.argsort(np.abs(s - s[50]))[:5]
    assert set(np.nonzero(counts)[0]) == set(near)
    assert counts[near].min() > 20000 / 5 - 4 * np.sqrt(20000 * 0.2 * 0.8)
    # 50 rows share each of two predictions: the 5 nearest to 0.1 are all in the first tie, and
    # each of its 50 rows is drawn with probability 1/50 (binomial bounds, 4 sd)
    s = np.repeat([0.0, 1.0], 50)
    pos, _ = P.match(s, np.full(50_000, 0.1), 5, P.uniforms(g, 50_000), 1.0)
    counts = np.bincount(pos, minlength=100)
    sd = np.sqrt(50_000 * 0.02 * 0.98)
    assert counts[50:].sum() == 0
    assert np.all(np.abs(counts[:50] - 1000) < 4 * sd)
    # a run of 5 that straddles two ties (prediction halfway): every row of both drawn alike
    pos, _ = P.match(s, np.full(50_000, 0.5), 5, P.uniforms(g, 50_000), 1.0)
    counts = np.bincount(pos, minlength=100)
    sd = np.sqrt(50_000 * 0.01 * 0.99)
    assert np.all(np.abs(counts - 500) < 4 * sd)


def test_exact_matching_does_not_depend_on_the_partitioning_of_the_donors():
    """The donors found for a missing cell are the same whether the observed rows are one
    partition or three (the merge of the partitions' sorted predictions is the global sort)."""
    from dmice.methods import pmm as P

    g = np.random.default_rng(4)
    yh = g.normal(size=3000)
    y = g.normal(size=3000)
    t = np.sort(g.normal(size=500) * 2)
    runs = []
    for cuts in ([0, 3000], [0, 1000, 1700, 3000]):
        parts = [np.sort(yh[a:b]) for a, b in zip(cuts, cuts[1:])]
        pys = [y[a:b][np.argsort(yh[a:b])] for a, b in zip(cuts, cuts[1:])]
        s, order = P.merge(np.concatenate(parts))
        ys = np.concatenate(pys)[order]
        lo, _ = P.nearest_runs(s, t, 5, np.random.default_rng(0).random(len(t)))
        runs.append([frozenset(ys[a:a + 5]) for a in lo])
    assert runs[0] == runs[1]


def test_donor_scarcity_is_logged_with_norm_as_the_alternative(cluster_client, tmp_path):
    """The von Hippel scenario: the missing cells' predictions pile up where few rows are observed;
    the event names the column, counts only, and points to norm; the output's report shows it.
    Under MCAR it is not logged."""
    df = _scenario(20_000, 1)
    imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=2, max_iter=2, seed=3,
                       client=cluster_client, progress=None)
    ev = imp.logged_events
    hit = ev[ev["event"].str.startswith("donor scarcity")]
    assert list(hit["variable"]) == ["y"]  # logged once
    msg = hit["event"].iloc[0]
    assert "'norm'" in msg and f"of {int(df['y'].isna().sum())} missing cells" in msg
    for v in df["y"].dropna().to_numpy()[:200]:  # no value in the message
        assert f"{v:.3f}" not in msg
    if importlib.util.find_spec("matplotlib") is not None:
        from dmice.report import build_report

        imp.to_parquet(str(tmp_path / "out"))
        page = open(build_report(str(tmp_path / "out"))["report"]).read()
        assert "donor scarcity" in page and "consider method" in page
    g = np.random.default_rng(2)
    mcar = _scenario(20_000, 1)
    mcar["y"] = mcar["x"] + g.standard_normal(len(mcar))
    mcar.loc[g.random(len(mcar)) < 0.4, "y"] = np.nan
    imp = dmice.impute(dd.from_pandas(mcar, npartitions=2), m=2, max_iter=2, seed=3,
                       client=cluster_client, progress=None)
    assert not imp.logged_events["event"].str.startswith("donor scarcity").any() \
        if len(imp.logged_events) else True


def test_donor_pool_keeps_the_sample_based_matching(cluster_client):
    """An explicit donor_pool matches against a fixed sample of that many observed rows, as before."""
    df = _scenario(6000, 2)
    imp = dmice.impute(dd.from_pandas(df, npartitions=2), m=2, max_iter=1, seed=3, donor_pool=300,
                       client=cluster_client, progress=None)
    assert imp.parameters["donor_pool"] == 300
    obs = df["y"].dropna().to_numpy()
    used = np.unique(np.concatenate([imp.complete(k).compute()["y"].to_numpy()[df["y"].isna().to_numpy()]
                                     for k in (1, 2)]))
    assert np.isin(used, obs).all() and len(used) <= 300
    assert dmice.impute(dd.from_pandas(df, npartitions=2), m=1, max_iter=0, seed=3,
                        client=cluster_client, progress=None).parameters["donor_pool"] is None
    with pytest.raises(dmice.InputError, match="donor_pool"):
        dmice.impute(df, donor_pool=0, client=cluster_client, progress=None)


def test_ranges_hold_each_cells_nearest_donors_of_all_partitions():
    """Matching among the workers: the predictions split into ranges, each partition sending each
    range its rows in it and the d nearest beyond its ends; every cell gets exactly the value the
    client's matching over all observed rows gives it with the same uniforms, one of the 5
    nearest (brute force), ties, midpoints and empty partitions included."""
    from dmice.methods import pmm as P

    g = np.random.default_rng(11)
    for trial in range(30):
        n_parts = int(g.integers(2, 6))
        parts = []
        for _ in range(n_parts):
            n_obs = int(g.integers(0, 400)) if trial % 5 else 0 if not parts else 300
            yh = np.round(g.normal(size=n_obs), 1 if trial % 3 == 0 else 6)  # ties in a third
            y = g.normal(size=n_obs)
            srt = np.argsort(yh, kind="stable")
            q = np.sort(g.normal(size=int(g.integers(0, 200))) * 1.5)
            if trial % 3 == 0:
                q = np.round(q, 1)  # cells at the observed values and at midpoints
            parts.append((yh[srt], y[srt], q))
        if sum(len(p[0]) for p in parts) < 5:
            continue
        counts = np.array([len(p[0]) for p in parts])
        samples = np.stack([P.quantile_sample(p[0]) for p in parts])
        bounds = P.range_bounds(samples, counts, n_parts)
        assert np.all(np.diff(bounds) >= 0)
        us = [P.uniforms(np.random.default_rng([trial, p]), len(q)) for p, (_, _, q) in enumerate(parts)]
        pieces = [P.range_pieces(s, v, q, u, bounds, 5) for (s, v, q), u in zip(parts, us)]
        all_s = np.concatenate([p[0] for p in parts])
        all_v = np.concatenate([p[1] for p in parts])
        got = [np.full(len(q), np.nan) for _, _, q in parts]
        for r in range(n_parts):
            for p, (q0, vals, _) in enumerate(P.match_range([pc[r] for pc in pieces], 5, 1.0)):
                got[p][q0:q0 + len(vals)] = vals
        # the client's matching: all observed rows merged, the same uniforms
        s, order = P.merge(all_s)
        for (_, _, q), u, vals in zip(parts, us, got):
            assert not np.isnan(vals).any()
            pos, _ = P.match(s, q, 5, u, 1.0)
            np.testing.assert_array_equal(vals, all_v[order[pos]])
            for t, v in zip(q, vals):
                dist = np.abs(all_s - t)
                assert dist[all_v == v].min() <= np.partition(dist, 4)[4] + 1e-12


def test_matching_among_the_workers_fills_every_cell_the_same_for_any_number_of_workers(cluster_client):
    """Above dmice.pmm.worker-match-bytes the workers match among themselves: the imputations are
    those of the client's matching, on two workers and on one (the ranges follow the partitions,
    not the workers), and donor scarcity is still logged."""
    from distributed import Client, LocalCluster

    df = _scenario(6000, 3)
    ddf = dd.from_pandas(df, npartitions=3)
    observed = set(df["y"].dropna())
    runs = []
    imp = dmice.impute(ddf, m=2, max_iter=2, seed=7, client=cluster_client, progress=False)  # the client's
    runs.append([imp.complete(k).compute()["y"].to_numpy() for k in (1, 2)])
    gathered = imp._engine.bytes_gathered
    imp.close()
    with dask.config.set({"dmice.pmm.worker-match-bytes": 0}):
        imp = dmice.impute(ddf, m=2, max_iter=2, seed=7, client=cluster_client, progress=False)
        # the predictions stayed on the workers: 4,000 observed rows' 2 chains, 2 visits, not gathered
        assert gathered - imp._engine.bytes_gathered > 2 * (2 * 12 + 8) * 3000
        runs.append([imp.complete(k).compute()["y"].to_numpy() for k in (1, 2)])
        ev = imp.logged_events
        imp.close()
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
                Client(cl) as one:
            imp = dmice.impute(ddf, m=2, max_iter=2, seed=7, client=one, progress=False)
            runs.append([imp.complete(k).compute()["y"].to_numpy() for k in (1, 2)])
            imp.close()
    for y in runs[0]:
        assert not np.isnan(y).any() and set(y) <= observed
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)
    assert ev["event"].str.startswith("donor scarcity").any()


def test_by_groups_match_on_all_their_observed_rows():
    """by=: pmm matches each group's missing cells among all of that group's observed rows (no
    sample), each imputed value one of the 5 nearest of the group by brute force, and no value
    from another group."""
    from dataclasses import replace

    from conftest import chain_design_stack

    from dmice import block as B
    from dmice import schema as S
    from dmice.models import make_model
    from dmice.models.stratified import StratifiedModel

    g = np.random.default_rng(8)
    n, m = 3000, 2
    site = g.choice(["a", "b", "c"], n)
    x = g.normal(size=n)
    y = x + 3.0 * (site == "b") - 2.0 * (site == "c") + g.normal(size=n)
    df = pd.DataFrame({"x": x, "site": site, "y": y})
    df.loc[g.random(n) < 0.3, "y"] = np.nan
    variables = S.combine_summaries([S.summarize_partition(df)], df.dtypes)
    S.assign_methods(variables, {"y": "pmm"})
    names = [v.name for v in variables]
    j, jg = names.index("y"), names.index("site")
    plan = B.Plan(tuple(variables), S.layout(variables), m, 4,
                  {k: 1.0 for k, v in enumerate(variables) if v.imputed}, by=jg)
    cuts = [0, 1200, 2100, n]
    blocks = [B.encode_partition(df.iloc[a:b], plan, i) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    pools = {k: np.concatenate([B.sample_values(b)[k] for b in blocks]) for k in blocks[0].mis}
    blocks = [B.init_fill(b, plan, pools) for b in blocks]
    skip = set(range(*variables[j].cols)) | set(range(*variables[jg].cols))
    xcols = np.array([c for c in range(plan.n_cols) if c not in skip])
    vb = variables[jg]
    model = StratifiedModel({k: make_model(j, replace(variables[j], name=f"y [site level {k + 1}]"), xcols,
                                            m=m, seed=plan.seed, sample_pool=pools[j], stream=(k + 1,),
                                            exact=True)
                             for k in range(vb.n_levels)}, "site", list(vb.levels))
    req = model.request()
    assert model.update(B.combine([B.get_out(B.visit(b, plan, None, req)) for b in blocks]), 1, [])
    order = model.order(1)
    assert order["match"]
    for phase in model.match_phases(order):
        model.take_match(phase, B.combine([B.get_out(B.visit(b, plan, phase, None)) for b in blocks]))
    order = model.matched_order(order, 1, [])
    new = [B.visit(b, plan, order, None) for b in blocks]
    checked = 0
    for k in range(vb.n_levels):
        o = order["groups"][k]
        for c in range(m):
            obs = [b.obs[j][b.group[b.obs[j]] == k] for b in blocks]
            mis = [b.mis[j][b.group[b.mis[j]] == k] for b in blocks]
            yo = np.concatenate([b.values[j][r] for b, r in zip(blocks, obs)])
            yh = np.concatenate([chain_design_stack(b, plan, r, xcols)[c] for b, r in zip(blocks, obs)]) \
                @ model.models[k]._fits[c].coef
            t = np.concatenate([chain_design_stack(b, plan, r, xcols)[c] for b, r in zip(blocks, mis)]) @ o["beta"][c]
            got = np.concatenate([nb.imp[j][c][b.group[b.mis[j]] == k] for b, nb in zip(blocks, new)])
            assert len(got) == len(t) > 100
            for ti, v in zip(t, got):
                assert (yo == v).any()  # a value of this group
                dist = np.abs(yh - ti)
                assert dist[yo == v].min() <= np.partition(dist, 4)[4] + 1e-12
                checked += 1
    assert checked > 1000
