"""Fuzzed requests on every endpoint: the router answers each with a 4xx or a valid response, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.router.auth import Auth
from kvtier.router.server import RouterConfig

from .conftest import BLOCK, Cluster, start_cluster, stop_cluster
from .test_front import http

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"]

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)
roles = st.sampled_from(["user", "assistant", "system", "tool", "developer", "robot"])
block_types = st.sampled_from(["text", "thinking", "tool_use", "tool_result", "image", "input_text", "output_text",
                               "function_call", "function_call_output", "reasoning", "message", "weird"])
blocks = st.fixed_dictionaries({"type": block_types}, optional={
    "text": scalars, "thinking": scalars, "id": scalars, "name": scalars, "input": json_values, "tool_use_id": scalars,
    "content": json_values, "call_id": scalars, "arguments": scalars, "output": json_values, "role": roles,
    "source": json_values, "signature": scalars})
messages = st.lists(st.fixed_dictionaries({"role": roles}, optional={"content": st.text(max_size=20) | st.lists(blocks, max_size=3) | scalars,
                                                                     "tool_calls": json_values}), max_size=4)
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(min_size=1, max_size=20)}),
                         min_size=1, max_size=3)
def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid four times in five, so bodies get past the first check and reach translation and the workers."""
    return st.integers(0, 4).flatmap(lambda roll: invalid if roll == 0 else valid)


plausible = st.fixed_dictionaries({
    "model": mostly(st.just("m"), scalars), "stream": mostly(st.booleans(), scalars),
    "max_tokens": mostly(st.integers(1, 20), scalars), "messages": mostly(good_messages, messages | json_values),
    "input": mostly(good_messages, st.text(max_size=10) | st.lists(blocks, max_size=3) | messages),
    "prompt": mostly(st.text(min_size=1, max_size=10), st.lists(st.integers(-1, 2**33), max_size=5) | json_values)}, optional={
    "max_output_tokens": st.integers(-2, 20) | scalars, "system": st.text(max_size=10) | st.lists(blocks, max_size=2),
    "tools": st.lists(json_values, max_size=2) | json_values, "tool_choice": json_values, "thinking": json_values,
    "nvext": mostly(st.fixed_dictionaries({}, optional={"agent_hints": st.fixed_dictionaries(
        {}, optional={"session_id": mostly(st.text(max_size=4), scalars), "priority": mostly(st.integers(-3, 3), scalars)})}),
        json_values),
    "stop_sequences": json_values, "temperature": scalars, "instructions": scalars, "cache_salt": mostly(st.text(max_size=3), scalars)})


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[Cluster]:
    c = start_cluster(2, config=RouterConfig(block_size=BLOCK, health_interval_s=0.2, auth=Auth(admin_key="root")))
    yield c
    stop_cluster(c)


@pytest.fixture(scope="module")
def keyed_cluster() -> Iterator[Cluster]:
    c = start_cluster(1, config=RouterConfig(block_size=BLOCK, auth=Auth({"k1": None, "k2": "salt-2"}, admin_key="root")))
    yield c
    stop_cluster(c)


def _check(cluster: Cluster, path: str, body: bytes | None, headers: dict | None = None, method: str | None = None) -> None:
    reply = http(cluster.url + path, content=body, headers=headers, method=method)
    assert reply.status_code < 500, (path, body, reply.status_code, reply.text)
    if reply.status_code >= 400:
        error = reply.json()
        message = error["error"]["message"]
        assert isinstance(message, str) and message
        return
    assert reply.status_code == 200
    if path == "/metrics":
        assert "kvtier_router_sessions" in reply.text
    elif reply.text.startswith(("data:", "event:")):
        assert "data:" in reply.text
        for line in reply.text.replace("\r\n", "\n").split("\n"):  # SSE lines end in LF/CRLF, not U+0085
            if line.startswith("data:") and line != "data: [DONE]":
                json.loads(line[5:])
    else:
        assert isinstance(reply.json(), dict)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ENDPOINTS), body=plausible)
