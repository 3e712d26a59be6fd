"""Bridges to other libraries' training APIs. Nothing here is imported by ``import
fisheradaptune``, and no module here imports the library it bridges to: import the one you
need, e.g. ``from fisheradaptune.integrations.peft import shira_mask_fn``.

- :mod:`fisheradaptune.integrations.peft`: Fisher-selected masks for peft's SHiRA adapters.
"""
