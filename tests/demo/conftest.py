"""The demo harness (python -m fisheradaptune.demo, not imported by the package): every method
runs end to end in a tiny configuration and reports. Skipped where scikit-learn is missing.

Nothing here is shared yet.
"""
