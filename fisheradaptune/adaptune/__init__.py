"""FisherAdapTune: progressive freezing of parameter groups whose Fisher has settled.

- :class:`FisherAdapTune` (``optimizer``): the optimizer wrapper, orchestrating the pieces below;
- :class:`DriftTracker` (``tracker``): per-group drift statistics;
- :class:`Policy`, :class:`Threshold`, :class:`PaperPolicy`, :class:`Observe`, :class:`Context`
  (``policies``): freeze decisions;
- ``freezing``: what a freeze does to tensors, gradients (zeroed at the source by hooks) and
  optimizer state;
- ``support``: which optimizers are accepted (the verified allow-list and the refusals);
- ``state``: checkpoint payloads; ``report``: metrics, summary, plot.
"""
from .tracker import DriftTracker
from .policies import Context, Observe, PaperPolicy, Policy, Threshold
from .optimizer import DRIFT_MODES, FisherAdapTune

__all__ = ["FisherAdapTune", "DriftTracker", "Context", "Policy", "Threshold", "PaperPolicy",
           "Observe", "DRIFT_MODES"]
