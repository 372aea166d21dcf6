"""dmice.analyze: per-imputation GLM fits equal statsmodels; pooling; inputs; errors."""

from __future__ import annotations

import dask.dataframe as dd
import formulaic
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from conftest import mixed_frame

import dmice
from dmice import store
from dmice.errors import InputError
from dmice.glm import irls

N = 1200
LEVELS = ["a", "b", "c", "d"]
FORMULA_RHS = "x * z + C(grp, contr.treatment('b')) + I(x ** 2)"


def _frame(seed: int) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    x = g.normal(size=N)
    z = g.normal(size=N)
    # level "d" only occurs in the last rows: absent from the first partition
    grp = np.where(np.arange(N) >= N - 60, "d", g.choice(LEVELS[:3], N))
    eta = 0.2 + 0.5 * x - 0.4 * z + 0.3 * (grp == "c") - 0.2 * (grp == "d")
    return pd.DataFrame({
        "x": x, "z": z, "grp": grp,
        "w": g.uniform(0.5, 2.0, N), "off": g.normal(0.0, 0.3, N),
        "y": eta + g.normal(size=N),
        "e": (g.random(N) < 1 / (1 + np.exp(-eta))).astype(float),
        "cnt": g.poisson(np.exp(eta)).astype(np.int64),
    })


