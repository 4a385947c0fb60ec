"""kvtier inside a real vLLM server (vLLM 0.32's CPU build, OpenAI server, official ``openai`` SDK), compared
with vLLM alone: the same greedy tokens as vLLM alone with the same prefix in its own cache, prefixes dropped from vLLM's own cache coming back from G2, G3 and G4
(G4 in a new server process), and agent hints deciding what survives a flood.

vLLM's own prefix cache (G1) is dropped with ``/reset_prefix_cache`` (kvtier keeps its tiers), so every hit
after a reset is kvtier's; which tier served it is read from the ``vllm:kvtier_loaded_tokens`` series kvtier
adds to the server's ``/metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kvtier.testing.agent_session import AgentSession
from kvtier.testing.redis_server import RedisServer, redis_available
from tests.serving.conftest import chat, kvtier_shm, metric, vllm_alone_tokens

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

BLOCK = 128            # vLLM's CPU backend: 128-token blocks
G2_BYTES = "2MiB"      # 16 chunks of one block (128 KiB each for the tiny model): 14 usable beside the spares


def wait_for(condition, what: str, timeout_s: float = 120.0) -> None:
    """Stats reach /metrics a step after the work; wait on the condition, not on time."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def loaded(server, tier: str) -> float:
    return metric(server, "vllm:kvtier_loaded_tokens", tier=tier)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def tiered(module_serve, redis, tmp_path_factory):
    """G2 of 14 usable chunks, then disk, then Redis, written through so every chunk also reaches Redis."""
    return module_serve("tiered", {
        "host_capacity_bytes": G2_BYTES, "policy": "lru", "blocks_per_chunk": 1,
        "disk_path": str(tmp_path_factory.mktemp("kvtier-disk")), "disk_capacity_bytes": "64MiB",
        "remote_url": redis.url, "write_through": True, "admission_min_hits": 1, "lower_tier_deadline_ms": 60000})


def test_agent_session_gives_vllm_alones_tokens_with_kvtier_serving_every_earlier_turn(plain, tiered):
    before = loaded(tiered, "G2")
    session = AgentSession(seed=1, turns=4)
    while not session.done():
        body = session.request()
        tiered.reset_prefix_cache()  # vLLM's own cache dropped: every hit is kvtier's
        answer = chat(tiered.url, body)
        assert answer.tokens == vllm_alone_tokens(plain, answer), f"call {session.calls}: kvtier changed the tokens"
        if session.calls > 0:  # everything but the new tool result comes from kvtier
            assert answer.cached >= BLOCK * 4, f"call {session.calls}: only {answer.cached} tokens from kvtier"
        session.advance()
    wait_for(lambda: loaded(tiered, "G2") > before, "G2 loads in /metrics")


def test_a_prefix_evicted_from_g2_comes_back_from_disk(plain, tiered):
    prompt = AgentSession(seed=2, turns=1).request()
    chat(tiered.url, prompt)
    tiered.reset_prefix_cache()
    answer = chat(tiered.url, prompt)
    assert answer.cached >= 4 * BLOCK and answer.tokens == vllm_alone_tokens(plain, answer)  # from G2

    for seed in range(100, 104):  # other sessions: 20+ chunks through a G2 of 14
        chat(tiered.url, AgentSession(seed=seed, turns=1).request())
    g3_before = loaded(tiered, "G3")
    tiered.reset_prefix_cache()
    answer = chat(tiered.url, prompt)
    assert answer.cached >= 4 * BLOCK
    assert answer.tokens == vllm_alone_tokens(plain, answer)
    wait_for(lambda: loaded(tiered, "G3") > g3_before, "a load promoted from G3")


def test_hits_survive_in_redis_for_a_new_server_process(plain, tiered, redis, serve):
    prompt = AgentSession(seed=3, turns=1).request()
    chat(tiered.url, prompt)  # written through to disk and Redis
    wait_for(lambda: metric(tiered, "vllm:kvtier_resident_chunks", tier="G4") >= 4, "chunks in Redis")

    fresh = serve("g4-only", {"host_capacity_bytes": G2_BYTES, "blocks_per_chunk": 1, "remote_url": redis.url,
                              "lower_tier_deadline_ms": 60000})
    answer = chat(fresh.url, prompt)
    assert answer.cached >= 4 * BLOCK
    assert answer.tokens == vllm_alone_tokens(plain, answer)
    wait_for(lambda: loaded(fresh, "G4") >= 4 * BLOCK, "a load promoted from G4")


def test_pinned_system_prompt_and_tools_survive_a_flood_that_evicts_unpinned_ones(plain, serve):
    # LRU, so the pin alone keeps the prefix (the agent policy may keep a session's prefix against a flood of
    # one-shot prompts on its own, which would hide whether the hint did anything)
    hinted = serve("hinted", {"host_capacity_bytes": "3MiB", "blocks_per_chunk": 1, "policy": "lru"})
    pinned = AgentSession(seed=10, system_seed=10, turns=2)
    unpinned = AgentSession(seed=11, system_seed=11, turns=2)
    prefix = len(tokenize(hinted, pinned.request()["messages"][:1], pinned.request()["tools"]))
    unpinned_prefix = len(tokenize(hinted, unpinned.request()["messages"][:1], unpinned.request()["tools"]))
    assert min(prefix, unpinned_prefix) >= 8 * BLOCK  # tool definitions (every session's) + its system prompt
    hints = {"session_id": pinned.session_id, "prefix_tokens": prefix,
             "pins": [{"target": "system_and_tools", "lease_s": 600}]}
    chat(hinted.url, pinned.request(), hints)
    chat(hinted.url, unpinned.request(), {"session_id": unpinned.session_id})
    for session in (pinned, unpinned):
        session.advance()

    for seed in range(200, 208):  # other sessions, each a new system prompt: far more than G2's 24 chunks
        chat(hinted.url, AgentSession(seed=seed, system_seed=seed, turns=1).request())
    hinted.reset_prefix_cache()

    answer = chat(hinted.url, pinned.request(), hints)
    assert answer.cached >= (prefix // BLOCK) * BLOCK, "the pinned system prompt and tools were evicted"
    assert answer.tokens == vllm_alone_tokens(plain, answer)
    # the tool definitions every session sends stay hot; the unpinned system prompt after them was evicted
    assert chat(hinted.url, unpinned.request()).cached < (unpinned_prefix // BLOCK) * BLOCK, \
        "the flood should have evicted the unpinned system prompt"


def tokenize(server, messages: list[dict], tools: list[dict]) -> list[int]:
    """A prompt prefix's tokens as the server renders them (vLLM's /tokenize), as an agent client counts."""
    return server.post("/tokenize", {"model": "tiny", "messages": messages, "tools": tools,
                                     "add_generation_prompt": False})["tokens"]


def test_servers_leave_no_shared_memory_behind(module_serve, tmp_path):
    before = kvtier_shm()
    server = module_serve("shm-check", {"host_capacity_bytes": G2_BYTES})
    chat(server.url, AgentSession(seed=4, turns=1).request())
    server.kill()  # SIGKILL: scheduler and worker had both mapped G2, so its name is already gone
    assert kvtier_shm() <= before
