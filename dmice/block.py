"""The per-partition state of a run and the work done on it in one round.

A :class:`Block` holds one partition, encoded once: the design matrix of the
observed values, the internal values of each imputed variable, and the
imputed cells of every chain.  A *visit* (:func:`visit`) imputes one variable
in all m chains and, in the same pass, computes the sufficient statistics of
the next variable's model, so each visit is one round (see :mod:`dmice.runtime.engine`).

Blocks are treated as immutable: a visit returns a new block that shares every
array it did not change.  Tasks are therefore pure functions of their inputs
and keyed random streams, and a retried or recomputed visit gives the same
result.  Nothing here touches dask.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit

from dmice import post as _post
from dmice import rng as _rng
from dmice.glm import kernels as stats
from dmice.methods.smcfcs import MAX_CANDIDATES as SMCFCS_MAX_CANDIDATES
from dmice.schema import CONTINUOUS, NOMINAL, ORDINAL, Variable, conform, from_codes, to_codes


@dataclass(frozen=True)
class Plan:
    """What every task needs to know about the run (sent once per task, small)."""

    variables: tuple[Variable, ...]
    n_cols: int  # columns of the encoded design, intercept included
    m: int
    seed: int
    pool_rate: dict[int, float]  # variable index -> fraction of observed rows kept as donors/sample
    chain0: int = 0  # number of the first chain (chains added later continue the numbering)
    #: passive variable index -> (dmice.passive.Passive, indices of its inputs)
    passive: dict[int, tuple[Any, tuple[int, ...]]] = field(default_factory=dict)
    #: imputed variable index -> dmice.formulas.FormulaModel (its design, instead of the default)
    formulas: dict[int, Any] = field(default_factory=dict)
    #: dmice.methods.smcfcs.Substantive: the analysis model SMC-FCS imputes compatibly with
    substantive: Any = None
    post: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # variable -> post-processing functions
    by: int | None = None  # complete grouping variable of stratified imputation (its level codes)
    #: largest design kept per partition and variable by :func:`model_designs`: the fitting rows'
    #: (larger ones are gathered again each round, so big partitions do not hold a copy of their
    #: design) and the missing rows' (one product per visit against one or more Newton rounds:
    #: kept only while small); dask config ``dmice.design-cache.observed`` and ``.missing``
    design_cache: tuple[int, int] = (32 * 2**20, 8 * 2**20)


#: column added to a partition to mark the rows excluded from model fitting (``ignore=``)
IGNORE_COL = "__dmice_ignore__"


@dataclass
class Block:
    part: int
    n: int
    D0: np.ndarray  # (n, n_cols) encoded design, zeros in missing cells
    values: dict[int, np.ndarray]  # imputed variable -> internal values, NaN if missing
    mis: dict[int, np.ndarray]  # imputed variable -> rows missing
    obs: dict[int, np.ndarray]  # imputed variable -> rows observed
    mis_pos: dict[int, np.ndarray]  # imputed variable -> position in imp[j] per row, -1 if observed
    pool: dict[int, np.ndarray]  # imputed variable -> positions in obs[j] of donor/sample rows
    pairs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    imp: dict[int, np.ndarray] = field(default_factory=dict)  # imputed variable -> (m, n_mis)
    cache: dict[Any, np.ndarray] = field(default_factory=dict)  # statistics that never change
    out: dict[str, Any] | None = None  # statistics returned by the last task
    group: np.ndarray | None = None  # level code of the ``by`` variable per row


def encode_partition(df: pd.DataFrame, plan: Plan, part: int) -> Block:
    """Encode one partition: design of observed values, missing masks, donor pools."""
    n = len(df)
    D0 = np.zeros((n, plan.n_cols))
    D0[:, 0] = 1.0
    values, mis, obs, mis_pos, pool = {}, {}, {}, {}, {}
    fit = ~df[IGNORE_COL].to_numpy(dtype=bool) if IGNORE_COL in df.columns else None
    for j, v in enumerate(plan.variables):
        if v.width == 0 and not v.imputed:
            continue
        x = to_codes(df[v.name], v)
        miss = np.isnan(x)
        ok = ~miss
        cols = np.arange(*v.cols)
        if v.width:
            D0[np.ix_(np.nonzero(ok)[0], cols)] = encoded(v, x[ok])
        if v.imputed:
            values[j] = x
            mis[j] = np.nonzero(miss)[0]
            obs[j] = np.nonzero(ok if fit is None else ok & fit)[0]
            pos = np.full(n, -1, dtype=np.int64)
            pos[mis[j]] = np.arange(len(mis[j]))
            mis_pos[j] = pos
            g = _rng.generator(plan.seed, _rng.POOL, j, part)
            rate = plan.pool_rate.get(j, 1.0)
            keep = np.arange(len(obs[j])) if rate >= 1.0 else \
                np.nonzero(g.random(len(obs[j])) < rate)[0]
            pool[j] = keep
    needed = [k for _, idx in plan.passive.values() for k in idx] + \
        [k for fm in plan.formulas.values() for k in fm.inputs]
    if plan.substantive is not None:
        needed += list(plan.substantive.model.inputs) + [plan.substantive.outcome]
    if needed:  # inputs of passive variables and formulas: their observed values too
        for k in needed:
            if k not in values:
                values[k] = to_codes(df[plan.variables[k].name], plan.variables[k])
    # rows missing in two variables at once, as positions in each one's missing rows
    pairs = {}
    keys = sorted(mis)
    for a, k in enumerate(keys):
        for l in keys[a + 1:]:
            _, pk, pl = np.intersect1d(mis[k], mis[l], assume_unique=True, return_indices=True)
            pairs[(k, l)] = (pk, pl)
    group = None
    if plan.by is not None:
        vb = plan.variables[plan.by]
        group = to_codes(df[vb.name], vb).astype(np.int64)
    return Block(part=part, n=n, D0=D0, values=values, mis=mis, obs=obs, mis_pos=mis_pos, pool=pool,
                 pairs=pairs, group=group)


def sample_values(block: Block) -> dict[int, np.ndarray]:
    """Observed values in the sampling pool of each imputed variable (for the initial fill)."""
    return {j: block.values[j][block.obs[j][p]] for j, p in block.pool.items()}


def init_fill(block: Block, plan: Plan, pools: dict[int, np.ndarray]) -> Block:
    """Fill each chain's missing cells with random observed values (mice's initial ``sample``)."""
    imp = {}
    for j, idx in block.mis.items():
        vals = np.empty((plan.m, len(idx)))
        for c in range(plan.m):
            g = _rng.generator(plan.seed, _rng.INIT, plan.chain0 + c, j, block.part)
            vals[c] = pools[j][g.integers(0, len(pools[j]), len(idx))]
        imp[j] = vals
    new = replace(block, imp=imp, out=None)
    refresh_passive(new, plan, None)
    return new


def current_values(block: Block, plan: Plan, k: int, rows: np.ndarray, chain: int | None = None
                   ) -> np.ndarray:
    """Internal values of variable ``k`` in ``rows``: observed ones, and in imputed cells the
    current imputation of every chain (``(m, len(rows))``) or of ``chain`` (``(len(rows),)``)."""
    base = block.values[k][rows]
    x = base.copy() if chain is not None else np.repeat(base[None], plan.m, axis=0)
    if k in block.imp:
        pos = block.mis_pos[k][rows]
        sel = pos >= 0
        if chain is not None:
            x[sel] = block.imp[k][chain, pos[sel]]
        else:
            x[:, sel] = block.imp[k][:, pos[sel]]
    return x


def _raw(v: Variable, x: np.ndarray) -> np.ndarray:
    """Values of a numeric column from its internal values (two-level columns: codes -> levels)."""
    if v.kind == CONTINUOUS:
        return x
    return np.asarray(v.levels, dtype=np.float64)[x.astype(np.int64)]


def refresh_passive(block: Block, plan: Plan, changed: int | None) -> None:
    """Recompute the imputed cells of the passive variables that use variable ``changed`` (all
    when None) from the current values of their inputs, in every chain.  Updates ``block.imp``
    in place: call it on a new block."""
    for p, (spec, idx) in plan.passive.items():
        if changed is not None and changed not in idx:
            continue
        rows = block.mis.get(p)
        if rows is None or not len(rows):
            continue
        vals = {name: _raw(plan.variables[k], current_values(block, plan, k, rows))
                for name, k in zip(spec.inputs, idx)}
        with np.errstate(all="ignore"):
            out = np.broadcast_to(np.asarray(spec.evaluate(vals), dtype=np.float64), (plan.m, len(rows)))
        bad = int((~np.isfinite(out)).sum())
        if bad:
            raise ValueError(f"passive column {spec.name!r} is not finite in {bad} imputed cells of "
                             f"partition {block.part} (check its expression against the imputed values)")
        block.imp[p] = out.copy()


def encoded(v: Variable, vals: np.ndarray) -> np.ndarray:
    """Encoded design columns of internal values ``vals`` (any shape): shape ``vals.shape + (width,)``."""
    if v.kind == CONTINUOUS:
        return ((vals - v.center) / v.scale)[..., None]
    if v.kind in (NOMINAL, ORDINAL):
        if v.groups is not None:  # collapsed levels share a column
            g = np.asarray(v.groups, dtype=np.int64)
            return np.eye(int(g.max()) + 1)[g[vals.astype(np.int64)]][..., 1:]
        return np.eye(v.n_levels)[vals.astype(np.int64)][..., 1:]
    return vals[..., None]


def imputed_parts(block: Block, plan: Plan, skip: int | None = None) -> list[tuple[int, np.ndarray]]:
    """The imputed cells of every chain as ``(variable, values (m, rows, width))``, in encoded form.

    The design of chain c is ``D0 + E_c`` where ``E_c`` holds these values in the
    missing cells (``D0`` is zero there).  Encodings are memoised per imputed array (arrays
    in ``block.imp`` are never modified in place, only replaced).
    """
    out = []
    for k, vals in block.imp.items():
        v = plan.variables[k]
        if k == skip or v.width == 0 or not len(block.mis[k]):
            continue
        memo = block.cache.get(("enc", k))
        if memo is None or memo[0] is not vals:
            memo = (vals, encoded(v, vals))
            block.cache[("enc", k)] = memo
        out.append((k, memo[1]))
    return out


def _fill_layout(block: Block, plan: Plan, rows: np.ndarray, cols: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Where variable ``k``'s imputed cells fall in the design of ``rows`` x ``cols``: the
    design rows ``sel``, their positions in ``imp[k]`` and the pairs (encoded column of ``k``,
    design column) kept in ``cols``.  Fixed for a block, since the missing cells never change."""
    a, b = plan.variables[k].cols
    col_pos = {int(c): i for i, c in enumerate(cols)}
    local = [(i, col_pos[c]) for i, c in enumerate(range(a, b)) if c in col_pos]
    pos = block.mis_pos[k][rows]
    sel = np.nonzero(pos >= 0)[0] if local else np.zeros(0, dtype=np.int64)
    return sel, pos[sel], local


