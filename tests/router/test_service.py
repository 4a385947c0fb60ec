"""The router as a service people expose: keys, tenants, bounded memory and input, honest worker failures."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from kvtier.router.auth import Auth
from kvtier.router.server import RouterConfig

from .conftest import Cluster, router_process, start_cluster, stop_cluster
from .test_front import all_received, claude, http, oai

KEYS = {"key-a": None, "key-b": "tenant-b"}
USER = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "m", "messages": USER}
ENDPOINT_BODIES = {"/v1/chat/completions": CHAT, "/v1/completions": {"model": "m", "prompt": "hi"},
                   "/v1/responses": {"model": "m", "input": "hi"}, "/v1/messages": {**CHAT, "max_tokens": 8}}


def config(**kwargs) -> RouterConfig:
    return RouterConfig(block_size=4, health_interval_s=0.2, **kwargs)


@pytest.fixture
def secured() -> Iterator[Cluster]:
    c = start_cluster(2, config=config(auth=Auth(dict(KEYS), admin_key="root")))
    yield c
    stop_cluster(c)


def metric(cluster: Cluster, name: str) -> float:
    for line in http(cluster.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# --- 1. authentication --------------------------------------------------------------------------------------
def test_keys_guard_every_client_endpoint_in_each_protocols_shape(secured: Cluster) -> None:
    bad_oai = openai.OpenAI(base_url=secured.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_oai.chat.completions.create(model="m", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        bad_oai.models.list()
    bad_claude = anthropic.Anthropic(base_url=secured.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad_claude.messages.create(model="m", max_tokens=8, messages=USER)
    assert err.value.body["error"]["type"] == "authentication_error"
    for path, body in ENDPOINT_BODIES.items():
        reply = http(secured.url + path, json_body=body)  # no key at all
        assert reply.status_code == 401, path
        assert "API key" in (reply.json()["error"]["message"])
    assert all_received(secured) == []
    good = openai.OpenAI(base_url=secured.url + "/v1", api_key="key-a", max_retries=0)
    assert good.chat.completions.create(model="m", messages=USER).choices[0].message.content
    assert good.models.list().data[0].id == "m"
    good_claude = anthropic.Anthropic(base_url=secured.url, api_key="key-a", max_retries=0)  # sends x-api-key
    assert good_claude.messages.create(model="m", max_tokens=8, messages=USER).content
    assert http(secured.url + "/health").status_code == 200 and http(secured.url + "/metrics").status_code == 200


def test_admin_api_needs_the_admin_key_and_is_off_without_one(secured: Cluster, cluster: Cluster) -> None:
    url = secured.workers[0].url
    assert http(secured.url + "/admin/workers", json_body={"url": url}, method="DELETE").status_code == 401
    client_key = {"Authorization": "Bearer key-a"}
    assert http(secured.url + "/admin/workers", json_body={"url": url}, headers=client_key, method="DELETE").status_code == 401
    assert len(secured.router.workers) == 2
    admin = {"Authorization": "Bearer root"}
    assert http(secured.url + "/admin/workers", json_body={"url": url}, headers=admin, method="DELETE").status_code == 200
    assert len(secured.router.workers) == 1
    off = http(cluster.url + "/admin/workers", json_body={"url": "http://127.0.0.1:9"}, headers=admin)
    assert off.status_code == 404 and "admin" in off.json()["error"]["message"]


def test_cli_reads_keys_from_file_and_environment(tmp_path: Path, cluster: Cluster) -> None:
    """The key file and the variables together; --api-key flags would replace KVTIER_ROUTER_API_KEY, as a flag
    replaces any configured list (see kvtier.command_options)."""
    key_file = tmp_path / "keys"
    key_file.write_text("# tenants\nfile-key tenant-f\nplain-key\n")
    env = {**os.environ, "KVTIER_ROUTER_API_KEY": "env-key:tenant-e env-plain", "KVTIER_ROUTER_ADMIN_KEY": "env-root"}
    with router_process(cluster.workers[0].url, ["--api-key-file", str(key_file)], env) as url:
        ask = lambda key: http(url + "/v1/chat/completions", json_body=CHAT, headers={"x-api-key": key}).status_code
        keys = ("file-key", "plain-key", "env-key", "env-plain", "nope")
        assert [ask(k) for k in keys] == [200, 200, 200, 200, 401]
        salts = [body.get("cache_salt") for body in cluster.workers[0].received]
        assert salts == ["tenant-f", None, "tenant-e", None]
        admin = http(url + "/admin/workers", json_body={"url": "http://127.0.0.1:9"}, headers={"Authorization": "Bearer env-root"})
        assert admin.status_code == 200


def test_worker_cookies_do_not_travel_between_clients(cluster: Cluster) -> None:
    worker = cluster.workers[0]
    with router_process(worker.url.replace("127.0.0.1", "localhost")) as url:  # a host name: cookies are kept
        for _ in range(2):
            assert http(url + "/v1/chat/completions", json_body=CHAT).status_code == 200
    assert len(worker.received) == 2 and not any("Cookie" in h for h in worker.headers)


def test_cli_refuses_malformed_key_files(tmp_path: Path) -> None:
    from kvtier.cli import main

    key_file = tmp_path / "keys"
    key_file.write_text("one two three\n")
    assert main(["router", "--port", "1", "--worker", "http://127.0.0.1:1", "--api-key-file", str(key_file)]) == 2
    assert main(["router", "--port", "1", "--worker", "http://127.0.0.1:1", "--api-key-file", str(tmp_path / "none")]) == 2


# --- 2. tenant salt -------------------------------------------------------------------------------------------
def test_cache_salt_on_every_protocol_seeds_keys_and_reaches_the_worker(cluster: Cluster) -> None:
    long = [{"role": "user", "content": "a shared context " * 20}]
    claude(cluster).messages.create(model="m", max_tokens=8, messages=long, extra_body={"cache_salt": "t1"})
    oai(cluster).responses.create(model="m", input=long, extra_body={"cache_salt": "t2"})
    oai(cluster).chat.completions.create(model="m", messages=long, extra_body={"cache_salt": "t3"})
    assert sorted(b.get("cache_salt") for b in all_received(cluster)) == ["t1", "t2", "t3"]
    per_request = metric(cluster, "kvtier_router_approx_blocks") / 3
    assert per_request > 0  # three salts: three sets of keys for one prompt
    claude(cluster).messages.create(model="m", max_tokens=8, messages=long, extra_body={"cache_salt": "t1"})
    assert metric(cluster, "kvtier_router_approx_blocks") == 3 * per_request  # same salt: same keys


def test_a_key_bound_to_a_tenant_cannot_claim_another_salt_or_session(secured: Cluster) -> None:
    tenant_b = anthropic.Anthropic(base_url=secured.url, api_key="key-b", max_retries=0)
    tenant_b.messages.create(model="m", max_tokens=8, messages=USER)
    assert all_received(secured)[0]["cache_salt"] == "tenant-b"
    with pytest.raises(anthropic.PermissionDeniedError):
        tenant_b.messages.create(model="m", max_tokens=8, messages=USER, extra_body={"cache_salt": "tenant-a"})
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=secured.url + "/v1", api_key="key-b", max_retries=0).responses.create(
            model="m", input="x", extra_body={"cache_salt": ""})
    tenant_b.messages.create(model="m", max_tokens=8, messages=USER, extra_body={"cache_salt": "tenant-b"})
    hints = {"nvext": {"agent_hints": {"session_id": "shared-name"}}}
    openai.OpenAI(base_url=secured.url + "/v1", api_key="key-a", max_retries=0).chat.completions.create(
        model="m", messages=USER, extra_body=hints)
    tenant_b.messages.create(model="m", max_tokens=8, messages=USER, extra_body=hints)
    named = {body["kv_transfer_params"]["agent_hints"]["session_id"] for body in all_received(secured)}
    named = {s for s in named if not s.startswith("p")}   # not the sessions of prefix continuation
    assert len(named) == 2  # one name, two tenants (key-a has no salt, key-b's salt scopes it): two sessions


# --- 3, 4, 6. bounded input and memory ------------------------------------------------------------------------
def test_body_limit_gives_a_json_413() -> None:
    c = start_cluster(1, config=config(max_body_bytes=4096))
    try:
        big = {**CHAT, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 8000}]}
        reply = http(c.url + "/v1/messages", json_body=big)
        assert reply.status_code == 413 and reply.json()["error"]["type"] == "request_too_large"
        assert http(c.url + "/v1/chat/completions", json_body=big).json()["error"]["code"] == 413
        assert http(c.url + "/v1/chat/completions", json_body=CHAT).status_code == 200
    finally:
        stop_cluster(c)


@pytest.mark.parametrize("depth", [990, 100_000])
def test_deeply_nested_json_is_a_400_on_every_endpoint(depth: int) -> None:
    c = start_cluster(1, config=config(auth=Auth(admin_key="root")))
    try:
        nested = b"[" * depth + b"]" * depth
        for path in [*ENDPOINT_BODIES, "/admin/workers"]:
            raw = b'{"model": "m", "messages": ' + nested + b', "input": ' + nested + b"}"
            reply = http(c.url + path, content=raw, headers={"Authorization": "Bearer root"})
            assert reply.status_code == 400, (path, reply.text[:200])
            assert "nests deeper" in reply.json()["error"]["message"]
        assert all_received(c) == []
    finally:
        stop_cluster(c)


@pytest.mark.parametrize("hints, needle", [
    ({"session_id": "s" * 300}, "session_id"),
    ({"pins": [{"target": "system_and_tools"}] * 65}, "pins"),
    ({"ephemeral": [{"start": 0, "end": 1}] * 65}, "ephemeral"),
    ({"priority": 10**7}, "priority"),
    ({"priority": -1}, "priority"),
    ({"osl": "x" * 5000}, "osl"),
    ({"pins": [{"range": {"start": 10**15 + i, "end": 10**15 + i + 1}, "lease_s": 1.25} for i in range(64)]},
     "4096 bytes"),
])
def test_hints_are_bounded_before_anything_is_stored_or_forwarded(cluster: Cluster, hints: dict, needle: str) -> None:
    reply = http(cluster.url + "/v1/chat/completions", json_body={**CHAT, "nvext": {"agent_hints": hints}})
    assert reply.status_code == 400 and needle in reply.json()["error"]["message"]
    assert http(cluster.url + "/v1/chat/completions", content=b'{"model": "m", "messages": [], "x": NaN}').status_code == 400
    assert all_received(cluster) == [] and metric(cluster, "kvtier_router_sessions") == 0


def test_nothing_is_remembered_until_the_worker_accepts(cluster: Cluster) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "long context " * 20}],
            "nvext": {"agent_hints": {"session_id": "s1"}}}
    refused = http(cluster.url + "/v1/chat/completions", json_body={**body, "max_tokens": -1})
    assert refused.status_code == 400 and len(all_received(cluster)) == 1  # the worker saw it and said no
    assert metric(cluster, "kvtier_router_sessions") == 0 and metric(cluster, "kvtier_router_approx_blocks") == 0
    assert http(cluster.url + "/v1/chat/completions", json_body=body).status_code == 200
    assert metric(cluster, "kvtier_router_sessions") == 1 and metric(cluster, "kvtier_router_approx_blocks") > 0


def test_session_table_and_approximate_index_are_capped() -> None:
    c = start_cluster(1, config=config(max_sessions=2, max_approx_blocks=5))
    try:
        for i in range(4):
            body = {**CHAT, "messages": [{"role": "user", "content": f"context {i} " * 30}],
                    "nvext": {"agent_hints": {"session_id": f"s{i}"}}}
            assert http(c.url + "/v1/chat/completions", json_body=body).status_code == 200
        assert metric(c, "kvtier_router_sessions") == 2
        assert metric(c, "kvtier_router_approx_blocks") == 5
    finally:
        stop_cluster(c)


# --- 5. upstream connections ----------------------------------------------------------------------------------
def test_upstream_connections_follow_max_inflight() -> None:
    """aiohttp's default pool (100 connections) would hold requests inside the router below --max-inflight."""
    n = 120
    c = start_cluster(1, config=config(max_inflight_per_worker=n))
    worker = c.workers[0]
    worker.hold_until = n

    async def burst() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one(i: int) -> int:
                async with session.post(c.url + "/v1/chat/completions", json={**CHAT, "messages": [
                        {"role": "user", "content": f"q{i}"}]}) as resp:
                    await resp.read()
                    return resp.status
            return await asyncio.gather(*(one(i) for i in range(n)))

    try:
        assert c.loop.run(burst(), timeout=60) == [200] * n
        assert worker.peak == n
    finally:
        stop_cluster(c)
