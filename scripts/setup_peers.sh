#!/usr/bin/env bash
# The peers kvtier's benchmarks run beside it, each in a virtual environment of its own (their pins must not
# reach kvtier's): .venv-peer-dynamo (NVIDIA Dynamo's KV router index) and .venv-peer-lmcache (LMCache on torch's
# CPU build). Reused when present. `bash scripts/setup_peers.sh [dynamo] [lmcache]` (default: both);
# KVTIER_PEERS_DIR puts them elsewhere (kvtier.bench.peers looks there too).
set -euo pipefail
cd "$(dirname "$0")/.."
base="${KVTIER_PEERS_DIR:-$PWD}"
peers=("$@"); [ ${#peers[@]} -eq 0 ] && peers=(dynamo lmcache)

make_env() {  # name, then pip arguments, one install per argument group separated by ';'
  local env="$base/.venv-peer-$1"; shift
  if [ -x "$env/bin/python" ] && [ -f "$env/.complete" ]; then return; fi
  rm -rf "$env"
  python3 -m venv "$env"
  "$env/bin/python" -m pip install -q --upgrade pip
  local group=()
  for arg in "$@" ";"; do
    if [ "$arg" = ";" ]; then "$env/bin/python" -m pip install -q "${group[@]}"; group=(); else group+=("$arg"); fi
  done
  touch "$env/.complete"
}

for peer in "${peers[@]}"; do
  case "$peer" in
    dynamo) make_env dynamo ai-dynamo-runtime==1.6.1 ;;
    # torch's CPU build first, so LMCache's torch requirement is met without a CUDA build
    lmcache) make_env lmcache torch==2.13.0 ";" lmcache==0.5.6 ;;
    *) echo "setup_peers.sh: unknown peer '$peer' (dynamo, lmcache)" >&2; exit 2 ;;
  esac
done
