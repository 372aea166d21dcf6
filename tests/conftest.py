from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="session")
def cluster_client():
    """A real distributed cluster: 2 worker processes, 1 thread each, TCP on loopback."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl:
        with Client(cl) as client:
            yield client


def mixed_frame(n: int = 3000, seed: int = 0, frac: float = 0.25) -> pd.DataFrame:
    """Mixed-type frame with MCAR holes in four columns."""
    g = np.random.default_rng(seed)
    x = g.normal(size=n)
    z = (g.random(n) < 0.4).astype(float)
    c = g.choice(3, n)
    y = 1 + 2 * x - z + 0.5 * (c == 2) + g.normal(size=n)
    df = pd.DataFrame({
        "x": x,
        "z": z,
        "y": y,
        "c": pd.Categorical(np.asarray(["a", "b", "c"])[c]),
        "s": g.choice(["u", "v"], n),
    })
    for col in ["x", "z", "c", "s"]:
        df.loc[g.random(n) < frac, col] = None
    return df


@pytest.fixture(scope="session")
def s3(cluster_client):
    """An S3-protocol server (moto in server mode) on loopback for this test session, with a
    bucket ``lake``.  Yields the storage options that reach it; test credentials are set in the
    environment of this process and of the cluster's workers, as a deployment would set them."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import os

    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)

    def set_env(env):
        import os

        os.environ.update(env)

    cluster_client.run(set_env, creds)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}"}
        import s3fs

        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("lake")
        yield options
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def encoded_blocks(df: pd.DataFrame, method=None, m: int = 1, seed: int = 3, parts: int = 1,
                   min_level_count: int = 0, collapse=None):
    """Schema, plan and initially filled blocks of ``df`` in ``parts`` partitions, without a cluster
    (the engine's set-up, in process): ``(variables, plan, blocks, pools)``."""
    from dmice import block as B
    from dmice import schema as S

    variables = S.combine_summaries([S.summarize_partition(df)], df.dtypes)
    S.assign_methods(variables, method)
    S.collapse_levels(variables, min_level_count, collapse)
    Q = S.layout(variables)
    plan = B.Plan(tuple(variables), Q, m, seed, {j: 1.0 for j, v in enumerate(variables) if v.imputed})
    bounds = np.linspace(0, len(df), parts + 1).astype(int)
    blocks = [B.encode_partition(df.iloc[a:b], plan, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    pools = {j: np.concatenate([B.sample_values(b)[j] for b in blocks]) for j in blocks[0].mis}
    blocks = [B.init_fill(b, plan, pools) for b in blocks]
    return variables, plan, blocks, pools


def chain_design_stack(block, plan, rows, cols) -> np.ndarray:
    """Every chain's encoded design of ``rows`` x ``cols``: ``(m, len(rows), len(cols))``."""
    from dmice import block as B

    return np.stack(list(B.chain_designs(block, plan, rows, cols)))


def fit_target(df: pd.DataFrame, target: str, method=None, m: int = 1, parts: int = 1, setup=None, **kw):
    """Fit ``target``'s conditional model to convergence on in-memory blocks, as the engine does
    (statistics of every partition combined, then the model's ``update``); keyword arguments go to
    :func:`dmice.models.make_model`, ``setup`` to :func:`encoded_blocks`.  Returns
    ``(model, plan, blocks, xcols, events)``."""
    from dmice import block as B
    from dmice.models import make_model

    variables, plan, blocks, pools = encoded_blocks(df, method, m=m, parts=parts, **(setup or {}))
    j = [v.name for v in variables].index(target)
    v = variables[j]
    own = set(range(*v.cols))
    xcols = np.array([c for c in range(plan.n_cols) if c not in own])
    model = make_model(j, v, xcols, m=m, seed=plan.seed, sample_pool=pools[j], **kw)
    events: list = []
    for _ in range(200):
        outs = [B.get_out(B.visit(b, plan, None, model.request())) for b in blocks]
        if model.update(B.combine(outs), 1, events):
            return model, plan, blocks, xcols, events
    raise AssertionError(f"the model of {target!r} did not converge in 200 rounds")