def _layout_cells(layout: tuple[np.ndarray, np.ndarray, list[tuple[int, int]]], V: np.ndarray
                  ) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """The cells of a :func:`_fill_layout` with the imputed values ``V`` (m, cells): ``(rows of
    the design, design column, values (m, rows))`` per design column."""
    sel, pos, local = layout
    if not len(sel):
        return []
    Vs = V[:, pos]
    return [(sel, col, Vs[:, :, i]) for i, col in local]


def _fills(block: Block, plan: Plan, rows: np.ndarray, cols: np.ndarray
           ) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """The imputed cells of ``rows`` x ``cols`` as ``(rows of the design, design column, values
    (m, rows))`` per imputed design column (``D0`` is zero in those cells)."""
    fills = []
    for k, V in imputed_parts(block, plan):
        fills.extend(_layout_cells(_fill_layout(block, plan, rows, cols, k), V))
    return fills


def pool_cells(block: Block, plan: Plan, rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
    """The imputed cells of the pmm donor rows ``rows`` x ``cols``, for the client to complete
    ``D0[rows][:, cols]`` (which it keeps, since it never changes) chain by chain: their rows
    ``pool_fr`` and columns ``pool_fc`` in that design, their values ``pool_fv`` (m, cells)
    and the number of donor rows ``pool_n``.  Sending the cells instead of m dense designs
    cuts a pmm round's transfer several times over."""
    fills = _fills(block, plan, rows, cols)
    return {"pool_fr": np.concatenate([f[0] for f in fills] or [np.zeros(0)]).astype(np.int32),
            "pool_fc": np.concatenate([np.full(len(f[0]), f[1]) for f in fills] or [np.zeros(0)])
            .astype(np.int32),
            "pool_fv": np.concatenate([f[2] for f in fills], axis=1) if fills
            else np.zeros((plan.m, 0)),
            "pool_n": np.array([len(rows)])}


def chain_designs(block: Block, plan: Plan, rows: np.ndarray, cols: np.ndarray):
    """Yield the encoded design of ``rows`` x ``cols`` for chain 0, 1, ..., m-1 in turn."""
    # column-major: each fill writes into one contiguous column, and the kernels' products
    # with X run faster on it
    base = np.asfortranarray(block.D0[rows][:, cols])
    fills = _fills(block, plan, rows, cols)
    for c in range(plan.m):
        X = base.copy(order="F")
        for sel, col, V in fills:
            X[sel, col] = V[c]
        yield X


def model_designs(block: Block, plan: Plan, j: int, rows: np.ndarray, cols: np.ndarray,
                  key: str = "obs", chains: Any = None):
    """:func:`chain_designs` of ``rows`` x ``cols`` for variable ``j``'s model: its statistics
    (``key="obs"``, the fitting rows) or its imputation (``key="mis"``).  Every chain's design is
    written into the same array, only its imputed cells changing: a design is valid until the
    next one is yielded.  ``chains`` (default: all, in order) are the chains whose designs
    are yielded.

    The part that never changes, the designs' fixed cells (``D0``) and the layout of the
    imputed cells, is kept in ``block.cache`` when it takes at most ``plan.design_cache``:
    one entry per variable and key (its last ``rows`` and ``cols``), so a model whose
    predictors change (screening) replaces its entry instead of adding one.
    """
    cols = np.asarray(cols)
    ck = ("mdesign", j, key)
    hit = block.cache.get(ck)
    cached = hit is not None and (hit[0] is rows or np.array_equal(hit[0], rows)) \
        and np.array_equal(hit[1], cols)
    if not cached:
        # column-major: each fill writes into one contiguous column, and the kernels'
        # products with X run faster on it
        hit = (rows, cols.copy(), np.asfortranarray(block.D0[rows][:, cols]), {})
        if hit[2].nbytes <= plan.design_cache[0 if key == "obs" else 1]:
            block.cache[ck] = hit
            cached = True
        else:
            block.cache.pop(ck, None)
    _, _, base, layout = hit
    fills = []
    for k, V in imputed_parts(block, plan):
        if k not in layout:
            layout[k] = _fill_layout(block, plan, rows, cols, k)
        fills.extend(_layout_cells(layout[k], V))
    X = base.copy(order="F") if cached else base  # the cached cells stay untouched whatever happens to X
    for c in range(plan.m) if chains is None else chains:
        for sel, col, V in fills:
            X[:, col][sel] = V[c]
        yield X


def _small_matmul(V: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``V @ B`` for ``V (m, r, w)`` and ``B (m, w, l)`` with small w and l, without batched BLAS calls."""
    out = V[:, :, 0, None] * B[:, None, 0, :]
    for i in range(1, V.shape[2]):
        out += V[:, :, i, None] * B[:, None, i, :]
    return out


def _left_matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B[c]`` for every chain as one BLAS call: ``A (r, s)``, ``B (m, s, w)`` -> ``(m, r, w)``."""
    m, s, w = B.shape
    out = A @ B.transpose(1, 0, 2).reshape(s, m * w)
    return out.reshape(A.shape[0], m, w).transpose(1, 0, 2)


def _chain_crossprod(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A[c]' B[c]`` for every chain: ``A (m, r, w)``, ``B (m, r, v)`` -> ``(m, w, v)``."""
    return np.matmul(A.transpose(0, 2, 1), B)  # batched BLAS: several times faster than einsum here


def linear_predictor(block: Block, plan: Plan, B: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(D0 + E_c)[rows] @ B[c]`` for every chain; ``B`` is ``(m, Q)`` or ``(m, Q, L)``."""
    squeeze = B.ndim == 2
    if squeeze:
        B = B[..., None]
    eta = _left_matmul(block.D0[rows], B)
    for k, V in imputed_parts(block, plan):
        a, b = plan.variables[k].cols
        if not B[:, a:b].any():  # not a predictor (the imputed variable itself, dropped ones)
            continue
        pos = block.mis_pos[k][rows]
        sel = np.nonzero(pos >= 0)[0]
        if len(sel):
            eta[:, sel] += _small_matmul(V[:, pos[sel]], B[:, a:b])
    return eta[..., 0] if squeeze else eta


def weighted_gram(block: Block, plan: Plan, w: np.ndarray, parts: list[tuple[int, np.ndarray]],
                  base: np.ndarray | None = None) -> np.ndarray:
    """``(D0 + E_c)' diag(w) (D0 + E_c)`` for every chain: ``(m, Q, Q)``, weights ``w >= 0``.

    ``base`` may hold the cached ``D0' diag(w) D0``, which no imputation changes.  The
    terms involving the imputed cells cost O(missing cells x Q) per chain, so with the
    base cached a visit's cost grows with the number of missing cells, not of rows.
    """
    m = plan.m
    D0 = block.D0
    if base is None:
        Xs = D0 * np.sqrt(w)[:, None]
        base = Xs.T @ Xs  # numpy computes X'X as a symmetric rank-k update
    G = np.repeat(base[None], m, axis=0)
    cols = {k: plan.variables[k].cols for k, _ in parts}
    WV = {}
    for k, V in parts:
        a, b = cols[k]
        rows = block.mis[k]
        WV[k] = V * w[rows][None, :, None]
        key = ("D0T-mis", k)
        if key not in block.cache:  # D0 never changes
            block.cache[key] = np.ascontiguousarray(D0[rows].T)
        C = _left_matmul(block.cache[key], WV[k])
        G[:, :, a:b] += C
        G[:, a:b, :] += C.transpose(0, 2, 1)
        G[:, a:b, a:b] += _chain_crossprod(V, WV[k])
    for i, (k, _) in enumerate(parts):
        for l, Vl in parts[i + 1:]:
            pk, pl = block.pairs[(k, l)] if (k, l) in block.pairs else block.pairs[(l, k)][::-1]
            if not len(pk):
                continue
            T = _chain_crossprod(WV[k][:, pk], Vl[:, pl])
            (a, b), (c0, c1) = cols[k], cols[l]
            G[:, a:b, c0:c1] += T
            G[:, c0:c1, a:b] += T.transpose(0, 2, 1)
    return G


# ---------------------------------------------------------------------------
# formula designs (dmice.formulas)


def _formula_frame(block: Block, plan: Plan, fm: Any, rows: np.ndarray, c: int) -> pd.DataFrame:
    """The formula variables of ``rows`` with chain ``c``'s imputed values."""
    from dmice.formulas import as_column

    return pd.DataFrame({plan.variables[k].name: as_column(plan.variables[k],
                                                           current_values(block, plan, k, rows, chain=c))
                         for k in fm.inputs})


def formula_designs(block: Block, plan: Plan, j: Any, rows: np.ndarray, key: str, fm: Any = None):
    """Yield the formula design of ``rows`` for chain 0, 1, ..., m-1 in turn (the formula of
    variable ``j``, or ``fm`` cached under the name ``j``).

    Rows whose formula variables are all observed have the same design in every chain and
    iteration: built once and cached under ``key`` (``rows`` must be the same set each time
    the key is used); only rows with imputed cells are rebuilt per chain.
    """
    from dmice.formulas import design as _fdesign

    fm = fm if fm is not None else plan.formulas[j]
    ck = ("fdesign", j, key)
    if ck not in block.cache:
        vary = np.zeros(len(rows), dtype=bool)
        for k in fm.inputs:
            if k in block.mis_pos:
                vary |= block.mis_pos[k][rows] >= 0
        base = np.zeros((len(rows), fm.width))
        if (~vary).any():
            base[~vary] = _fdesign(fm, _formula_frame(block, plan, fm, rows[~vary], 0))
        block.cache[ck] = (base, vary)
    base, vary = block.cache[ck]
    vr = rows[vary]
    for c in range(plan.m):
        X = base.copy()
        if len(vr):
            X[vary] = _fdesign(fm, _formula_frame(block, plan, fm, vr, c))
        yield X


def _formula_gram(block: Block, plan: Plan, j: int) -> np.ndarray:
    """``[X y]'[X y]`` of the observed rows for every chain, X the formula design, y scaled."""
    v = plan.variables[j]
    obs = block.obs[j]
    y = (block.values[j][obs] - v.center) / v.scale
    designs = formula_designs(block, plan, j, obs, "obs")
    first = next(designs)  # builds the cached fixed rows
    base, vary = block.cache[("fdesign", j, "obs")]
    ck = ("fgram", j)
    if ck not in block.cache:
        Z = np.column_stack([base[~vary], y[~vary]])
        block.cache[ck] = Z.T @ Z
    out = []
    for X in itertools.chain([first], designs):
        Zv = np.column_stack([X[vary], y[vary]])
        out.append(block.cache[ck] + Zv.T @ Zv)
    return np.stack(out)


# ---------------------------------------------------------------------------
# imputation of one variable from drawn parameters


def _match(yhat_mis: np.ndarray, donor_yhat: np.ndarray, donor_y: np.ndarray, donors: int,
           g: np.random.Generator) -> np.ndarray:
    """Type-1 predictive mean matching against sorted donor predictions.

    The ``donors`` nearest donors of a value form a contiguous run of the sorted
    predictions; it is found by growing the run one donor at a time towards the
    nearer side, then one donor of the run is taken at random.
    """
    S = len(donor_yhat)
    d = min(donors, S)
    order = np.argsort(yhat_mis)  # sorted needles search several times faster
    hi = np.empty(len(yhat_mis), dtype=np.int64)
    hi[order] = np.searchsorted(donor_yhat, yhat_mis[order])  # run is [lo, hi)
    lo = hi.copy()
    ext = np.concatenate([[-np.inf], donor_yhat, [np.inf]])  # ext[i + 1] == donor_yhat[i]
    for _ in range(d):
        # grow towards donor lo - 1 when it is at least as near as donor hi
        take_left = (yhat_mis - ext[lo]) <= (ext[hi + 1] - yhat_mis)
        lo -= take_left
        hi += ~take_left
    return donor_y[lo + g.integers(0, d, len(yhat_mis))]


def pmm_candidates(block: Block, plan: Plan, order: dict[str, Any]) -> dict[str, np.ndarray]:
    """Matching round of pmm on all observed rows (see :mod:`dmice.methods.pmm`), for the chains
    ``order['chains']``: the predictions of the fitting rows from ``order['coef']`` (beta_hat),
    sorted per chain (``pmm_oyh``: chains x rows) with the order of the observed values in them
    (``pmm_oo``, chains x rows, uint16 up to 65,536 rows, else int32) and those values once
    (``pmm_oy``: 1 x rows; left out when ``order['values']`` is False: the client has them), the
    predictions of the missing rows from ``order['beta']`` (beta*), sorted too (``pmm_q``), and
    the numbers of each (``pmm_no``, ``pmm_nq``).  The order of each chain's missing rows is kept
    in ``block.cache`` for the imputation round, whose matched values come in that order."""
    j = order["var"]
    chains = [int(c) for c in order["chains"]]
    xcols = np.asarray(order["xcols"])
    coef, beta = np.asarray(order["coef"]), np.asarray(order["beta"])
    k = len(chains)
    obs, mis = block.obs[j], block.mis[j]
    if j in plan.formulas:
        want = set(chains)
        yo = np.stack([X[:, xcols] @ coef[chains.index(c)]
                       for c, X in enumerate(formula_designs(block, plan, j, obs, "obs")) if c in want])
        q = np.stack([X[:, xcols] @ beta[chains.index(c)]
                      for c, X in enumerate(formula_designs(block, plan, j, mis, "mis")) if c in want]) \
            if len(mis) else np.zeros((k, 0))
    else:
        # beta_hat and beta* of every chain in one product over all rows (cheaper than copying
        # the rows out; chains x rows, four times faster than rows x chains for a row-major
        # D0), then each chain's imputed cells of the predictors: beta_hat's part where they
        # fall on the fitting rows, beta*'s on the missing ones
        Bm = np.zeros((plan.n_cols, 2 * k))
        Bm[xcols, :k] = coef.T
        Bm[xcols, k:] = beta.T
        eta = Bm.T @ block.D0.T
        yo, q = np.take(eta[:k], obs, axis=1), np.take(eta[k:], mis, axis=1)
        for kv, V in imputed_parts(block, plan, skip=j):
            a, b = plan.variables[kv].cols
            if not Bm[a:b].any():
                continue
            Vc = V if chains == list(range(plan.m)) else V[chains]  # (k, cells, width)
            for out, rows, B, side in ((yo, obs, Bm[a:b, :k], "obs"), (q, mis, Bm[a:b, k:], "mis")):
                ck = ("pmm-fill", j, kv, side)
                if ck not in block.cache:  # where kv's imputed cells fall among the rows (fixed)
                    pos = block.mis_pos[kv][rows]
                    sel = np.nonzero(pos >= 0)[0]
                    block.cache[ck] = (sel.astype(np.int32), pos[sel].astype(np.int32))
                sel, cells = block.cache[ck]
                if not len(sel):
                    continue
                add = Vc[:, cells, 0] * B[0][:, None]
                for w in range(1, Vc.shape[2]):
                    add += Vc[:, cells, w] * B[w][:, None]
                out[:, sel] += add
    y = block.values[j][obs]
    oy = np.empty(yo.shape, dtype=np.uint16 if len(obs) <= 1 << 16 else np.int32)
    for i, c in enumerate(chains):
        yo[i], oy[i] = _argsort(yo[i])  # ties: any of them is drawn on the client (dmice.methods.pmm)
        q[i], block.cache[("pmm-order", j, c)] = _argsort(q[i])
    if order.get("on_workers"):  # matched among the workers: kept here, the client gets quantiles
        from dmice.methods import pmm as _pmm

        # each cell's uniforms, as the client would draw them (dmice.methods.pmm.uniforms)
        it = int(order["iteration"])
        u = [_pmm.cell_uniforms(plan.seed, plan.chain0 + c, it, j, block.part, len(mis)) for c in chains]
        block.cache[("pmm-cand", j)] = {"chains": chains, "s": yo, "v": y[oy], "q": q, "u": u}
        return {"pmm_quant": np.stack([_pmm.quantile_sample(yo[i]) for i in range(k)])[None],
                "pmm_no": np.array([len(obs)]), "pmm_nq": np.array([len(mis)])}
    # the observed values once, whatever the number of chains (and only the first time: they
    # never change), and each chain's order of them
    out = {"pmm_oyh": yo, "pmm_oo": oy, "pmm_q": q, "pmm_no": np.array([len(obs)]),
           "pmm_nq": np.array([len(mis)])}
    if order.get("values", True):
        out["pmm_oy"] = y[None, :]
    return out


def _argsort(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` sorted, and its order, the same on every machine: ties in the order of the rows
    (numpy's fastest sort orders ties differently on different processors; its stable sort is
    four times slower)."""
    srt = np.argsort(x)
    s = x[srt]
    eq = s[1:] == s[:-1]
    if eq.any():
        tied = np.zeros(len(s), dtype=bool)
        tied[1:] |= eq
        tied[:-1] |= eq
        pos = np.nonzero(tied)[0]
        group = np.cumsum(np.concatenate([[True], ~eq]))[pos]
        # within each tie by row: one sort of unique integer keys (a lexsort is 4 times slower)
        srt[pos] = np.sort(group * len(x) + srt[pos]) % len(x)
    return s, srt


def donor_y(order: dict[str, Any], c: int) -> np.ndarray:
    """The pmm donors' observed values in chain ``c``'s order of their predictions."""
    return order["donor_values"][order["donor_order"][c]]


def _draw_sample(eta: np.ndarray, order: dict[str, Any], v: Variable, c: int, g: np.random.Generator) -> np.ndarray:
    pool = order["values"]
    return pool[g.integers(0, len(pool), eta.shape[0])]


def _draw_norm(eta: np.ndarray, order: dict[str, Any], v: Variable, c: int, g: np.random.Generator) -> np.ndarray:
    return v.center + v.scale * (eta + order["sigma"][c] * g.standard_normal(eta.shape[0]))


def _draw_pmm(eta: np.ndarray, order: dict[str, Any], v: Variable, c: int, g: np.random.Generator) -> np.ndarray:
    return _match(eta, order["donor_yhat"][c], donor_y(order, c), order["donors"], g)


def _draw_binary(eta: np.ndarray, order: dict[str, Any], v: Variable, c: int, g: np.random.Generator) -> np.ndarray:
    return (g.random(eta.shape[0]) < expit(eta)).astype(np.float64)


def _draw_poisson(eta: np.ndarray, order: dict[str, Any], v: Variable, c: int, g: np.random.Generator) -> np.ndarray:
    # exp(40) keeps the rate inside the range of numpy's Poisson sampler
    return g.poisson(np.exp(np.minimum(eta, 40.0))).astype(np.float64)


def _draw_polr(eta: np.ndarray, order: dict[str, Any], v: Variable, c: int, g: np.random.Generator) -> np.ndarray:
    cum = expit(order["cuts"][c][None, :] - eta[:, None])  # P(Y <= k), k = 0..K-2
    u = g.random(eta.shape[0])
    return (cum < u[:, None]).sum(axis=1).astype(np.float64)


def _draw_polyreg(eta: np.ndarray, order: dict[str, Any], v: Variable, c: int, g: np.random.Generator) -> np.ndarray:
    P = stats.softmax0(eta)
    u = g.random(eta.shape[0])
    return np.minimum((P.cumsum(axis=1) < u[:, None]).sum(axis=1), eta.shape[1]).astype(float)


#: the workers' draw of each method's missing values from their linear predictor(s)
DRAWS: dict[str, Callable[..., np.ndarray]] = {
    "sample": _draw_sample, "norm": _draw_norm, "pmm": _draw_pmm, "logreg": _draw_binary,
    "logreg.firth": _draw_binary, "poisson": _draw_poisson, "polr": _draw_polr, "polyreg": _draw_polyreg,
}


def impute_values(eta: np.ndarray, order: dict[str, Any], v: Variable, c: int,
                  g: np.random.Generator) -> np.ndarray:
    """New internal values for the missing rows of one chain from their linear predictor(s)
    (``eta``: one row per missing row; ``sample`` reads only its length)."""
    try:
        draw = DRAWS[order["method"]]
    except KeyError:
        raise ValueError(f"unknown method {order['method']!r}") from None
    return draw(eta, order, v, c, g)


def _chain_summary(vals: np.ndarray, v: Variable) -> np.ndarray:
    """Per-chain sums that give the mean and sd (continuous, of the standardised values) or level
    counts (categorical)."""
    if v.kind == CONTINUOUS:  # in standardised units: squares of values near 1e160 overflow
        z = (vals - v.center) / v.scale
        return np.stack([np.full(len(vals), vals.shape[1], dtype=float), z.sum(axis=1),
                         (z ** 2).sum(axis=1)], axis=1)
    K = v.n_levels
    return np.stack([np.bincount(r.astype(np.int64), minlength=K) for r in vals]).astype(float)


# ---------------------------------------------------------------------------
# statistics for the next model


def _full_coef(plan: Plan, xcols: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Coefficients on the predictor columns spread to all Q design columns (zeros elsewhere)."""
    B = np.zeros((plan.m, plan.n_cols) + beta.shape[2:])
    B[:, xcols] = beta
    return B


def _polr_stats(X: np.ndarray, y: np.ndarray, b: np.ndarray, c: int, request: dict[str, Any],
                v: Variable) -> dict[str, np.ndarray]:
    keep = np.asarray(request["xcols"]) != 0  # the cutpoints take the intercept's place
    km1 = v.n_levels - 1
    return stats.polr(X[:, keep], y, b[:km1], b[km1:])


def _firth_stats(X: np.ndarray, y: np.ndarray, b: np.ndarray, c: int, request: dict[str, Any],
                 v: Variable) -> dict[str, np.ndarray]:
    inv = request.get("inv_info")
    return stats.logistic_firth(X, y, b, None if inv is None else inv[c])


#: the statistics of each Newton family's fit on one chain's design ``X`` of the fitting rows, at
#: its estimate ``b`` (``c``: the chain, ``request``: what the client asked, ``v``: the target)
NEWTON_KERNELS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "logistic": lambda X, y, b, c, request, v: stats.logistic(X, y, b),
    "multinomial": lambda X, y, b, c, request, v: stats.multinomial(X, y, b),
    "poisson": lambda X, y, b, c, request, v: stats.poisson(X, y, b),
    "firth": _firth_stats,
    "polr": _polr_stats,
}


def model_stats(block: Block, plan: Plan, request: dict[str, Any]) -> dict[str, Any]:
    """Sufficient statistics of one conditional model for all chains (see :mod:`dmice.glm.kernels`)."""
    j = request["var"]
    v = plan.variables[j]
    xcols = request["xcols"]
    kind = request["stat"]
    obs = block.obs[j]
    parts = imputed_parts(block, plan, skip=j)
    w = np.zeros(block.n)
    w[obs] = 1.0
    out_sum: dict[str, np.ndarray] = {"n": np.array(float(len(obs)))}
    out_cat: dict[str, np.ndarray] = {}
    if kind == "smcfcs":
        return _smcfcs_stats(block, plan, request)
    if kind == "gram" and j in plan.formulas:  # xcols: the formula design's columns still in the model
        sel = np.append(xcols, plan.formulas[j].width)
        out_sum["G"] = _formula_gram(block, plan, j)[:, sel][:, :, sel]
        if request.get("pool"):
            rows = obs[block.pool[j]]
            out_cat["pool_X"] = np.stack([X[:, xcols] for X in formula_designs(block, plan, j, rows, "pool")])
            out_cat["pool_y"] = block.values[j][rows]
        return {"sum": out_sum, "cat": out_cat}
    if kind == "gram":
        key = ("gram", j)
        if key not in block.cache:
            D = block.D0[obs]
            block.cache[key] = D.T @ D
        G = weighted_gram(block, plan, w, parts, base=block.cache[key])
        sel = np.append(xcols, v.cols[0])  # predictors, then the (scaled) target itself
        out_sum["G"] = G[:, sel][:, :, sel]
        if request.get("pool"):
            rows = obs[block.pool[j]]
            out_cat.update(pool_cells(block, plan, rows, xcols))
            if request["pool"] == "base":
                out_cat["pool_D"] = block.D0[rows][:, xcols]
                out_cat["pool_y"] = block.values[j][rows]
        return {"sum": out_sum, "cat": out_cat}
    # Newton models: the weights differ per chain everywhere, so each chain's design of the
    # observed rows is built once and the kernels of dmice.glm.kernels run on it directly
    y = block.values[j][obs]
    beta = request["beta"]
    chains = request.get("chains")  # the chains whose fits still iterate (default: all)
    chains = range(plan.m) if chains is None else [int(c) for c in chains]

    def designs():
        """``(chain, design)`` of each chain asked for."""
        if j in plan.formulas:
            return ((c, X[:, xcols]) for c, X in enumerate(formula_designs(block, plan, j, obs, "obs"))
                    if c in chains)
        return zip(chains, model_designs(block, plan, j, obs, xcols, chains=chains))
    try:
        kernel = NEWTON_KERNELS[kind]
    except KeyError:
        raise ValueError(f"unknown statistics {kind!r}") from None
    res = [kernel(X, y, beta[c], c, request, v) for c, X in designs()]
    for key in res[0] if res else ():
        out_sum[key] = np.stack([r[key] for r in res])
    return {"sum": out_sum, "cat": out_cat}


# ---------------------------------------------------------------------------
# SMC-FCS


def _smcfcs_stats(block: Block, plan: Plan, request: dict[str, Any]) -> dict[str, Any]:
    """SMC-FCS (:mod:`dmice.methods.smcfcs`): the covariate model's Gram matrix and the
    substantive model's statistics on the completed data."""
    j = request["var"]
    v = plan.variables[j]
    sub = plan.substantive
    n = block.n
    key = ("gram", "all")
    if key not in block.cache:
        block.cache[key] = block.D0.T @ block.D0
    G = weighted_gram(block, plan, np.ones(n), imputed_parts(block, plan), base=block.cache[key])
    sel = np.append(request["xcols"], v.cols[0])
    out_sum: dict[str, np.ndarray] = {"n": np.array(float(n)), "G": G[:, sel][:, :, sel]}
    y = block.values[sub.outcome]
    rows = np.arange(n)
    designs = formula_designs(block, plan, "substantive", rows, "all", fm=sub.model)
    if sub.family == "gaussian":
        out_sum["Gs"] = np.stack([np.column_stack([X, y]).T @ np.column_stack([X, y]) for X in designs])
    else:
        res = [stats.logistic(X, y, request["sub_beta"][c]) for c, X in enumerate(designs)]
        out_sum["gs"] = np.stack([r["g"] for r in res])
        out_sum["Hs"] = np.stack([r["H"] for r in res])
    return {"sum": out_sum, "cat": {}}


def _smcfcs_impute(block: Block, plan: Plan, order: dict[str, Any], j: int, rows: np.ndarray
                   ) -> tuple[np.ndarray, int]:
    """SMC-FCS (:mod:`dmice.methods.smcfcs`): new values of the missing cells of covariate ``j``
    in every chain, by rejection sampling, and the number of cells that kept their previous value."""
    from dmice.formulas import design

    v = plan.variables[j]
    sub = plan.substantive
    eta = linear_predictor(block, plan, _full_coef(plan, order["xcols"], order["beta"]), rows=rows)
    y = block.values[sub.outcome][rows]
    out = block.imp[j].copy()
    m = plan.m
    gens = [_rng.generator(plan.seed, _rng.WORKER, plan.chain0 + c, order["iteration"], j, block.part)
            for c in range(m)]
    frames = [_formula_frame(block, plan, sub.model, rows, c) for c in range(m)]
    pending = [np.arange(len(rows)) for _ in range(m)]
    tried = np.zeros(m, dtype=np.int64)
    while True:
        # one batch for every chain: k candidates per pending row (more as fewer rows remain)
        batch = []
        for c in range(m):
            if not len(pending[c]) or tried[c] >= SMCFCS_MAX_CANDIDATES:
                continue
            k = int(min(SMCFCS_MAX_CANDIDATES - tried[c], max(1, -(-len(rows) // len(pending[c])))))
            idx = np.repeat(pending[c], k)
            cand = v.center + v.scale * (eta[c, idx] + order["sigma"][c] * gens[c].standard_normal(len(idx)))
            batch.append((c, k, idx, cand))
        if not batch:
            break
        fr = pd.concat([frames[c].iloc[idx] for c, _, idx, _ in batch], ignore_index=True)
        fr[v.name] = np.concatenate([cand for *_, cand in batch])
        X = design(sub.model, fr)
        at = 0
        for c, k, idx, cand in batch:
            mu = X[at:at + len(idx)] @ order["sub_beta"][c]
            at += len(idx)
            if sub.family == "gaussian":
                p = np.exp(-0.5 * ((y[idx] - mu) / order["sub_sigma"][c]) ** 2)
            else:
                pr = expit(mu)
                p = np.where(y[idx] == 1, pr, 1 - pr)
            ok = (gens[c].random(len(idx)) < p).reshape(len(pending[c]), k)
            hit = ok.any(axis=1)
            first = ok.argmax(axis=1)
            out[c, pending[c][hit]] = cand.reshape(len(pending[c]), k)[hit, first[hit]]
            pending[c] = pending[c][~hit]
            tried[c] += k
    failed = int(sum(len(p) for p in pending))
    return out, failed


def visit(block: Block, plan: Plan, order: dict[str, Any] | None,
          request: dict[str, Any] | list[dict[str, Any]] | None) -> Block:
    """Impute ``order['var']`` in all chains, then compute the statistics of ``request`` (or of
    each request of a list)."""
    if order is not None and order.get("phase") == "pmm-match":  # no imputation in this round
        if "groups" in order:  # by=: each group matches among its own rows
            cat = {}
            for g, ph in order["groups"].items():
                got = pmm_candidates(group_view(block, ph["var"], g), plan, ph)
                cat.update({f"g{g}/{k}": a for k, a in got.items()})
            return replace(block, out={"sum": {}, "cat": cat})
        return replace(block, out={"sum": {}, "cat": pmm_candidates(block, plan, order)})
    new = replace(block, imp=dict(block.imp), out=None)
    out: dict[str, Any] = {"sum": {}, "cat": {}}
    if order is not None:
        j = order["var"]
        v = plan.variables[j]
        rows = block.mis[j]
        vals = np.empty((plan.m, len(rows)))
        if len(rows) and order["method"] == "smcfcs":
            vals[:], failed = _smcfcs_impute(block, plan, order, j, rows)
            out["sum"]["smcfcs_failed"] = np.array(float(failed))
        elif len(rows) and "pmm_values" in order:  # pmm on all observed rows: matched on the client
            got = order["pmm_values"][block.part]  # each chain's in the order of its predictions
            for c in range(plan.m):
                vals[c, block.cache.pop(("pmm-order", j, c))] = got[c]
        elif len(rows) and order.get("pmm_on_workers"):  # matched among the workers, kept here
            got = block.cache.pop(("pmm-matched", j))
            for c in range(plan.m):
                vals[c, block.cache.pop(("pmm-order", j, c))] = got[c]
        elif len(rows) and "groups" in order:
            _impute_groups(block, plan, order, rows, vals)
        elif len(rows):
            eta = None
            if order["method"] != "sample" and j in plan.formulas:
                eta = np.stack([X[:, order["xcols"]] @ order["beta"][c]
                                for c, X in enumerate(formula_designs(block, plan, j, rows, "mis"))])
            elif order["method"] != "sample":
                eta = np.stack([X @ order["beta"][c] for c, X in
                                enumerate(model_designs(block, plan, j, rows, order["xcols"], "mis"))])
            for c in range(plan.m):
                g = _rng.generator(plan.seed, _rng.WORKER, plan.chain0 + c, order["iteration"], j,
                                   block.part)
                vals[c] = impute_values(eta[c] if eta is not None else np.empty(len(rows)),
                                        order, v, c, g)
        if len(rows) and j in plan.post:
            for c in range(plan.m):
                vals[c] = _post.apply(plan.post[j], vals[c])
        new.imp[j] = vals
        refresh_passive(new, plan, j)
        out["sum"]["chain"] = _chain_summary(vals, v)
    if isinstance(request, list):  # several models at once: keys prefixed with the request's index
        for i, r in enumerate(request):
            st = _stats(new, plan, r)
            for part in ("sum", "cat"):
                out[part].update({f"{i}/{k}": a for k, a in st[part].items()})
    elif request is not None:
        st = _stats(new, plan, request)
        out["sum"].update(st["sum"])
        out["cat"].update(st["cat"])
    new.out = out
    return new


def group_block(block: Block, j: int, g: int) -> Block:
    """View of ``block`` in which variable ``j`` is observed only in the rows of group ``g`` (for ``by=``)."""
    key = ("by", j, g)
    if key not in block.cache:
        ing = block.group[block.obs[j]] == g
        newpos = np.cumsum(ing) - 1
        p = block.pool[j]
        block.cache[key] = (block.obs[j][ing], newpos[p[ing[p]]])
    obs_g, pool_g = block.cache[key]
    sub = block.cache.setdefault(("by-cache", g), {})  # statistics of the group's rows that never change
    return replace(block, obs={**block.obs, j: obs_g}, pool={**block.pool, j: pool_g}, cache=sub)


def group_view(block: Block, j: int, g: int) -> Block:
    """:func:`group_block` with variable ``j``'s missing rows also those of group ``g`` only (pmm's
    matching within groups; the group's own cache keeps its sorted order for the imputation)."""
    gb = group_block(block, j, g)
    return replace(gb, mis={**gb.mis, j: block.mis[j][block.group[block.mis[j]] == g]})


def _stats(block: Block, plan: Plan, request: dict[str, Any]) -> dict[str, Any]:
    """:func:`model_stats`, or for a stratified request the statistics of every group (keys ``g<k>/``)."""
    if "groups" not in request:
        return model_stats(block, plan, request)
    out: dict[str, Any] = {"sum": {}, "cat": {}}
    for g, r in request["groups"].items():
        st = model_stats(group_block(block, r["var"], g), plan, r)
        for part in ("sum", "cat"):
            out[part].update({f"g{g}/{k}": a for k, a in st[part].items()})
    return out


def _impute_groups(block: Block, plan: Plan, order: dict[str, Any], rows: np.ndarray,
                   vals: np.ndarray) -> None:
    """Impute the missing ``rows`` of a stratified variable, each group with its own parameters."""
    j = order["var"]
    v = plan.variables[j]
    grp = block.group[rows]
    for g, o in order["groups"].items():
        sel = np.nonzero(grp == g)[0]
        if not len(sel):
            continue
        if "pmm_values" in o:  # matched on the client among the group's rows
            got = o["pmm_values"][block.part]
            cache = block.cache[("by-cache", g)]
            for c in range(plan.m):
                vals[c, sel[cache.pop(("pmm-order", j, c))]] = got[c]
            continue
        eta = None
        if o["method"] != "sample":
            eta = linear_predictor(block, plan, _full_coef(plan, o["xcols"], o["beta"]), rows=rows[sel])
        for c in range(plan.m):
            gen = _rng.generator(plan.seed, _rng.WORKER, plan.chain0 + c, o["iteration"], j, block.part,
                                 g + 1)
            vals[c, sel] = impute_values(eta[c] if eta is not None else np.empty(len(sel)), o, v, c, gen)


def split_out(res: dict[str, Any], i: int) -> dict[str, Any]:
    """The statistics of request ``i`` from the combined output of a list of requests."""
    pre = f"{i}/"
    return {part: {k[len(pre):]: a for k, a in res[part].items() if k.startswith(pre)}
            for part in ("sum", "cat")}


def get_out(block: Block) -> dict[str, Any]:
    return block.out or {"sum": {}, "cat": {}}


def combine(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum (statistics) and concatenate (donor rows) outputs of several partitions, in order."""
    res: dict[str, Any] = {"sum": {}, "cat": {}}
    cat: dict[str, list[np.ndarray]] = {}
    for o in outs:
        for k, a in o["sum"].items():
            res["sum"][k] = a if k not in res["sum"] else res["sum"][k] + a
        for k, a in o["cat"].items():
            cat.setdefault(k, []).append(a)
    for k, v in cat.items():
        if k.endswith("pool_fr"):  # donor rows of each partition follow those of the ones before
            starts = np.cumsum([0] + [int(a[0]) for a in cat[k[:-2] + "n"]])
            v = [a + s for a, s in zip(v, starts)]
        res["cat"][k] = np.concatenate(v, axis=1 if k.endswith(("pool_X", "pool_fv", "pmm_oyh", "pmm_oo", "pmm_oy", "pmm_q"))
                                       else 0)
    return res


# ---------------------------------------------------------------------------
# state of the chains (continuing a run, checkpoints)


def cells(block: Block) -> dict[str, np.ndarray]:
    """The imputed cells of every chain: ``mis/j`` (rows) and ``imp/j`` (m, rows) per variable."""
    out = {}
    for j, rows in block.mis.items():
        out[f"mis/{j}"] = rows
        out[f"imp/{j}"] = block.imp[j]
    return out


def with_cells(block: Block, cells: dict[str, np.ndarray], plan: Plan) -> Block:
    """``block`` with the imputed values of :func:`cells` (which must describe the same cells)."""
    imp = {}
    for j, rows in block.mis.items():
        name = plan.variables[j].name
        if f"mis/{j}" not in cells or not np.array_equal(cells[f"mis/{j}"], rows):
            raise ValueError(f"stored state of partition {block.part} does not match the missing "
                             f"cells of column {name!r}")
        vals = np.asarray(cells[f"imp/{j}"], dtype=float)
        if vals.shape != (plan.m, len(rows)):
            raise ValueError(f"stored state of partition {block.part} holds {vals.shape[0]} chains "
                             f"for column {name!r}, expected {plan.m}")
        imp[j] = vals
    return replace(block, imp=imp, out=None)


#: ``block.cache`` entries that live for one pmm visit only (the rest never change)
_VISIT_CACHE = ("pmm-order", "pmm-cand", "pmm-matched")


def restore_cells(block: Block, cells: dict[str, np.ndarray] | None, plan: Plan,
                  other: dict[str, np.ndarray] | None = None) -> Block:
    """``block`` (as encoded, or any later state of it) with the imputed cells of a snapshot of
    the chains (:func:`cells`; ``other``, the snapshot's other copy, when ``cells`` is None), as
    it was when the snapshot was taken: the caches of an unfinished visit are left behind."""
    if cells is None:
        cells = other
    if cells is None:
        raise ValueError(f"the snapshot of partition {block.part}'s imputed cells was lost")
    new = with_cells(block, cells, plan)
    new.cache = {k: v for k, v in block.cache.items() if not (isinstance(k, tuple) and k[0] in _VISIT_CACHE)}
    return new


def concat_chains(blocks: list[Block]) -> Block:
    """One block holding the chains of several blocks of the same partition, in order."""
    first = blocks[0]
    imp = {j: np.concatenate([b.imp[j] for b in blocks]) for j in first.imp}
    return replace(first, imp=imp, out=None)


# ---------------------------------------------------------------------------
# completed data


def complete_partition(df: pd.DataFrame, block: Block, plan: Plan, chain: int) -> pd.DataFrame:
    """Partition ``df`` with the missing cells of each imputed variable filled from ``chain``;
    categorical columns get the dataset-wide dtype (:func:`dmice.schema.conform`)."""
    out = conform(df, plan.variables).copy()
    for j, rows in block.mis.items():
        if not len(rows):
            continue
        v = plan.variables[j]
        col = out[v.name]
        filled = from_codes(block.imp[j][chain], v, col)
        s = col.copy()
        s.iloc[rows] = filled.to_numpy() if not isinstance(col.dtype, pd.CategoricalDtype) \
            else filled.values
        out[v.name] = s
    return out
