"""GroupLayout and its builders (fisheradaptune.groups): per_tensor, slabs (fused qkv split),
per_module, build, the layout's validation and its per-device segment cache.

Nothing here is shared yet: the one file uses the plain helpers ``group_index`` and
``shape_lists`` (shared with the op tests) from tests/helpers.py.
"""
