"""What agent clients already send reaches kvtier's manager inside a real vLLM server (vLLM 0.32's CPU build)
behind ``kvtier router``, with no kvtier-specific field in any request:

- the official ``anthropic`` SDK sends Claude-Code-shaped requests (``cache_control`` breakpoints on the system
  prompt, the tools and the latest block; a ``x-claude-code-session-id`` header): the pinned system prompt and
  tools survive a flood that evicts an unpinned session's;
- the official ``openai`` SDK with ``prompt_cache_key`` lands several conversations in one session of kvtier's
  manager, and a conversation with no signal at all stays one session when its calls alternate between two
  router replicas;
- a malformed signal is a 400 naming the field.

What kvtier's manager saw is read from the series the plug-in adds to the server's ``/metrics``
(``vllm:kvtier_requests{hints}``, ``vllm:kvtier_sessions``, ``vllm:kvtier_pinned_chunks``).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import anthropic
import pytest
from openai import BadRequestError

from kvtier.testing.agent_session import TOOLS, AgentSession
from kvtier.testing.vllm_server import free_port, start_router
from tests.serving.conftest import client, metric
from tests.serving.test_vllm_cpu_serving import BLOCK, tokenize, wait_for

ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
CACHED = {"type": "ephemeral"}


@contextlib.contextmanager
def running_router(workers, model_dir, tmp_path_factory, name: str) -> Iterator[str]:
    proc, url = start_router(workers, model_dir, tmp_path_factory.mktemp(name) / "router.log", BLOCK)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def pinning(module_serve):
    # LRU, so the pins alone keep the prefix (the agent policy may keep a session's prefix against a flood of
    # one-shot prompts on its own, which would hide whether the breakpoints did anything)
    return module_serve("pinning", {"host_capacity_bytes": "3MiB", "blocks_per_chunk": 1, "policy": "lru"},
                        events_port=free_port())


@pytest.fixture(scope="module")
def pinning_router(pinning, model_dir, tmp_path_factory) -> Iterator[str]:
    with running_router([pinning], model_dir, tmp_path_factory, "pinning-router") as url:
        yield url


@pytest.fixture(scope="module")
def sessions_worker(module_serve):
    return module_serve("sessions", {"host_capacity_bytes": "8MiB", "blocks_per_chunk": 1},
                        events_port=free_port())


@pytest.fixture(scope="module")
def replicas(sessions_worker, model_dir, tmp_path_factory) -> Iterator[list[str]]:
    with running_router([sessions_worker], model_dir, tmp_path_factory, "replica-a") as a, \
            running_router([sessions_worker], model_dir, tmp_path_factory, "replica-b") as b:
        yield [a, b]


def claude_code_call(router: str, session: AgentSession, breakpoints: bool, header: str | None) -> anthropic.types.Message:
    """One call as Claude Code makes it: system blocks, tools, the conversation in Anthropic's shape."""
    system, *turns = session.messages
    messages = [{"role": "user", "content": [{"type": "text", "text": m["content"]}]} if m["role"] in ("user", "tool")
                else {"role": "assistant", "content": [{"type": "text", "text": m["reasoning_content"]}]}
                for m in turns]
    merged: list[dict] = []
    for m in messages:   # Anthropic alternates roles: consecutive user blocks form one message
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1]["content"] = merged[-1]["content"] + m["content"]
        else:
            merged.append({"role": m["role"], "content": list(m["content"])})
    tools = [dict(t) for t in ANTHROPIC_TOOLS]
    system_blocks = [{"type": "text", "text": system["content"]}]
    if breakpoints:
        system_blocks[-1]["cache_control"] = CACHED
        tools[-1]["cache_control"] = CACHED
        merged[-1]["content"][-1] = {**merged[-1]["content"][-1], "cache_control": CACHED}
    claude = anthropic.Anthropic(base_url=router, api_key="unused", max_retries=0, timeout=600,
                                 default_headers={"x-claude-code-session-id": header} if header else {})
    # the tiny model has no tool-call parser: its calls are scripted (``tool_choice`` none), as in AgentSession
    return claude.messages.create(model="tiny", max_tokens=8, system=system_blocks, tools=tools, messages=merged,
                                  tool_choice={"type": "none"}, extra_body={"temperature": 0})


