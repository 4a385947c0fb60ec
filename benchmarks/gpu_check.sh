#!/usr/bin/env bash
# The one prepared device call: build, check correctness on fresh random data, time everything.
#   device run:  bash benchmarks/gpu_check.sh      (carry .whl: msgspec, pyzmq, redis for Python 3.12)
# Stages in order of worth, each with its own time limit, each writing into $OUT as it goes, so a run cut short
# by the lease still brings back what it measured: the GPU tests (every kernel path on fresh random data
# against the torch reference, the engine's GPU round trip), the restore benchmark at 32K tokens with
# Llama-3-8B shapes, then the transfer benchmark in full with the dispatch table. Copy the tables into
# benchmarks/RESULTS.md with the device name.
set -uo pipefail
OUT=${OUT:-/tmp/kvtier-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
stage() { echo "== $(date +%T) $*" | tee -a "$OUT/stages.txt"; }
stage start
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total \
  --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, cupy; print('torch', torch.__version__, 'triton', triton.__version__, 'cupy',
cupy.__version__, 'cuda', torch.version.cuda, 'sms', torch.cuda.get_device_properties(0).multi_processor_count)" \
  | tee -a "$OUT/gpu.txt"
# ahead-of-time CUDA build for Hopper when nvcc is there; otherwise cupy's NVRTC compiles at first use
if command -v nvcc >/dev/null; then
  stage nvcc
  nvcc --fatbin -O3 -gencode=arch=compute_90,code=sm_90 -o kvtier/kernels/kvtier_copy.fatbin csrc/kvtier_copy.cu \
    2>&1 | tee "$OUT/nvcc.log"
fi
stage tests
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" --timeout 120 -rfE \
  tests/kernels/test_gpu.py tests/engine/test_gpu_round_trip.py tests/runner/test_model.py 2>&1 | tee "$OUT/tests.log"
stage restore
timeout 150 python3 -m kvtier.cli bench restore --lengths 8192 32768 --json "$OUT/restore.json" \
  --plot "$OUT/restore.png" 2>&1 | grep -v '^contexts:' | tee "$OUT/restore.log"
stage transfer
timeout 240 python3 -m kvtier.cli bench transfer --json "$OUT/transfer.json" --plot "$OUT/transfer.png" \
  --write-dispatch "$OUT/dispatch_table.json" 2>&1 | grep -v '^transfers:' | tee "$OUT/transfer.log"
stage done
