"""The GLM kernels of dmice, for the imputation models and the analysis.

* :mod:`dmice.glm.links`: families and links (means, derivatives, variances, log-likelihoods);
* :mod:`dmice.glm.irls`: the analysis's IRLS statistics of a block of rows;
* :mod:`dmice.glm.kernels`: the imputation models' statistics of one chain's design (logistic,
  Firth, multinomial, proportional odds, Poisson);
* :mod:`dmice.glm.newton`: Newton steps from reduced statistics and draws from the normal
  approximation (the imputation models);
* :mod:`dmice.glm.solve`: Newton, chord and Broyden steps of m fits at once (the analysis).

Pure numpy and scipy; nothing here touches dask.
"""
