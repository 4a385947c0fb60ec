#!/usr/bin/env bash
# The one prepared device call: build, check correctness on fresh random data, time everything.
#   device run:  bash benchmarks/gpu_check.sh      (carry .whl if packages are missing there)
# Results land in $OUT (transfer.json/png, dispatch_table.json, restore.json, logs); copy the tables into
# benchmarks/RESULTS.md with the device name. Wheels for packages the GPU image lacks (xxhash, msgspec,
# pyyaml, prometheus-client, pyzmq, tqdm, hypothesis) go in .whl/ (see the device tool's README).
set -uo pipefail
OUT=${OUT:-/tmp/kvtier-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# ahead-of-time CUDA build when nvcc is there; otherwise cupy's NVRTC compiles at first use
if command -v nvcc >/dev/null; then
  nvcc --fatbin -O3 -gencode=arch=compute_90,code=sm_90 -o kvtier/kernels/kvtier_copy.fatbin csrc/kvtier_copy.cu || true
fi
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_gpu.py tests/kernels/test_transfer.py 2>&1 | tee "$OUT/tests.log"
timeout 300 python3 -m kvtier.cli bench transfer --json "$OUT/transfer.json" --plot "$OUT/transfer.png" \
  --write-dispatch "$OUT/dispatch_table.json" 2>&1 | grep -v '^transfers:' | tee "$OUT/transfer.log"
timeout 240 python3 -m kvtier.cli bench restore --json "$OUT/restore.json" --plot "$OUT/restore.png" 2>&1 \
  | tee "$OUT/restore.log"
