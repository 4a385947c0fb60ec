"""``kvtier router`` in front of two real vLLM servers with kvtier (vLLM 0.32's CPU build), fed by their KV
events (vLLM's own and kvtier's CPU events, one stream per server): a session's next call lands on the worker
that holds its prefix, through the official ``openai`` SDK; ``anthropic`` ``messages.create`` works through
the same router.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator

import anthropic
import pytest

from kvtier.testing.agent_session import AgentSession
from kvtier.testing.vllm_server import free_port, start_router
from tests.serving.conftest import chat

BLOCK = 128


@pytest.fixture(scope="module")
def workers(module_serve):
    return [module_serve(f"worker{i}", {"host_capacity_bytes": "8MiB", "blocks_per_chunk": 1},
                         events_port=free_port()) for i in range(2)]


@pytest.fixture(scope="module")
def router(workers, model_dir, tmp_path_factory) -> Iterator[str]:
    proc, url = start_router(workers, model_dir, tmp_path_factory.mktemp("router") / "router.log", BLOCK)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def routed(router_url: str) -> dict[str, float]:
    """Requests the router sent to each worker so far (its /metrics)."""
    with urllib.request.urlopen(router_url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^kvtier_router_routed_total\{worker="([^"]+)"\} (\S+)$', text, re.M)}


def served_by(router_url: str, send) -> tuple[str, object]:
    """Send one request through the router and return the worker it went to, and the answer."""
    before = routed(router_url)
    answer = send()
    after = routed(router_url)
    (worker,) = [w for w in after if after[w] > before.get(w, 0.0)]
    return worker, answer


def test_each_sessions_next_call_lands_on_the_worker_holding_its_prefix(router, workers):
    """Each session's first call goes straight to a worker, past the router: the router learns where each
    prefix is only from the workers' KV events, and must send every session's next calls there."""
    sessions = [AgentSession(seed=300 + i, system_seed=300 + i, turns=3) for i in range(4)]
    homes = {}
    for i, s in enumerate(sessions):
        homes[s.seed] = workers[i % 2].url
        chat(homes[s.seed], s.request())
        s.advance()
    for s in sessions:
        deadline = time.monotonic() + 60  # events arrive asynchronously: retry until the router has seen them
        while True:
            worker, answer = served_by(router, lambda s=s: chat(router, s.request()))
            if worker == homes[s.seed] or time.monotonic() > deadline:
                break
        assert worker == homes[s.seed], f"session {s.seed} left the worker holding its prefix"
        assert answer.cached >= 4 * BLOCK  # the prefix was there: the worker reused it
        s.advance()


def test_anthropic_messages_through_the_router(router):
    session = AgentSession(seed=400, turns=1)
    system, user = session.messages[0]["content"], session.messages[1]["content"]
    client = anthropic.Anthropic(base_url=router, api_key="unused", max_retries=0, timeout=600)
    # this SDK's create() has no temperature argument; the API's default is 1.0, so greedy rides in the body
    first = client.messages.create(model="tiny", max_tokens=8, system=system, extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": user}])
    assert first.content and first.content[0].type == "text" and first.usage.output_tokens > 0
    again = client.messages.create(model="tiny", max_tokens=8, system=system, extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": user}])
    assert again.content[0].text == first.content[0].text  # greedy, same prompt, same worker's cached prefix
    assert (again.usage.cache_read_input_tokens or 0) >= 4 * BLOCK
