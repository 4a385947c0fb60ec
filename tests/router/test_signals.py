"""What agent clients already send becomes kvtier's agent hints in the router, and reaches vLLM workers where
kvtier's plug-in reads them (``kv_transfer_params.agent_hints``): explicit hints on every protocol, sessions from
headers, metadata, ``prompt_cache_key`` or prefix continuation, pins from ``cache_control`` breakpoints at their
token offsets; malformed signals are 400s naming the field. Real routers and recording HTTP workers, driven by the
official SDKs."""

from __future__ import annotations

import re
from collections.abc import Iterator

import anthropic
import pytest

from kvtier.router.prompt import PromptHasher
from kvtier.router.server import KvRouter, RouterConfig

from .conftest import BLOCK, Cluster, _serve, make_tokenizer, start_cluster, stop_cluster
from .test_front import TOOLS_ANTHROPIC, TOOLS_OPENAI, all_received, http, oai

SYSTEM = "You are a coding agent working in a repository of python files."
TASK = "fix the failing test in tests/test_parse.py"


@pytest.fixture
def exact(tmp_path) -> Iterator[Cluster]:
    """Two workers behind a router that tokenizes like them (a character-level tokenizer: offsets are checkable)."""
    c = start_cluster(2, tokenizer=make_tokenizer(tmp_path))
    yield c
    stop_cluster(c)


@pytest.fixture
def approx() -> Iterator[Cluster]:
    c = start_cluster(1)
    yield c
    stop_cluster(c)


def hints_of(body: dict) -> dict:
    return (body.get("kv_transfer_params") or {}).get("agent_hints") or {}


def sent(cluster: Cluster, call) -> dict:
    """Run one client call and return the body the worker got for it."""
    before = {id(w): len(w.received) for w in cluster.workers}
    call()
    (body,) = [b for w in cluster.workers for b in w.received[before[id(w)]:]]
    return body


def claude(cluster: Cluster, headers: dict | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=cluster.url, api_key="none", max_retries=0, default_headers=headers or {})


def metric_values(cluster: Cluster, name: str) -> dict[str, float]:
    out = {}
    for line in http(cluster.url + "/metrics").text.splitlines():
        m = re.match(rf'{name}\{{\w+="([^"]+)"\}} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def rendered(body: dict) -> str:
    """The worker's prompt text (the routers here render canonically: the tokenizer has no chat template)."""
    return PromptHasher(BLOCK)._render(body["messages"], body.get("tools"))


# --- explicit hints ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outer", ["nvext", "kv_transfer_params"])
def test_explicit_hints_reach_the_worker_in_kv_transfer_params_on_every_protocol(approx: Cluster, outer: str) -> None:
    hints = {"session_id": "s-1", "next_call_delay_s": 2.5, "priority": 80, "priority_duration_s": 60}
    extra = {outer: {"agent_hints": hints, **({"do_remote_decode": False} if outer == "kv_transfer_params" else {})}}
    client = oai(approx)
    calls = {
        "chat": lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": TASK}],
                                                       extra_body=extra),
        "completions": lambda: client.completions.create(model="m", prompt=TASK, extra_body=extra),
        "responses": lambda: client.responses.create(model="m", input=TASK, extra_body=extra),
        "messages": lambda: claude(approx).messages.create(model="m", max_tokens=8, extra_body=extra,
                                                           messages=[{"role": "user", "content": TASK}]),
    }
    for name, call in calls.items():
        body = sent(approx, call)
        assert hints_of(body) == hints, name
        assert body["priority"] == -30 and "nvext" not in body, name
        if outer == "kv_transfer_params":
            assert body["kv_transfer_params"]["do_remote_decode"] is False, name  # the client's own params stay


# --- sessions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["X-Dynamo-Session-ID", "x-claude-code-session-id", "x-claude-code-agent-id",
                                    "session-id", "x-session-id"])
