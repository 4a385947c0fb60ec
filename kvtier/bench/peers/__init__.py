"""Peers (NVIDIA Dynamo's router index, LMCache's storage backends) run beside kvtier in the same benchmark.

Each peer lives in a virtual environment of its own (its packages pin versions kvtier's environment must not
share), made on first use by ``ensure`` or ahead of time by ``python -m kvtier.bench.peers install``
(``scripts/setup_peers.sh``). A benchmark hands a peer its workload as a file, runs the peer's script (a module
of this package: stdlib plus the peer's own package) with that environment's Python, and reads one JSON
object back from stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

# peer -> pip installs, in order (LMCache: torch's CPU build first, so its torch requirement never pulls CUDA)
PEERS: dict[str, list[list[str]]] = {
    "dynamo": [["ai-dynamo-runtime==1.6.1"]],
    "lmcache": [["torch==2.13.0"], ["lmcache==0.5.6"]],
}
REPO = Path(__file__).resolve().parents[3]


def environment(name: str) -> Path:
    """Where peer ``name``'s environment lives: ``$KVTIER_PEERS_DIR`` or the repository root."""
    return Path(os.environ.get("KVTIER_PEERS_DIR", REPO)) / f".venv-peer-{name}"


def peer_python(name: str) -> Path | None:
    """The peer environment's interpreter, or None while it is not (completely) installed."""
    env = environment(name)
    return env / "bin" / "python" if (env / ".complete").is_file() else None


def missing_reason(name: str) -> str | None:
    if peer_python(name) is None:
        wanted = ", then ".join(" ".join(group) for group in PEERS[name])
        return f"peer {name} is not installed ({wanted}): python -m kvtier.bench.peers install {name}"
    return None


def install(name: str) -> Path:
    """Make peer ``name``'s environment (a fresh one if a previous install did not complete)."""
    env = environment(name)
    if peer_python(name) is None:
        print(f"installing peer {name} into {env} (minutes, once)", file=sys.stderr)
        venv.EnvBuilder(clear=True, with_pip=True).create(env)
        for group in PEERS[name]:
            subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", *group], check=True)
        (env / ".complete").touch()
    return env / "bin" / "python"


def ensure(name: str) -> str | None:
    """Install peer ``name`` if needed; None when it is ready, else why it is not (the benchmark goes on)."""
    try:
        install(name)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"peer {name} could not be installed: {exc}"
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


def main(argv: list[str]) -> int:
    """``python -m kvtier.bench.peers [install] [NAME ...]``: install peers, or say which are installed."""
    names = [a for a in argv if a != "install"] or list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        print(f"unknown peer(s) {unknown}; peers: {', '.join(PEERS)}", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        reason = ensure(name) if "install" in argv else missing_reason(name)
        print(f"{name}: {reason or peer_python(name)}")
        failed += reason is not None
    return 1 if failed else 0

