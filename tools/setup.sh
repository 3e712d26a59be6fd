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
# --no-build-isolation: compile against the torch above instead of a fresh one in a build env.
pipi --no-build-isolation -e .