def test_a_session_header_names_the_session(approx: Cluster, header: str) -> None:
    client = oai(approx)
    for task in ("one task", "another task"):   # different conversations, one session
        body = sent(approx, lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": task}], extra_headers={header: "agent-42"}))
        assert hints_of(body)["session_id"] == "agent-42"
    assert metric_values(approx, "kvtier_router_hint_source_total")["session_header"] == 2


def test_session_sources_in_order_explicit_header_metadata_prompt_cache_key_prefix(approx: Cluster) -> None:
    messages = [{"role": "user", "content": TASK}]
    c = claude(approx, {"x-claude-code-session-id": "from-header"})
    body = sent(approx, lambda: c.messages.create(model="m", max_tokens=8, messages=messages,
                                                  metadata={"user_id": "from-metadata"}))
    assert hints_of(body)["session_id"] == "from-header"
    body = sent(approx, lambda: c.messages.create(model="m", max_tokens=8, messages=messages,
                                                  extra_body={"nvext": {"agent_hints": {"session_id": "explicit"}}}))
    assert hints_of(body)["session_id"] == "explicit"
    body = sent(approx, lambda: claude(approx).messages.create(model="m", max_tokens=8, messages=messages,
                                                               metadata={"user_id": "from-metadata"}))
    assert hints_of(body)["session_id"] == "from-metadata"
    client = oai(approx)
    for call in (lambda: client.chat.completions.create(model="m", messages=messages, prompt_cache_key="pck"),
                 lambda: client.responses.create(model="m", input=TASK, prompt_cache_key="pck"),
                 lambda: client.completions.create(model="m", prompt=TASK, extra_body={"prompt_cache_key": "pck"})):
        assert hints_of(sent(approx, call))["session_id"] == "pck"
    assert hints_of(sent(approx, lambda: client.completions.create(model="m", prompt=TASK))) == {}
    sources = metric_values(approx, "kvtier_router_hint_source_total")
    assert sources == {"explicit": 1, "session_header": 1, "metadata": 1, "prompt_cache_key": 3, "prefix": 0,
                       "none": 1}


def test_a_conversation_continues_its_session_on_every_router_replica(approx: Cluster) -> None:
    """Without any session signal, a conversation's calls share a session, named from what every call re-sends:
    a second router in front of the same workers, which saw none of the earlier calls, names it the same."""
    replica = KvRouter([w.url for w in approx.workers], RouterConfig(block_size=BLOCK, health_interval_s=0.2))
    runner, port = approx.loop.run(_serve(replica.app()))
    try:
        urls = [approx.url, f"http://127.0.0.1:{port}"]
        history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
        sessions = []
        for turn in range(4):
            client = oai(Cluster(approx.loop, approx.router, approx.workers, urls[turn % 2], approx.runner))
            body = sent(approx, lambda: client.chat.completions.create(model="m", messages=history, tools=TOOLS_OPENAI))
            sessions.append(hints_of(body)["session_id"])
            assert hints_of(body)["prefetch"] is True   # a session offering tools calls again after its tool ran
            history = history + [{"role": "assistant", "content": f"step {turn}"},
                                 {"role": "user", "content": f"tool output {turn}"}]
        other = sent(approx, lambda: oai(approx).chat.completions.create(
            model="m", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "another task"}]))
    finally:
        approx.loop.run(runner.cleanup())
    assert len(set(sessions)) == 1 and hints_of(other)["session_id"] != sessions[0]


