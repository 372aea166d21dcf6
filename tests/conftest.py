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