def test_claude_code_breakpoints_keep_the_system_prompt_and_tools_through_a_flood(pinning, pinning_router):
    pinned = AgentSession(seed=20, system_seed=20, turns=2)
    unpinned = AgentSession(seed=21, system_seed=21, turns=2)
    prefix = len(tokenize(pinning, pinned.request()["messages"][:1], TOOLS))          # tools, then the system prompt
    unpinned_prefix = len(tokenize(pinning, unpinned.request()["messages"][:1], TOOLS))
    assert min(prefix, unpinned_prefix) >= 8 * BLOCK
    claude_code_call(pinning_router, pinned, breakpoints=True, header="cc-session-20")
    claude_code_call(pinning_router, unpinned, breakpoints=False, header="cc-session-21")
    for session in (pinned, unpinned):
        session.advance()
    for seed in range(220, 228):  # other sessions, each a new system prompt: far more than G2's 24 chunks
        client(pinning_router).chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                                       **AgentSession(seed=seed, system_seed=seed, turns=1).request())
    pinning.reset_prefix_cache()

    again = claude_code_call(pinning_router, pinned, breakpoints=True, header="cc-session-20")
    assert (again.usage.cache_read_input_tokens or 0) >= (prefix // BLOCK) * BLOCK, \
        "the system prompt and tools Claude Code marked were evicted"
    other = claude_code_call(pinning_router, unpinned, breakpoints=False, header="cc-session-21")
    assert (other.usage.cache_read_input_tokens or 0) < (unpinned_prefix // BLOCK) * BLOCK, \
        "the flood should have evicted the unpinned system prompt"
    wait_for(lambda: metric(pinning, "vllm:kvtier_pinned_chunks", outcome="pinned") >= prefix // BLOCK,
             "pins counted on the worker")


def sessions_seen(worker) -> tuple[float, float]:
    return metric(worker, "vllm:kvtier_requests", hints="session"), metric(worker, "vllm:kvtier_sessions")


def settled(worker, requests: float) -> tuple[float, float]:
    wait_for(lambda: sessions_seen(worker)[0] >= requests, f"{requests} requests with a session on the worker")
    return sessions_seen(worker)


def test_prompt_cache_key_lands_a_sessions_calls_in_one_session_of_kvtiers_manager(sessions_worker, replicas):
    requests, sessions = sessions_seen(sessions_worker)
    for seed in (30, 31, 32):   # three conversations of one agent session, told by prompt_cache_key alone
        client(replicas[0]).chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                                    prompt_cache_key="project-7", **AgentSession(seed=seed).request())
    assert settled(sessions_worker, requests + 3) == (requests + 3, sessions + 1)
    client(replicas[0]).chat.completions.create(model="tiny", max_tokens=4, temperature=0, prompt_cache_key="other",
                                                **AgentSession(seed=33).request())
    assert settled(sessions_worker, requests + 4) == (requests + 4, sessions + 2)


def test_a_conversation_is_one_session_whichever_router_replica_serves_it(sessions_worker, replicas):
    requests, sessions = sessions_seen(sessions_worker)
    session = AgentSession(seed=40, turns=4)
    for call in range(4):   # no session signal at all: prefix continuation, replicas alternating
        client(replicas[call % 2]).chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                                           **session.request())
        session.advance()
    assert settled(sessions_worker, requests + 4) == (requests + 4, sessions + 1)


def test_a_malformed_signal_is_a_400_naming_the_field(replicas):
    with pytest.raises(BadRequestError, match="prompt_cache_retention"):
        client(replicas[0]).chat.completions.create(model="tiny", max_tokens=4, prompt_cache_retention="forever",
                                                    **AgentSession(seed=50).request())
    claude = anthropic.Anthropic(base_url=replicas[1], api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="cache_control.ttl"):
        claude.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral", "ttl": "2h"}}]}])