def test_sessions_are_scoped_by_the_tenant_salt(approx: Cluster) -> None:
    client = oai(approx)
    ids = [hints_of(sent(approx, lambda s=salt: client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": TASK}], prompt_cache_key="k", extra_body={"cache_salt": s})))
        ["session_id"] for salt in ("tenant-a", "tenant-b", "tenant-a")]
    assert ids[0] == ids[2] != ids[1] and "k" not in ids


def test_a_final_session_header_marks_the_session_final(approx: Cluster) -> None:
    body = sent(approx, lambda: oai(approx).chat.completions.create(
        model="m", messages=[{"role": "user", "content": TASK}],
        extra_headers={"X-Dynamo-Session-ID": "s", "X-Dynamo-Session-Final": "true"}))
    assert hints_of(body)["session_final"] is True


# --- cache_control breakpoints --------------------------------------------------------------------------------
def claude_code_request(ttl: str | None = None) -> dict:
    """What Claude Code sends: breakpoints on the system prompt, the tools and the latest block."""
    control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return {"model": "m", "max_tokens": 8,
            "system": [{"type": "text", "text": "You are Claude Code."},
                       {"type": "text", "text": SYSTEM, "cache_control": control}],
            "tools": [*TOOLS_ANTHROPIC, {"name": "grep", "description": "search the repository",
                                         "input_schema": {"type": "object"}, "cache_control": control}],
            "messages": [{"role": "user", "content": TASK},
                         {"role": "assistant", "content": [{"type": "text", "text": "Reading it."}]},
                         {"role": "user", "content": [{"type": "text", "text": "it fails with KeyError",
                                                       "cache_control": {"type": "ephemeral"}}]}],
            "metadata": {"user_id": "user_abc_account_def_session_0123"}}


def test_cache_control_breakpoints_pin_the_tokens_up_to_each_for_its_ttl(exact: Cluster) -> None:
    request = claude_code_request(ttl="1h")
    client = claude(exact, {"x-claude-code-session-id": "cc-1"})
    body = sent(exact, lambda: client.messages.create(**request))
    hints, text = hints_of(body), rendered(body)
    assert hints["session_id"] == "cc-1" and hints["prefetch"] is True
    ends = {pin["range"]["end"]: pin["lease_s"] for pin in hints["pins"]}
    assert all(pin["range"]["start"] == 0 for pin in hints["pins"])
    # the character tokenizer makes token offsets character offsets: each pin ends where its block's text ends
    system_end = text.index(SYSTEM) + len(SYSTEM)
    tool_end = text.index("search the repository") + len("search the repository")
    latest_end = text.index("it fails with KeyError") + len("it fails with KeyError")
    assert ends == {system_end: 3600.0, tool_end: 3600.0, latest_end: 300.0}
    assert hints["prefix_tokens"] == max(system_end, tool_end)
    assert "cache_control" not in str(body)  # consumed by the router, never forwarded
    assert metric_values(exact, "kvtier_router_derived_pins_total") == {"placed": 3, "unplaced": 0}


def test_a_top_level_cache_control_marks_the_last_block(exact: Cluster) -> None:
    request = {"model": "m", "max_tokens": 8, "system": SYSTEM, "messages": [{"role": "user", "content": TASK}]}
    body = sent(exact, lambda: claude(exact).messages.create(**request, extra_body={
        "cache_control": {"type": "ephemeral"}}))
    hints, text = hints_of(body), rendered(body)
    assert [p["range"]["end"] for p in hints["pins"]] == [text.index(TASK) + len(TASK)]
    assert hints["prefix_tokens"] == text.index(SYSTEM) + len(SYSTEM)


def test_openai_format_breakpoints_and_a_day_of_retention_pin_too(exact: Cluster) -> None:
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]},
                {"role": "user", "content": TASK}]
    body = sent(exact, lambda: oai(exact).chat.completions.create(model="m", messages=messages,
                                                                  prompt_cache_retention="24h"))
    text, pins = rendered(body), hints_of(body)["pins"]
    assert [(p["range"]["end"], p["lease_s"]) for p in pins] == [(text.index(SYSTEM) + len(SYSTEM), 300.0),
                                                                 (len(text), 86400.0)]


def test_without_a_tokenizer_breakpoints_are_counted_unplaced(approx: Cluster) -> None:
    body = sent(approx, lambda: claude(approx).messages.create(**claude_code_request()))
    assert "pins" not in hints_of(body) and "prefix_tokens" not in hints_of(body)
    assert metric_values(approx, "kvtier_router_derived_pins_total") == {"placed": 0, "unplaced": 3}


# --- bad signals ---------------------------------------------------------------------------------------------
BAD_MESSAGES = [
    ({"system": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "2h"}}]}, {},
     "body.system[0].cache_control.ttl"),
    ({"system": [{"type": "text", "text": "x", "cache_control": {"type": "persistent"}}]}, {},
     "body.system[0].cache_control.type"),
    ({"system": [{"type": "text", "text": "x", "cache_control": "yes"}]}, {}, "body.system[0].cache_control"),
    ({"system": [{"type": "text", "text": str(i), "cache_control": {"type": "ephemeral"}} for i in range(5)]}, {},
     "at most 4 cache_control"),
    ({"metadata": {"user_id": "u" * 300}}, {}, "body.metadata.user_id"),
    ({"metadata": {"user_id": 7}}, {}, "body.metadata.user_id"),
    ({"metadata": "me"}, {}, "body.metadata"),
    ({}, {"x-claude-code-session-id": "s" * 300}, "header x-claude-code-session-id"),
    ({}, {"X-Dynamo-Session-Final": "maybe"}, "header x-dynamo-session-final"),
    ({"nvext": {"agent_hints": {"priority": 101}}}, {}, "body.nvext.agent_hints"),
    ({"nvext": {"agent_hints": {"speculative_prefill": True}}}, {}, "speculative_prefill"),
    ({"nvext": {"agent_hints": {}}, "kv_transfer_params": {"agent_hints": {}}}, {}, "given twice"),
    ({"kv_transfer_params": []}, {}, "body.kv_transfer_params"),
]


