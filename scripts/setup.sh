#!/usr/bin/env bash
# Set up wmss_trl in ./.venv (idempotent): the CPU build of torch FIRST (pinned, so pip never pulls a
# multi-GB CUDA build), then the package with its pinned TRL stack and the test/demo extras.
# DeepSpeed has no wheel: pip builds its sdist; DS_BUILD_OPS=0 keeps that a pure-Python build (its CPU
# ops are JIT-compiled at first use, once, into ~/.cache/torch_extensions).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import wmss_trl, trl, deepspeed, pytest, matplotlib" 2>/dev/null || [ ! -x .venv/bin/ruff ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
  DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[test,demo]"
fi
echo "setup: $(( $(date +%s) - start ))s ($(.venv/bin/python -c 'import torch, trl; print("torch", torch.__version__, "trl", trl.__version__)'))"
