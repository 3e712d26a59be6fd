"""The demo harness (python -m fisheradaptune.demo, not imported by the package): every method
runs end to end in a tiny configuration and reports, on the digits task (test_demo.py; skipped
where scikit-learn is missing) and on the MiniLM task with a tiny randomly initialised BERT
(test_minilm.py; skipped where transformers is missing), plus the VADER lexicon loader on the
real file and the real MiniLM weights where their packages are installed.

Nothing here is shared yet.
"""
