"""The math of the conditional models: fits and draws the model families (:mod:`dmice.models`)
use, and the per-partition side of the methods that need one.

* :mod:`dmice.methods.linear`: Bayesian linear regression from a Gram matrix;
* :mod:`dmice.methods.pmm`: predictive mean matching on sorted predictions;
* :mod:`dmice.methods.smcfcs`: SMC-FCS's substantive model and rejection sampling.

The GLM kernels (Newton steps and draws, the statistics of the Newton-fitted models) are in
:mod:`dmice.glm`, which the analysis uses too.

Pure numpy; nothing here touches dask.
"""