def test_structured_bodies(shared_cluster: Cluster, path: str, body: dict) -> None:
    _check(shared_cluster, path, json.dumps(body).encode())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ENDPOINTS), body=json_values | st.binary(max_size=30).map(lambda b: b.decode("latin-1")))
def test_arbitrary_bodies(shared_cluster: Cluster, path: str, body) -> None:
    raw = body.encode("latin-1", "replace") if isinstance(body, str) else json.dumps(body).encode()
    _check(shared_cluster, path, raw)


nested = st.integers(1, 5000).map(lambda n: "[" * n + "]" * n)
hint_values = st.fixed_dictionaries({}, optional={
    "session_id": st.text(max_size=300), "priority": st.integers(-10**8, 10**8) | scalars,
    "pins": st.lists(json_values, max_size=70), "ephemeral": st.lists(json_values, max_size=70),
    "osl": st.text(max_size=6000)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ENDPOINTS), depth=nested, hints=hint_values)
def test_deep_bodies_and_large_hints(shared_cluster: Cluster, path: str, depth: str, hints: dict) -> None:
    body = json.dumps({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "input": "x",
                       "prompt": "x", "nvext": {"agent_hints": hints}})
    _check(shared_cluster, path, body.encode())
    _check(shared_cluster, path, body[:-1].encode() + b', "extra": ' + depth.encode() + b"}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["POST", "DELETE"]), body=json_values | st.fixed_dictionaries(
    {"url": st.text(max_size=6) | scalars}, optional={"events": scalars}), key=st.sampled_from([None, "root", "wrong"]))
def test_admin_endpoints(shared_cluster: Cluster, method: str, body, key: str | None) -> None:
    """URLs stay shorter than any valid worker URL, so no fuzzed worker joins."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    _check(shared_cluster, "/admin/workers", json.dumps(body).encode(), headers, method)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/models", "/health", "/metrics", "/nowhere"]))
def test_get_endpoints(shared_cluster: Cluster, path: str) -> None:
    _check(shared_cluster, path, None)


printable = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ENDPOINTS), header=st.sampled_from(["Authorization", "x-api-key"]),
       value=st.sampled_from(["Bearer k1", "k1", "k2", "Bearer k2"]) | printable | printable.map("Bearer ".__add__),
       salt=st.none() | st.sampled_from(["salt-2", "other", ""]))
def test_keys_and_salts(keyed_cluster: Cluster, path: str, header: str, value: str, salt: str | None) -> None:
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "input": "x", "prompt": "x"}
    if salt is not None:
        body["cache_salt"] = salt
    _check(keyed_cluster, path, json.dumps(body).encode(), {header: value})


faults = st.sampled_from(["error_event", "error_object", "garbage", "truncated", "text_stream", "bad_body", "status:404",
                          "status:429", "status:503"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/messages"]), fault=faults, stream=st.booleans())
def test_broken_workers(shared_cluster: Cluster, path: str, fault: str, stream: bool) -> None:
    """A broken worker gives the worker's status or a 502, as JSON, or a stream ending in an error; never a
    crash of the router (a 500 it did not pass on)."""
    for worker in shared_cluster.workers:
        worker.fault = fault
    try:
        body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "input": "x", "stream": stream}
        reply = http(shared_cluster.url + path, content=json.dumps(body).encode())
    finally:
        for worker in shared_cluster.workers:
            worker.fault = None
    expected = int(fault.split(":")[1]) if fault.startswith("status:") else 502
    if reply.status_code == 200:
        events = [line for line in reply.text.splitlines() if line.startswith("data:") and line != "data: [DONE]"]
        assert stream and '"error"' in events[-1], reply.text
    else:
        assert reply.status_code == expected and reply.json()["error"]["message"], (reply.status_code, reply.text)
