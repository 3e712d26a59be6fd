"""Fisher estimators (fisheradaptune.fisher): per_sample_fisher, estimate() with every
registered estimator, EmpiricalFisher and KFACFisher, checked against torch.func per-sample
gradients and hand-computed factors. (The per-sample op itself: ops/test_per_sample_grad_sq.py;
custom estimators plugged into FisherAdapTune: adaptune/test_policies.py.)

Nothing here is shared yet: the one file builds its own small model and batches.
"""
