"""Diagonal Fisher estimators (docs/methods.md section 1).

Step-wise estimators, driven by FisherAdapTune through the :class:`Estimator` protocol and
found by name in a registry (:func:`register_estimator`):

- :class:`EmpiricalFisher` (``"empirical"``): ``F <- decay * F + scale * g**2`` from ``.grad``
  after backward, one fused op per step.
- :class:`KFACFisher` (``"kfac"``): for ``nn.Linear``, ``F[i, j] = S[i] * H[j]`` with ``H`` the
  mean squared layer input and ``S`` the mean squared output gradient, from hooks, each a real
  (bias-corrected) EMA over steps; other parameters fall back to the empirical estimate.

Over calibration batches (for TR-PTS selection):

- :func:`per_sample_fisher` (``"per_sample"``): ``F = (1/N) sum_n g_n**2`` with per-sample
  gradients of Linear weights, computed tile by tile by ``ops.per_sample_grad_sq_``.
- :func:`estimate`: any of the three, returning per-module Fisher.
"""
from .base import (Estimator, available_estimators, estimator_class, make_estimator,
                   register_estimator)
from .empirical import EmpiricalFisher
from .kfac import KFACFisher
from .calibration import CALIBRATION_ESTIMATORS, estimate, per_sample_fisher

__all__ = ["Estimator", "register_estimator", "available_estimators", "estimator_class",
           "make_estimator", "EmpiricalFisher", "KFACFisher", "per_sample_fisher", "estimate", "CALIBRATION_ESTIMATORS"]
