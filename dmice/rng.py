"""Keyed random generators.

Every random draw comes from a generator keyed by integers that say *what* is
drawn, never *where* it runs: the seed, a stage, the chain, the iteration, the
variable and (on the workers) the partition.  A result therefore depends only
on the seed and the partitioning, not on the number of workers, threads, the
order tasks ran in or whether a task was retried.
"""

from __future__ import annotations

import numpy as np

#: stages: separate streams for separate purposes
CLIENT = 1  # parameter draws on the client
WORKER = 2  # imputation draws on the workers
POOL = 3  # choice of donor-pool rows
INIT = 4  # initial fill


def generator(seed: int, stage: int, *key: int) -> np.random.Generator:
    """A generator keyed by ``(seed, stage, *key)``; all integers must be non-negative."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stage, *key])))


def fresh_seed() -> int:
    """A random seed for runs without one (recorded in the result and the manifest)."""
    return int(np.random.SeedSequence().generate_state(1)[0])
