"""The runtime: the only package that talks to the cluster.

* :mod:`dmice.runtime.cluster` finds the client (the one given, the active one, or an embedded
  ``LocalCluster`` on loopback) and reads what dmice needs of the cluster;
* :mod:`dmice.runtime.engine` keeps each partition's block of the chains in the memory of
  its worker while the chained loop runs, and runs the loop's rounds over them;
* :mod:`dmice.runtime.passes` runs passes over partitions (input, blocks, written
  imputations) and keeps per-partition objects on the workers between passes.

Everything else in dmice describes work (plans, models, statistics, formulas, pooling) and
hands it to the runtime; nothing else imports ``distributed`` (checked by import-linter).
"""
