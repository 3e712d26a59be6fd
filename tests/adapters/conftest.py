"""Feature-space adapters (fisheradaptune.adapters): VeFA and LoRFA formulation, identity at
init, placement (the head rule, Fisher top-k), trainability, merge / unmerge, save / load,
errors, summary and configs. (Adapters under FisherAdapTune's progressive freezing:
adaptune/test_fisher_adaptune.py.)

Nothing here is shared yet: the one file builds its own small models.
"""