@pytest.mark.parametrize("extra, headers, field", BAD_MESSAGES)
def test_a_malformed_signal_is_a_400_in_anthropics_shape_naming_it(approx: Cluster, extra: dict, headers: dict,
                                                                   field: str) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": TASK}], **extra}
    reply = http(approx.url + "/v1/messages", json_body=body, headers=headers)
    assert reply.status_code == 400 and reply.json()["type"] == "error"
    assert reply.json()["error"]["type"] == "invalid_request_error" and field in reply.json()["error"]["message"]
    assert all_received(approx) == []


@pytest.mark.parametrize("extra, field", [
    ({"prompt_cache_key": "k" * 300}, "body.prompt_cache_key"),
    ({"prompt_cache_key": ["k"]}, "body.prompt_cache_key"),
    ({"prompt_cache_retention": "forever"}, "body.prompt_cache_retention"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"ttl": "5m"}}]}]},
     "body.messages[0].content[0].cache_control.type"),
    ({"nvext": {"agent_hints": {"session_id": ""}}}, "session_id"),
])
def test_a_malformed_signal_is_a_400_in_openais_shape_naming_it(approx: Cluster, extra: dict, field: str) -> None:
    reply = http(approx.url + "/v1/chat/completions",
                 json_body={"model": "m", "messages": [{"role": "user", "content": TASK}], **extra})
    assert reply.status_code == 400 and field in reply.json()["error"]["message"]
    assert all_received(approx) == []


def test_with_derivation_off_only_explicit_hints_travel(tmp_path) -> None:
    c = start_cluster(1, tokenizer=make_tokenizer(tmp_path), config=RouterConfig(block_size=BLOCK, derive_hints=False,
                                                                                 health_interval_s=0.2))
    try:
        body = sent(c, lambda: claude(c, {"x-claude-code-session-id": "cc"}).messages.create(**claude_code_request()))
        assert "kv_transfer_params" not in body
        body = sent(c, lambda: oai(c).chat.completions.create(
            model="m", messages=[{"role": "user", "content": TASK}], prompt_cache_key="k",
            extra_body={"nvext": {"agent_hints": {"session_id": "mine"}}}))
        assert hints_of(body) == {"session_id": "mine"}
    finally:
        stop_cluster(c)


def test_a_session_stays_on_its_worker_unless_another_would_still_finish_it_sooner() -> None:
    """Stickiness is a credit, not a rule: a session's last call left its blocks on its worker, which the cost
    counts as held; a session moves only when that worker's queue outweighs recomputing the prompt elsewhere (a
    session pinned to a busy worker would leave the other one idle)."""
    two = start_cluster(2)
    try:
        router = two.router
        home, other = (w.url for w in two.workers)
        hashes = list(range(1000, 1040))           # 40 blocks the index knows nothing about
        router.sessions.put("s", home, len(hashes))

        def chosen() -> str:
            return two.loop.run(router._acquire(hashes, "s", 0.0, len(hashes), set())).worker.url

        assert chosen() == home
        router.workers[home].load.prefill_blocks = 20    # less than the 40 blocks' credit (x 0.75): stays
        assert chosen() == home
        router.workers[home].load.prefill_blocks = 200   # a long queue: recomputing elsewhere is sooner
        assert chosen() == other
    finally:
        stop_cluster(two)


def test_pins_count_against_the_tenant_of_the_api_key_which_a_client_cannot_claim(tmp_path) -> None:
    from kvtier.hints import TENANT_FIELD
    from kvtier.router.auth import Auth
    c = start_cluster(1, tokenizer=make_tokenizer(tmp_path), config=RouterConfig(
        block_size=BLOCK, health_interval_s=0.2, auth=Auth({"key-a": None, "key-b": "tenant-b"})))
    try:
        def tenant_of(key: str, extra: dict) -> str | None:
            claude_b = anthropic.Anthropic(base_url=c.url, api_key=key, max_retries=0)
            body = sent(c, lambda: claude_b.messages.create(**claude_code_request(), extra_body=extra))
            return (body.get("kv_transfer_params") or {}).get(TENANT_FIELD)

        forged = {"kv_transfer_params": {TENANT_FIELD: "tenant-a"}}
        b = tenant_of("key-b", {})
        assert b is not None and tenant_of("key-b", forged) == b and "tenant-b" not in b
        assert tenant_of("key-a", forged) is None       # no salt, no tenant: the deployment's own budget
    finally:
        stop_cluster(c)