@pytest.fixture(scope="module")
def frames():
    return [_frame(s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def dask_frames(frames):
    return [dd.from_pandas(f, npartitions=3, sort=False) for f in frames]


LINKS = {"logit": sm.families.links.Logit, "probit": sm.families.links.Probit,
         "cloglog": sm.families.links.CLogLog}


def _statsmodels(df, formula, family, link, weights, offset, cov_type):
    """statsmodels GLM on one whole completed data set; returns (terms, params, bse)."""
    df = df.assign(grp=pd.Categorical(df["grp"], categories=LEVELS)) if "grp" in df else df
    mm = formulaic.model_matrix(formula, df)
    if family == "gaussian":
        fam = sm.families.Gaussian()
    elif family == "poisson":
        fam = sm.families.Poisson()
    else:
        fam = sm.families.Binomial(link=LINKS[link or "logit"]())
    X = np.asarray(mm.rhs, dtype=float)
    mod = sm.GLM(np.asarray(mm.lhs, dtype=float)[:, 0], X, family=fam,
                 var_weights=df[weights].to_numpy() if weights else None,
                 offset=df[offset].to_numpy() if offset else None)
    res = mod.fit(cov_type="HC0" if cov_type == "HC1" else cov_type, tol=1e-13, maxiter=200)
    cov = np.asarray(res.cov_params())
    if cov_type == "HC1":  # statsmodels' GLM has no small-sample factor for HC1
        n, p = X.shape
        cov = cov * n / (n - p)
    return list(mm.rhs.columns), np.asarray(res.params), np.sqrt(np.diag(cov)), res


CASES = [
    # family, link, outcome, weights, offset, cov_type
    ("gaussian", None, "y", None, None, "nonrobust"),
    ("gaussian", None, "y", "w", "off", "nonrobust"),
    ("gaussian", None, "y", "w", None, "HC0"),
    ("gaussian", None, "y", None, "off", "HC1"),
    ("binomial", "logit", "e", None, None, "nonrobust"),
    ("binomial", "logit", "e", "w", None, "HC0"),
    ("binomial", "logit", "e", None, "off", "HC1"),
    ("binomial", "probit", "e", None, None, "nonrobust"),
    ("binomial", "probit", "e", "w", "off", "HC0"),
    ("binomial", "cloglog", "e", None, None, "nonrobust"),
    ("binomial", "cloglog", "e", None, "off", "HC1"),
    ("poisson", None, "cnt", None, None, "nonrobust"),
    ("poisson", None, "cnt", None, "off", "nonrobust"),
    ("poisson", None, "cnt", "w", None, "HC0"),
    ("poisson", None, "cnt", "w", "off", "HC1"),
]


@pytest.mark.parametrize("family,link,outcome,weights,offset,cov_type", CASES)
def test_each_imputation_equals_statsmodels(cluster_client, frames, dask_frames, family, link,
                                            outcome, weights, offset, cov_type):
    formula = f"{outcome} ~ {FORMULA_RHS}"
    res = dmice.analyze(dask_frames, formula, family=family, link=link, weights=weights,
                        offset=offset, cov_type=cov_type, client=cluster_client)
    assert res.m == 3 and res.nobs == N
    assert res.link == (link or {"gaussian": "identity", "poisson": "log"}[family])
    for k, df in enumerate(frames):
        terms, params, bse, ref = _statsmodels(df, formula, family, link, weights, offset, cov_type)
        assert res.terms == terms
        np.testing.assert_allclose(res.fits[k].params.to_numpy(), params, rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(res.fits[k].bse.to_numpy(), bse, rtol=1e-6)
        np.testing.assert_allclose(res.fits[k].deviance, ref.deviance, rtol=1e-8)
        if family != "gaussian" and weights is None:  # statsmodels' llf (binomial: 0/1 outcome)
            np.testing.assert_allclose(res.loglik[k], ref.llf, rtol=1e-8)


DIRECT_RHS = ["x + z + grp + flag + cnt", "x * C(grp, contr.treatment('b')) + flag:z",
              "0 + grp + grp:flag + x:z", "C(grp):flag + z"]


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """A nullable boolean and a nullable integer column besides the frame's own."""
    return df.assign(flag=pd.array(df["x"].to_numpy() > 0, dtype="boolean"),
                     cnt=pd.array(df["cnt"].to_numpy(), dtype="Int64"))


@pytest.mark.parametrize("rhs", DIRECT_RHS)
def test_direct_design_equals_formulaic_on_every_partition(frames, rhs):
    """Formulas of plain numeric and treatment-coded categorical columns are built from the
    columns directly, identical to formulaic's model matrix, also on a partition holding a
    level (``d``) that the partition checked at set-up does not have."""
    from dmice.analysis.spec import _build_spec

    ddf = dd.from_pandas(_typed(frames[0]), npartitions=3, sort=False)
    _, terms, design = _build_spec(f"e ~ {rhs}", [ddf], None, None)
    assert design.recipes is not None
    general = design.formulaic()
    for part in ddf.to_delayed():
        df = design.prepare(part.compute())
        X, y, _, _ = design(df)
        Xf, yf, _, _ = general(df)
        assert X.flags.f_contiguous and X.shape == (len(df), len(terms))
        np.testing.assert_array_equal(X, Xf)
        np.testing.assert_array_equal(y, yf)
    assert "d" in set(df["grp"])


@pytest.mark.parametrize("formula,imputed", [
    ("e ~ x + z + C(grp, contr.treatment('b')) + flag + x:flag + z:C(grp)", ["x", "grp"]),
    ("e ~ z + x + flag", ["x"]),  # one own column between runs of imputation 1's
])
def test_imputations_with_their_own_columns_patch_imputation_one(frames, monkeypatch, formula,
                                                                 imputed):
    """With a direct design, imputations 2..m keep only their own columns: over row blocks,
    their model matrix (shared, own and mixed interaction columns), its score and its full
    statistics equal those of the dense matrix formulaic builds on their data."""
    import dmice.analysis.groups as G
    import dmice.analysis.spec as S

    monkeypatch.setattr(irls, "ROW_BLOCK", 97)  # many blocks, the last one partial
    base = _typed(frames[0])
    other = base.copy()
    redo = np.random.default_rng(3).random(N) < 0.4  # "imputed" cells
    other.loc[redo, imputed] = frames[1].loc[redo, imputed]
    ddfs = [dd.from_pandas(f, npartitions=1, sort=False) for f in (base, other)]
    _, terms, design = S._build_spec(formula, ddfs, None, "off")
    assert design.recipes is not None
    group = G._load_group(design, "binomial", [0, 1], base, other)
    X, y, w, off = group.arrays(1)
    assert isinstance(X, irls.PatchedX) and y is group.base[1] and off is group.base[3]
    assert [terms[j] for j in X.cols] == [t for t in terms if "x" in t.split(":") or "grp" in t]
    assert sorted(set(X.cols) | {j for c in X.keep for j in range(len(terms))[c]}) == \
        list(range(len(terms)))
    dense, yd, _, offd = design.formulaic()(design.prepare(other))
    blocks = np.vstack([X[slice(s, s + 97)] for s in range(0, N, 97)])
    np.testing.assert_array_equal(blocks, dense)
    beta = np.linspace(-0.3, 0.3, len(terms))
    for grad_only in (True, False):
        got = irls.array_stats(X, y, None, off, "binomial", "logit", beta, False, grad_only=grad_only)
        ref = irls.array_stats(dense, yd, None, offd, "binomial", "logit", beta, False,
                             grad_only=grad_only)
        for key in ref:
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, atol=1e-12)


def test_deferred_imputations_are_read_once_when_first_needed(frames, tmp_path):
    """With defer, a group reads only imputation 1's file; the others are read (once, from
    whichever thread asks first, also after the group travelled between processes) into
    the arrays the group reads at once."""
    import pickle
    import threading

    import dmice.analysis.groups as G
    import dmice.analysis.spec as S

    base = _typed(frames[0]).assign(g2=frames[2]["grp"])  # a string column no imputation changes
    comp = [base]
    for k in (1, 2):
        f = base.copy()
        redo = np.random.default_rng(k).random(N) < 0.3  # "imputed" cells of x and grp
        f.loc[redo, ["x", "grp"]] = frames[k].loc[redo, ["x", "grp"]]
        comp.append(f)
    dtypes = {c: str(t) for c, t in base.dtypes.items()}
    parts = []
    for k, f in enumerate(comp):
        f.to_parquet(tmp_path / f"{k}.parquet")
        shared = () if k == 0 else tuple(c for c in base.columns if c not in ("x", "grp"))
        parts.append(store.StoredPart(str(tmp_path), f"{k}.parquet", None, dtypes, shared))
    formula = "e ~ x + z + C(grp) + flag + x:flag + C(g2)"
    ddfs = [dd.from_pandas(f, npartitions=1, sort=False) for f in comp]
    _, terms, design = S._build_spec(formula, ddfs, None, "off")
    eager = G._load_group(design, "binomial", [0, 1, 2], *parts)
    lazy = G._load_group(design, "binomial", [0, 1, 2], *parts, defer=True)
    assert sorted(lazy.later) == [1, 2] and lazy.diffs == [None, None, None]
    travelled = pickle.loads(pickle.dumps(lazy))  # as a worker would spill or send it
    reads = []
    orig = store.StoredPart.read

    def counted(self, columns):
        reads.append(self.path)
        return orig(self, columns)

    store.StoredPart.read = counted
    try:
        threads = [threading.Thread(target=lazy.load, args=(1,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert reads == ["1.parquet"] and sorted(lazy.later) == [2]
        for group in (lazy, travelled):
            for j in range(3):
                for got, want in zip(group.arrays(j), eager.arrays(j)):
                    if want is None:
                        assert got is None
                    else:
                        Xg = got[slice(0, N)] if isinstance(got, irls.PatchedX) else got
                        Xw = want[slice(0, N)] if isinstance(want, irls.PatchedX) else want
                        np.testing.assert_array_equal(Xg, Xw)
        assert not lazy.later and lazy.source is None
    finally:
        store.StoredPart.read = orig


@pytest.mark.parametrize("defer", [False, True])
def test_imputation_files_of_different_lengths_are_refused(frames, tmp_path, defer):
    """Two imputations' files of one partition with different row counts: a clear error naming
    both files, whether they are read together or the second one later."""
    import dmice.analysis.groups as G
    import dmice.analysis.spec as S

    base = _typed(frames[0])
    dtypes = {c: str(t) for c, t in base.dtypes.items()}
    base.to_parquet(tmp_path / "1.parquet")
    base.iloc[:-3].to_parquet(tmp_path / "2.parquet")
    shared = tuple(c for c in base.columns if c != "x")
    parts = [store.StoredPart(str(tmp_path), "1.parquet", None, dtypes),
             store.StoredPart(str(tmp_path), "2.parquet", None, dtypes, shared)]
    ddfs = [dd.from_pandas(base, npartitions=1, sort=False)] * 2
    _, _, design = S._build_spec("e ~ x + z", ddfs, None, "off")
    with pytest.raises(InputError, match=r"'1\.parquet' and '2\.parquet' have different numbers of rows"):
        group = G._load_group(design, "binomial", [0, 1], *parts, defer=defer)
        group.arrays(1)


@pytest.mark.parametrize("rhs", ["x + I(x ** 2)", "C(grp, contr.sum) + x", "bs(x, df=3) + z",
                                 "C(grp, levels=['c', 'b', 'a', 'd'])"])
def test_other_formulas_keep_formulaic(frames, rhs):
    from dmice.analysis.spec import _build_spec

    ddf = dd.from_pandas(frames[0], npartitions=2, sort=False)
    assert _build_spec(f"y ~ {rhs}", [ddf], None, None)[2].recipes is None


@pytest.mark.parametrize("rhs", DIRECT_RHS[:2])
def test_direct_design_fits_equal_statsmodels(cluster_client, frames, rhs):
    typed = [_typed(f) for f in frames]
    formula = f"e ~ {rhs}"
    res = dmice.analyze([dd.from_pandas(f, npartitions=3, sort=False) for f in typed], formula,
                        family="binomial", weights="w", client=cluster_client)
    assert res._design.recipes is not None
    for k, df in enumerate(typed):
        terms, params, bse, _ = _statsmodels(df, formula, "binomial", "logit", "w", None, "nonrobust")
        assert res.terms == terms
        np.testing.assert_allclose(res.fits[k].params.to_numpy(), params, rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(res.fits[k].bse.to_numpy(), bse, rtol=1e-6)


@pytest.mark.parametrize("share", [0.8, 0.3])
@pytest.mark.parametrize("family,link,outcome", [("binomial", "probit", "e"), ("poisson", None, "cnt")])
def test_imputations_sharing_rows_each_equal_statsmodels(cluster_client, frames, share, family,
                                                         link, outcome):
    """Completed data sets that share most (or few) rows, as real imputations do: imputations
    2..m start from imputation 1's estimate, and each fit still equals statsmodels'."""
    g = np.random.default_rng(11)
    base = frames[0]
    comp = [base]
    for k in (1, 2):
        f = base.copy()
        redo = g.random(N) > share  # "imputed" cells of x and z
        f.loc[redo, "x"] = frames[k].loc[redo, "x"]
        f.loc[redo, "z"] = frames[k].loc[redo, "z"]
        comp.append(f)
    formula = f"{outcome} ~ {FORMULA_RHS}"
    res = dmice.analyze([dd.from_pandas(f, npartitions=2, sort=False) for f in comp], formula,
                        family=family, link=link, client=cluster_client)
    for k, df in enumerate(comp):
        terms, params, bse, ref = _statsmodels(df, formula, family, link, None, None, "nonrobust")
        np.testing.assert_allclose(res.fits[k].params.to_numpy(), params, rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(res.fits[k].bse.to_numpy(), bse, rtol=1e-6)
        np.testing.assert_allclose(res.fits[k].deviance, ref.deviance, rtol=1e-8)
    # imputation 1 follows the same passes as a fit on its data alone
    with pytest.warns(UserWarning, match="pooling needs m >= 2"):
        alone = dmice.analyze([dd.from_pandas(comp[0], npartitions=2, sort=False)], formula,
                              family=family, link=link, client=cluster_client)
    np.testing.assert_allclose(res.fits[0].params.to_numpy(), alone.fits[0].params.to_numpy(),
                               rtol=1e-12)
    assert res.iterations >= alone.iterations


def test_max_iter_reached_before_the_warm_start_still_fits_every_imputation(cluster_client,
                                                                            dask_frames):
    with pytest.warns(RuntimeWarning, match="did not converge in max_iter=2"):
        res = dmice.analyze(dask_frames, f"e ~ {FORMULA_RHS}", family="binomial", max_iter=2,
                            client=cluster_client)
    assert res.iterations == 2
    full = dmice.analyze(dask_frames, f"e ~ {FORMULA_RHS}", family="binomial", client=cluster_client)
    for k in range(3):  # two Fisher-scoring passes: near the estimates, not at them
        est, ref = res.fits[k].params.to_numpy(), full.fits[k].params.to_numpy()
        assert np.all(np.isfinite(est)) and not np.allclose(est, ref, rtol=1e-6)
        np.testing.assert_allclose(est, ref, atol=0.5)


def _shared_group(frames, family="binomial"):
    """The design group of three completed data sets sharing 70% of their rows (the others
    "imputed"), as analyze builds it on a worker, and the number of model columns."""
    from dmice.analysis.groups import _load_group
    from dmice.analysis.spec import _build_spec

    g = np.random.default_rng(5)
    comp = [frames[0]]
    for k in (1, 2):
        f = frames[0].copy()
        redo = g.random(N) > 0.7
        f.loc[redo, ["x", "z"]] = frames[k].loc[redo, ["x", "z"]]
        comp.append(f)
    ddfs = [dd.from_pandas(f, npartitions=1, sort=False) for f in comp]
    outcome = {"binomial": "e", "poisson": "cnt"}[family]
    _, terms, design = _build_spec(f"{outcome} ~ {FORMULA_RHS}", ddfs, None, None)
    return _load_group(design, family, [0, 1, 2], *comp), len(terms)


@pytest.mark.parametrize("family,link", [("binomial", "logit"), ("poisson", "log")])
def test_chord_passes_reach_the_newton_estimates_and_end_on_a_full_pass(frames, family, link):
    """Imputations 2..m iterate by chords (score-only passes against imputation 1's
    information) and still end on a full pass at their final estimate: the estimates and
    statistics equal those of Newton's method with full passes throughout."""
    from dmice.analysis.groups import _group_stats
    from dmice.glm.solve import iterate as _iterate

    group, p = _shared_group(frames, family)
    seen = []

    def one_pass(betas, grad=frozenset(), lean=frozenset()):
        seen.append(grad)
        return _group_stats(group, betas, family, link, False, grad, lean)

    beta, res, it = _iterate(one_pass, 3, p, link, 1e-10, 50)
    assert sum(len(g) for g in seen) >= 4  # the warm-started fits took chord passes
    assert not seen[-1]  # and every fit ended on a full pass
    newton = []
    for k in range(3):  # each fit alone, Newton's method with full passes (m = 1)
        def alone(betas, grad=frozenset(), lean=frozenset(), k=k):
            assert not grad
            return {0: _group_stats(group, {k: betas[0]}, family, link, False)[k]}
        b, r, _ = _iterate(alone, 1, p, link, 1e-10, 50)
        newton.append((b[0], r[0]))
    for k in range(3):
        np.testing.assert_allclose(beta[k], newton[k][0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res[k]["XtWX"], newton[k][1]["XtWX"], rtol=1e-8)
        np.testing.assert_allclose(res[k]["loglik"], newton[k][1]["loglik"], rtol=1e-12)


def test_chord_matrix_follows_broyden_and_solves_a_linear_score_in_2p_steps():
    """Each chord's matrix is Broyden's update of the one before: it maps the last step onto
    the change of the score that step caused (the secant equation), and on a linear score
    it finds the root in at most 2p steps (Gay, 1979), where the fixed first matrix alone
    still converges linearly at its rate."""
    from dmice.glm.solve import chord_step as _chord_step

    rng = np.random.default_rng(5)
    p = 3
    A = rng.normal(size=(p, p))
    H = A @ A.T + p * np.eye(p)  # the score's true (negated) Jacobian
    info0 = H + 0.3 * np.diag(np.diag(H))  # a chord matrix 30% off
    root = np.array([0.5, -1.0, 2.0])

    def score(b):
        return {"g": H @ (root - b)}

    errors = {}
    for broyden in (True, False):
        beta, secant, chord = [np.zeros(p)], {}, {}
        last = None  # the step before and the score before it
        for _ in range(2 * p):
            chord[0] = np.inf  # keep chording
            before, g = beta[0].copy(), score(beta[0])["g"]
            _chord_step(0, {"g": g}, beta, chord, info0, 0.0, secant)
            if not broyden:
                secant.clear()
            elif last is not None:  # the matrix of this step: the secant equation of the last
                np.testing.assert_allclose(secant[0][0] @ last[0], last[1] - g, rtol=1e-10,
                                           atol=1e-12)
            last = (beta[0] - before, g)
        errors[broyden] = np.max(np.abs(beta[0] - root))
    assert errors[True] < 1e-10
    assert errors[False] > 1e-4  # 0.3 ** 6 of the start's distance, and more


def test_max_iter_during_chords_ends_on_a_full_pass(frames):
    from dmice.analysis.groups import _group_stats
    from dmice.glm.solve import iterate as _iterate

    group, p = _shared_group(frames)
    seen = []

    def one_pass(betas, grad=frozenset(), lean=frozenset()):
        seen.append(grad)
        return _group_stats(group, betas, "binomial", "logit", False, grad, lean)

    with pytest.warns(RuntimeWarning, match="did not converge"):
        beta, res, it = _iterate(one_pass, 3, p, "logit", 1e-10, 7)
    assert it == 7 and any(seen[:-1]) and not seen[-1]
    assert all("XtWX" in r and "loglik" in r for r in res)


def test_model_spec_reads_only_the_analysis_columns(cluster_client, frames, monkeypatch):
    """The partition the model spec is built from reaches the client with the analysis
    columns only (wide data would otherwise travel whole)."""
    from dmice.runtime import passes as A

    wide = [dd.from_pandas(f.assign(**{f"extra{i}": 1.0 for i in range(20)}), npartitions=2, sort=False)
            for f in frames]
    seen = []
    orig = A.compute

    def spy(client, *objs):
        out = orig(client, *objs)
        seen.extend(o for o in out if isinstance(o, pd.DataFrame))
        return out

    monkeypatch.setattr(A, "compute", spy)
    res = dmice.analyze(wide, "y ~ x + z + C(grp)", weights="w")
    assert seen and all(sorted(df.columns) == ["grp", "w", "x", "y", "z"] for df in seen)
    ref = dmice.analyze([dd.from_pandas(f, npartitions=2, sort=False) for f in frames],
                        "y ~ x + z + C(grp)", weights="w")
    np.testing.assert_allclose(res.pooled["estimate"], ref.pooled["estimate"], rtol=1e-12)


def test_formula_terms_reference_level_interaction_and_transform(cluster_client, dask_frames):
    res = dmice.analyze(dask_frames, f"y ~ {FORMULA_RHS}")
    assert res.terms == ["Intercept", "x", "z", "C(grp, contr.treatment('b'))[T.a]",
                         "C(grp, contr.treatment('b'))[T.c]", "C(grp, contr.treatment('b'))[T.d]",
                         "I(x ** 2)", "x:z"]
    p = len(res.terms)
    assert res.dfcom == N - p


def test_pooled_is_rubins_rules_of_the_fits(cluster_client, dask_frames):
    res = dmice.analyze(dask_frames, f"e ~ {FORMULA_RHS}", family="binomial")
    est = np.array([f.params.to_numpy() for f in res.fits])
    var = np.array([np.diag(f.cov.to_numpy()) for f in res.fits])
    pooled = res.pooled
    assert list(pooled["term"]) == res.terms
    np.testing.assert_allclose(pooled["estimate"].to_numpy(), est.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled["ubar"].to_numpy(), var.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled["b"].to_numpy(), est.var(axis=0, ddof=1), rtol=1e-10)
    direct = dmice.pool(est, np.array([f.cov.to_numpy() for f in res.fits]), dfcom=res.dfcom,
                        terms=res.terms)
    pd.testing.assert_frame_equal(res.summary(), direct.summary())
    odds = res.summary(exponentiate=True)
    np.testing.assert_allclose(odds["estimate"], np.exp(est.mean(axis=0)), rtol=1e-12)
    assert "conf_low" not in res.summary(conf_int=False)
    text = repr(res)
    assert "AnalysisResult" in text and "I(x ** 2)" in text and "std_error" in text


def test_dfcom_given(cluster_client, dask_frames):
    res = dmice.analyze(dask_frames, "y ~ x", dfcom=50)
    assert res.dfcom == 50 and set(res.pooled["dfcom"]) == {50}


@pytest.fixture(scope="module")
def imputed(cluster_client):
    df = mixed_frame(600, seed=4)
    imp = dmice.impute(df, m=3, max_iter=2, seed=1)
    yield imp
    imp.close()


MI_FORMULA = "y ~ x + z + C(c, contr.treatment('b')) + s"


def test_multiple_imputation_path_and_pandas_list(cluster_client, imputed, tmp_path):
    from dmice.analysis.fit import _unplaced

    # held on the cluster: its partitions' designs are built where the chains are (not spread)
    frames = [imputed.complete(k) for k in (1, 2, 3)]
    assert not _unplaced(imputed, frames)
    assert not _unplaced(frames, [cluster_client.persist(frames[0]), *frames[1:]])
    res = dmice.analyze(imputed, MI_FORMULA)
    completed = [imputed.complete(k).compute() for k in range(1, imputed.m + 1)]
    for k, df in enumerate(completed):
        mm = formulaic.model_matrix(MI_FORMULA, df.assign(s=pd.Categorical(df["s"], ["u", "v"])))
        assert res.terms == list(mm.rhs.columns)
        fit = sm.GLM(np.asarray(mm.lhs)[:, 0], np.asarray(mm.rhs)).fit()
        np.testing.assert_allclose(res.fits[k].params.to_numpy(), fit.params, rtol=1e-6)
        np.testing.assert_allclose(res.fits[k].bse.to_numpy(), fit.bse, rtol=1e-6)
    assert res.terms[-1] == "s[T.v]"

    from_list = dmice.analyze(completed, MI_FORMULA)
    out = imputed.to_parquet(str(tmp_path / "imp"))
    from_path = dmice.analyze(out, MI_FORMULA)
    for other in (from_list, from_path):
        assert other.terms == res.terms and other.nobs == res.nobs
        np.testing.assert_allclose(other.pooled["estimate"], res.pooled["estimate"], rtol=1e-9)
        np.testing.assert_allclose(other.pooled["t"], res.pooled["t"], rtol=1e-9)
    # the written files were read by the fits' own tasks, the complete outcome from imputation 1
    assert from_path._files is not None and from_path._files[1][0].shared == ("y",)


def test_written_output_read_by_the_fits_equals_statsmodels(cluster_client, tmp_path):
    """Three partitions, the complete analysis column read once per partition:
    every imputation's fit equals statsmodels on that imputation as dask's own Parquet reader
    sees it."""
    df = mixed_frame(900, seed=11)
    ddf = dd.from_pandas(df, npartitions=3, sort=False)
    out = str(tmp_path / "imp")
    with dmice.impute(ddf, m=3, max_iter=2, seed=2) as imp:
        imp.to_parquet(out)
    from distributed import get_task_stream

    with get_task_stream(cluster_client) as ts:
        res = dmice.analyze(out, MI_FORMULA)
    assert len(res._files) == 3 and len(res._files[0]) == 3
    # the partitions' designs (tasks without inputs) are spread over both workers
    loads = [t for t in ts.data if str(t["key"]).startswith("_load_group")]
    assert len(loads) == 3 and len({t["worker"] for t in loads}) == 2
    for k in range(1, 4):
        whole = dd.read_parquet(f"{out}/imputation={k}").compute()
        mine = dmice.open(out).complete(k).compute()
        pd.testing.assert_frame_equal(mine.reset_index(drop=True),
                                      whole[mine.columns].reset_index(drop=True))
        mm = formulaic.model_matrix(MI_FORMULA, whole.assign(
            s=pd.Categorical(whole["s"], ["u", "v"])))
        fit = sm.GLM(np.asarray(mm.lhs)[:, 0], np.asarray(mm.rhs)).fit()
        np.testing.assert_allclose(res.fits[k - 1].params.to_numpy(), fit.params, rtol=1e-6)
        np.testing.assert_allclose(res.fits[k - 1].bse.to_numpy(), fit.bse, rtol=1e-6)
    # D3's pass at fixed estimates spreads the partitions over the workers too, and reads the
    # files as the fits did: the same log-likelihoods as from dask's reader
    at = res.pooled["estimate"].to_numpy()
    with get_task_stream(cluster_client) as ts:
        got = res._loglik_at(at)
    loads = [t for t in ts.data if str(t["key"]).startswith("_load_group")]
    assert len(loads) == 3 and len({t["worker"] for t in loads}) == 2
    frames = [dd.read_parquet(f"{out}/imputation={k}") for k in range(1, 4)]
    np.testing.assert_allclose(dmice.analyze(frames, MI_FORMULA)._loglik_at(at), got, rtol=1e-10)
    # a model of complete columns only: every imputation's files add no column to read
    flat = dmice.analyze(out, "y ~ 1")
    assert all(f.params["Intercept"] == flat.fits[0].params["Intercept"] for f in flat.fits)
    np.testing.assert_allclose(flat.fits[0].params["Intercept"], df["y"].mean(), rtol=1e-12)


def test_fit_glm_still_works(cluster_client, frames, dask_frames):
    from dmice.analysis import fit_glm

    def design(df):
        return np.column_stack([np.ones(len(df)), df["x"], df["z"]]), df["e"].to_numpy(float)

    fit = fit_glm(dask_frames, design, ["const", "x", "z"], family="binomial", client=cluster_client)
    X, y = design(frames[0])
    ref = sm.GLM(y, X, family=sm.families.Binomial()).fit(tol=1e-13)
    np.testing.assert_allclose(fit.params[0], ref.params, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.cov[0])), ref.bse, rtol=1e-6)
    assert fit.nobs == N and fit.df_resid == N - 3


def test_errors_name_the_problem(cluster_client, frames, dask_frames):
    with pytest.raises(InputError, match="nope"):
        dmice.analyze(dask_frames, "y ~ x + nope")
    with pytest.raises(InputError, match="nope"):
        dmice.analyze(dask_frames, "nope ~ x")
    with pytest.raises(InputError, match="formula"):
        dmice.analyze(dask_frames, "y ~ x +* (")
    with pytest.raises(InputError, match="formula"):
        dmice.analyze(dask_frames, "y + x")
    with pytest.raises(InputError, match="wt"):
        dmice.analyze(dask_frames, "y ~ x", weights="wt")
    with pytest.raises(InputError, match="family"):
        dmice.analyze(dask_frames, "y ~ x", family="gamma")
    with pytest.raises(InputError, match="link"):
        dmice.analyze(dask_frames, "e ~ x", family="binomial", link="log")
    with pytest.raises(InputError, match="cov_type"):
        dmice.analyze(dask_frames, "y ~ x", cov_type="HC3")
    with pytest.raises(InputError, match="data"):
        dmice.analyze(42, "y ~ x")
    with pytest.raises(InputError, match="binomial outcome"):
        dmice.analyze(dask_frames, "y ~ x", family="binomial")
    holes = frames[0].copy()
    holes.loc[5, "x"] = np.nan
    with pytest.raises(InputError, match="'x'"):
        dmice.analyze([holes, frames[1]], "y ~ x")


# ------------------------------------------------------------------------------------------
# model comparisons (D1, D2, D3) and pooled R^2 against R mice / mitml
# ------------------------------------------------------------------------------------------
FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
COMPARE_GOLDEN = __import__("json").loads((FIXTURES / "compare_golden.json").read_text())
TEST_FIELDS = ["statistic", "df1", "df2", "p_value", "riv"]


@pytest.fixture(scope="module")
def golden_frames():
    """The m = 5 data sets completed by R mice (tests/fixtures/make_compare_golden.R)."""
    long = pd.read_csv(FIXTURES / "compare_data.csv")
    return [dd.from_pandas(d.drop(columns=".imp").reset_index(drop=True), npartitions=2, sort=False)
            for _, d in long.groupby(".imp", sort=True)]


@pytest.fixture(scope="module")
def golden_fits(cluster_client, golden_frames):
    out = {}
    for case in COMPARE_GOLDEN["cases"]:
        out[case["name"]] = tuple(dmice.analyze(golden_frames, case[f], family=case["family"])
                                  for f in ("full", "reduced"))
    return out


def _assert_test(got, want):
    for f in TEST_FIELDS:
        np.testing.assert_allclose(getattr(got, f), want[f], rtol=1e-6, err_msg=f)
    if want.get("dfcom") is None:
        assert np.isnan(got.dfcom)
    else:
        assert got.dfcom == want["dfcom"]


@pytest.mark.parametrize("case", COMPARE_GOLDEN["cases"], ids=lambda c: c["name"])
def test_compare_d1_d2_d3_match_r(golden_fits, case):
    full, reduced = golden_fits[case["name"]]
    assert full.m == reduced.m == COMPARE_GOLDEN["m"] and full.nobs == COMPARE_GOLDEN["n"]
    for method in ("D1", "D2", "D3"):
        res = full.compare(reduced, method=method)
        assert res.method == method and res.df1 == case["k"] and len(res.tested) == case["k"]
        _assert_test(res, case[method.lower()])
    # the log-likelihoods D3 is made of: at each imputation's own estimates, and of each
    # imputation's data at the pooled estimates (one more pass over the data)
    np.testing.assert_allclose(full.loglik, case["loglik_full"], rtol=1e-9)
    np.testing.assert_allclose(reduced.loglik, case["loglik_reduced"], rtol=1e-9)
    np.testing.assert_allclose(full._loglik_at(full.pooled["estimate"].to_numpy()),
                               case["loglik_full_pooled"], rtol=1e-9)
    np.testing.assert_allclose(reduced._loglik_at(reduced.pooled["estimate"].to_numpy()),
                               case["loglik_reduced_pooled"], rtol=1e-9)
    table = dmice.compare(full, reduced, method="D2").table
    assert list(table.columns) == ["test", "statistic", "df1", "df2", "dfcom", "p_value", "riv"]
    assert "D2" in repr(full.compare(reduced, method="D2"))


@pytest.mark.parametrize("case", [c for c in COMPARE_GOLDEN["cases"] if "r_squared" in c],
                         ids=lambda c: c["name"])
def test_pooled_r_squared_matches_r(golden_fits, case):
    full, _ = golden_fits[case["name"]]
    for adjusted, key in ((False, "r_squared"), (True, "adj_r_squared")):
        got = full.r_squared(adjusted=adjusted)
        assert list(got.index) == ["adj R^2" if adjusted else "R^2"]
        for col in ("est", "lo_95", "hi_95", "fmi"):
            np.testing.assert_allclose(got[col].iloc[0], case[key][col], rtol=1e-8, err_msg=col)


def test_r_squared_of_each_fit_equals_statsmodels_with_weights_and_offset(cluster_client, frames,
                                                                         dask_frames):
    res = dmice.analyze(dask_frames, "y ~ x + z", weights="w", offset="off")
    for k, df in enumerate(frames):
        X = sm.add_constant(df[["x", "z"]].to_numpy())
        fit = sm.WLS(df["y"] - df["off"], X, weights=df["w"]).fit()  # same fit as the GLM
        # R's summary.lm: fitted values without the offset, weighted sums of squares
        f = X @ fit.params
        w = df["w"].to_numpy()
        mss = np.sum(w * (f - np.sum(w * f) / w.sum()) ** 2)
        rss = np.sum(w * (df["y"] - df["off"] - f) ** 2)
        np.testing.assert_allclose(res.r_squared_values()[k], mss / (mss + rss), rtol=1e-8)
        np.testing.assert_allclose(res.r_squared_values(adjusted=True)[k],
                                   1 - (1 - mss / (mss + rss)) * (N - 1) / (N - 3), rtol=1e-8)


def test_compare_default_reduced_tests_all_but_intercept(golden_fits):
    full, _ = golden_fits["lm_x2_g"]
    from dmice.pooling import wald_d1

    got = full.compare(method="D1")
    est = np.array([f.params.to_numpy() for f in full.fits])
    covs = np.array([f.cov.to_numpy() for f in full.fits])
    want = wald_d1(est, covs, list(range(1, len(full.terms))), dfcom=full.dfcom).iloc[0]
    assert got.tested == full.terms[1:]
    np.testing.assert_allclose(got.statistic, want["statistic"], rtol=1e-12)
    d3 = full.compare(method="D3")  # against the intercept-only model, fitted for the test
    assert d3.df1 == len(full.terms) - 1 and d3.p_value < 1e-3


def test_compare_errors(golden_fits):
    from dataclasses import replace

    full, reduced = golden_fits["lm_x2_g"]
    logit, _ = golden_fits["logit_x2_g"]
    with pytest.raises(InputError, match="not nested.*reduced.compare"):
        reduced.compare(full)
    other = replace(reduced, formula="y ~ x1 + cnt", terms=["Intercept", "x1", "cnt"])
    with pytest.raises(InputError, match=r"not nested.*\['cnt'\]"):
        full.compare(other)
    with pytest.raises(InputError, match="not nested"):
        full.compare(full)
    with pytest.raises(InputError, match="family"):
        logit.compare(reduced)
    with pytest.raises(InputError, match="outcome"):
        full.compare(replace(reduced, outcome="cnt"))
    with pytest.raises(InputError, match="weights"):
        full.compare(replace(reduced, weights="x2"))
    with pytest.raises(InputError, match="m=5 and m=3"):
        full.compare(replace(reduced, fits=reduced.fits[:3]))
    with pytest.raises(InputError, match="method"):
        full.compare(reduced, method="D4")
    with pytest.raises(InputError, match="AnalysisResult"):
        full.compare("y ~ x1")
    with pytest.raises(InputError, match="AnalysisResult"):
        dmice.compare("y ~ x1", reduced)
    # fitted on other data: the outcome sums of the last pass differ
    shifted = replace(reduced, _stats=[{**st, "swy": st["swy"] + 1.0} for st in reduced._stats])
    with pytest.raises(InputError, match="different data"):
        full.compare(shifted)
    from dmice.pooling import lr_d3

    with pytest.raises(ValueError, match="same length"):
        lr_d3([1.0, 2.0], [1.0], [1.0, 2.0], [1.0, 2.0], 1)
    with pytest.raises(ValueError, match="df"):
        lr_d3([1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], 0)


def test_table_and_repr_show_monte_carlo_errors(golden_fits):
    full, _ = golden_fits["logit_x2_g"]
    tab = full.table()
    b = full.pooled["b"].to_numpy()
    np.testing.assert_allclose(tab["mc_se_estimate"], np.sqrt(b / full.m), rtol=1e-12)
    fmi = full.pooled["fmi"].to_numpy()
    np.testing.assert_array_equal(tab["recommended_m"], np.ceil(1 + 0.5 * (fmi / 0.05) ** 2 - 1e-9))
    assert {"mc_se_std_error", "mc_se_p_value"} <= set(tab.columns)
    odds = full.table(exponentiate=True)
    np.testing.assert_allclose(odds["mc_se_estimate"], np.exp(full.pooled["estimate"]) * np.sqrt(b / 5))
    text = repr(full)
    assert "mc_se_estimate" in text and "recommended_m" in text and "von Hippel" in text


def test_unaligned_partitions_and_spline_bounds_over_all_partitions(cluster_client, frames):
    # imputations with different partitionings fall back to one design per partition
    mixed = [dd.from_pandas(f, npartitions=n, sort=False) for f, n in zip(frames, (2, 3, 4))]
    aligned = [dd.from_pandas(f, npartitions=3, sort=False) for f in frames]
    a = dmice.analyze(mixed, "e ~ x + z", family="binomial")
    b = dmice.analyze(aligned, "e ~ x + z", family="binomial")
    np.testing.assert_allclose(a.pooled["estimate"], b.pooled["estimate"], rtol=1e-9)
    np.testing.assert_allclose(a.pooled["t"], b.pooled["t"], rtol=1e-9)
    # a cubic B-spline without interior knots has the data's range as its only knots: fitted
    # on a sample spanning all partitions, not on the first one (sorted by x: it would not
    # cover the range and the other partitions would fall outside the knots)
    base = frames[0].sort_values("x").reset_index(drop=True)
    srt = [base.assign(y=f["y"].to_numpy()) for f in frames]  # x complete, y differs
    res = dmice.analyze([dd.from_pandas(f, npartitions=3, sort=False) for f in srt],
                        "y ~ bs(x, df=3) + z")
    for k, df in enumerate(srt):
        mm = formulaic.model_matrix("y ~ bs(x, df=3) + z", df)
        fit = sm.OLS(np.asarray(mm.lhs)[:, 0], np.asarray(mm.rhs)).fit()
        np.testing.assert_allclose(res.fits[k].params.to_numpy(), fit.params, rtol=1e-6)


def test_cli_analyze_prints_mc_errors_and_r_squared(cluster_client, golden_frames, tmp_path):
    import json
    import subprocess
    import sys

    # the CLI reads a written output: write the golden sets in dmice's layout
    out = tmp_path / "out"
    for k, f in enumerate(golden_frames, start=1):
        f.to_parquet(str(out / f"imputation={k}"), write_index=False)
    cols = list(golden_frames[0].columns)
    from dmice import store

    store.commit(str(out), None, {"m": 5, "iterations": 0, "seed": 0, "columns": cols,
                                  "dtypes": {c: str(t) for c, t in golden_frames[0].dtypes.items()},
                                  "method": {}, "n_missing": {}, "n_rows": 160, "visit_sequence": [],
                                  "logged_events": []})
    run = subprocess.run([sys.executable, "-m", "dmice.cli", "analyze", str(out), "--formula",
                          "y ~ x1 + x2 + g", "--json", str(tmp_path / "t.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mc_se_estimate" in run.stdout and "recommended_m" in run.stdout
    assert "pooled R^2" in run.stdout and "pooled adj R^2" in run.stdout
    got = json.loads((tmp_path / "t.json").read_text())
    case = COMPARE_GOLDEN["cases"][0]
    np.testing.assert_allclose(got["r_squared"]["R^2"]["est"], case["r_squared"]["est"], rtol=1e-8)
    assert {"mc_se_estimate", "mc_se_p_value", "recommended_m", "fmi"} <= set(got["table"][0])


@pytest.mark.parametrize("family,link", [("binomial", "logit"), ("binomial", "probit"),
                                         ("binomial", "cloglog"), ("poisson", "log"),
                                         ("gaussian", "identity")])
def test_pass_statistics_equal_statsmodels_over_several_row_blocks(family, link):
    """One pass's statistics (taken ROW_BLOCK rows at a time, with weights and offset) equal
    statsmodels' score, information, per-row scores, log-likelihood and deviance."""
    from dmice.glm.irls import ROW_BLOCK
    from dmice.glm.irls import array_stats as _array_stats

    g = np.random.default_rng(5)
    n = 2 * ROW_BLOCK + 777  # two full row blocks and a partial one
    X = np.column_stack([np.ones(n), g.normal(size=(n, 3)), g.random(n) < 0.3])
    w, off = g.uniform(0.5, 2.0, n), g.normal(0.0, 0.2, n)
    beta = np.array([-0.4, 0.3, -0.2, 0.1, 0.5])
    eta = X @ beta + off
    if family == "gaussian":
        y, fam = eta + g.normal(size=n), sm.families.Gaussian()
    elif family == "poisson":
        y, fam = g.poisson(np.exp(eta)).astype(float), sm.families.Poisson()
    else:
        fam = sm.families.Binomial(link=LINKS[link]())
        y = (g.random(n) < fam.link.inverse(eta)).astype(float)
    model = sm.GLM(y, X, family=fam, offset=off, var_weights=w)
    mu = fam.link.inverse(eta)
    s = _array_stats(X, y, w, off, family, link, beta, robust=True)
    np.testing.assert_allclose(s["g"], model.score(beta, scale=1.0), rtol=1e-10)
    np.testing.assert_allclose(s["XtWX"], -model.hessian(beta, scale=1.0, observed=False), rtol=1e-10)
    np.testing.assert_allclose(s["Hobs"], -model.hessian(beta, scale=1.0, observed=True), rtol=1e-10)
    sc = model.score_obs(beta, scale=1.0)
    np.testing.assert_allclose(s["meat"], sc.T @ sc, rtol=1e-10)
    np.testing.assert_allclose(float(s["pearson"]), np.sum(w * (y - mu) ** 2 / fam.variance(mu)),
                               rtol=1e-10)
    np.testing.assert_allclose(float(s["deviance"]), fam.deviance(y, mu, var_weights=w), rtol=1e-10)
    if family != "gaussian":  # gaussian's log-likelihood is taken at the dispersion, in analyze
        np.testing.assert_allclose(float(s["loglik"]), fam.loglike(y, mu, var_weights=w, scale=1.0),
                                   rtol=1e-10)
    np.testing.assert_allclose([float(s[k]) for k in ("sw", "swy", "swe", "swe2", "n")],
                               [w.sum(), w @ y, w @ (eta - off), w @ (eta - off) ** 2, n], rtol=1e-12)
    # a lean pass: the same statistics without the likelihood, the deviance and the meat
    lean = _array_stats(X, y, w, off, family, link, beta, robust=True, lean=True)
    assert set(s) - set(lean) == {"loglik", "deviance", "meat"}
    for key in lean:
        np.testing.assert_array_equal(lean[key], s[key])
    if link in ("logit", "log", "identity"):  # a chord pass: the score alone
        score = _array_stats(X, y, w, off, family, link, beta, grad_only=True)
        assert set(score) == {"g", "n"}
        np.testing.assert_allclose(score["g"], s["g"], rtol=1e-12)


@pytest.mark.parametrize("link", ["logit", "probit", "cloglog"])
def test_binary_outcome_log_likelihood_equals_the_general_binomial_one(link):
    """The one-log-per-row log-likelihood of a 0/1 outcome equals the general binomial
    expression (y log mu + (1 - y) log(1 - mu)) to rounding."""
    from dmice.glm.irls import array_stats as _array_stats
    from dmice.glm.links import outcome_constants as _outcome_constants

    g = np.random.default_rng(6)
    n = 5000
    X = np.column_stack([np.ones(n), g.normal(size=(n, 2))])
    y = (g.random(n) < 0.3).astype(float)
    w, off = g.uniform(0.5, 2.0, n), g.normal(0.0, 0.2, n)
    beta = np.array([-0.8, 0.6, -0.4])
    c = _outcome_constants("binomial", y, w)
    assert c["binary"] == 1.0
    fast = _array_stats(X, y, w, off, "binomial", link, beta, consts=c)
    slow = _array_stats(X, y, w, off, "binomial", link, beta, consts={**c, "binary": 0.0})
    for k in ("loglik", "deviance", "pearson"):
        np.testing.assert_allclose(float(fast[k]), float(slow[k]), rtol=1e-12)
