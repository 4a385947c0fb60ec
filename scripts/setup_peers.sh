#!/usr/bin/env bash
# The peers kvtier's benchmarks run beside it, each in a virtual environment of its own (their pins must not
# reach kvtier's): .venv-peer-dynamo (NVIDIA Dynamo's KV router index) and .venv-peer-lmcache (LMCache on torch's
# CPU build). Reused when complete. `bash scripts/setup_peers.sh [dynamo] [lmcache]` (default: both);
# KVTIER_PEERS_DIR puts them elsewhere. The benchmarks make a missing one themselves; this makes them ahead.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m kvtier.bench.peers install "$@"
