"""Peers (NVIDIA Dynamo's router index, LMCache's storage backends) run beside kvtier in the same benchmark.

Each peer lives in a virtual environment of its own, made by ``scripts/setup_peers.sh`` (its packages pin
versions kvtier's environment must not share). A benchmark hands a peer its workload as a file, runs the
peer's script (a module of this package, stdlib plus the peer's own package) with that environment's
Python, and reads one JSON object back from stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PEERS = {
    "dynamo": "ai-dynamo-runtime==1.6.1 (NVIDIA Dynamo's KV router index, dynamo._core.RadixTree)",
    "lmcache": "lmcache==0.5.6 (LocalCPUBackend, LocalDiskBackend) on torch's CPU build",
}
REPO = Path(__file__).resolve().parents[3]


def peer_python(name: str) -> Path | None:
    """The peer environment's interpreter, or None when ``scripts/setup_peers.sh`` has not made it.
    ``KVTIER_PEERS_DIR`` moves the environments (default: the repository root)."""
    base = Path(os.environ.get("KVTIER_PEERS_DIR", REPO))
    python = base / f".venv-peer-{name}" / "bin" / "python"
    return python if python.is_file() else None


def missing_reason(name: str) -> str | None:
    if peer_python(name) is None:
        return f"peer {name} not installed ({PEERS[name]}): bash scripts/setup_peers.sh {name}"
    return None


def run_peer(name: str, script: str, workload: Path, timeout_s: float = 3600) -> dict[str, Any]:
    """Run ``kvtier/bench/peers/<script>.py WORKLOAD`` in peer ``name``'s environment; its JSON answer.
    RuntimeError with the peer's last stderr lines when it fails."""
    python = peer_python(name)
    if python is None:
        raise RuntimeError(missing_reason(name))
    path = Path(__file__).with_name(f"{script}.py")
    done = subprocess.run([str(python), str(path), str(workload)], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"peer {name} ({script}) failed with exit code {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # python -m kvtier.bench.peers: which peers are installed
    for peer in PEERS:
        print(f"{peer}: {peer_python(peer) or missing_reason(peer)}", file=sys.stdout)
