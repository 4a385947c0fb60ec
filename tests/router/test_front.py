"""The router's HTTP front driven by the official openai and anthropic SDKs against real HTTP workers."""

from __future__ import annotations

import json
import time

import urllib.error
import urllib.request

import anthropic
import openai
import pytest

from kvtier.router.auth import Auth
from kvtier.router.choice import CostWeights
from kvtier.router.server import RouterConfig

from .conftest import TOOL_ARGS, Cluster, make_tokenizer, router_process, start_cluster, stop_cluster

TOOLS_OPENAI = [{"type": "function", "function": {"name": "read_file", "description": "read a file",
                                                  "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]
TOOLS_ANTHROPIC = [{"name": "read_file", "description": "read a file",
                    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]


class Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code = status
        self.text = body.decode("utf-8", "replace")

    def json(self) -> dict:
        return json.loads(self.text)


def http(url: str, content: bytes | None = None, json_body: dict | None = None, timeout: float = 10,
         headers: dict | None = None, method: str | None = None) -> Reply:
    """A plain HTTP call (stdlib): GET without a body, POST with one; error statuses are returned, not raised."""
    data = json.dumps(json_body).encode() if json_body is not None else content
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Reply(resp.status, resp.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read())


def oai(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0)


def claude(cluster: Cluster) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=cluster.url, api_key="none", max_retries=0)


def all_received(cluster: Cluster) -> list[dict]:
    return [body for w in cluster.workers for body in w.received]


# --- OpenAI chat and completions ------------------------------------------------------------------------
def test_chat_completions_plain_and_streaming_with_tools(cluster: Cluster) -> None:
    client = oai(cluster)
    messages = [{"role": "user", "content": "open the main file"}]
    resp = client.chat.completions.create(model="m", messages=messages, tools=TOOLS_OPENAI)
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "read_file" and call.function.arguments == TOOL_ARGS
    assert resp.choices[0].finish_reason == "tool_calls"
    stream = client.chat.completions.create(model="m", messages=messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "print(1)"}], tools=TOOLS_OPENAI, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.endswith("says: print(1)")


def test_completions_plain_and_streaming(cluster: Cluster) -> None:
    client = oai(cluster)
    assert client.completions.create(model="m", prompt="def f():").choices[0].text.endswith("continues.")
    parts = [c.choices[0].text for c in client.completions.create(model="m", prompt=[1, 2, 3, 4, 5], stream=True)]
    assert "".join(parts).endswith("continues.")


def test_agent_hints_are_forwarded_and_sessions_stick(cluster: Cluster) -> None:
    client = oai(cluster)
    hints = {"session_id": "agent-7", "priority": 70, "osl": 100}
    for i in range(6):  # unrelated prompts: without the session they would spread
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"task {i} " * 20}],
                                       extra_body={"nvext": {"agent_hints": hints}})
    served = [len(w.received) for w in cluster.workers]
    assert sorted(served) == [0, 6]
    body = all_received(cluster)[0]
    assert body["kv_transfer_params"]["agent_hints"] == hints and "nvext" not in body  # where vLLM reads them
    assert body["priority"] == -20   # vLLM's scheduling priority: lower first; hint 50 is vLLM's 0
    worker = next(w for w in cluster.workers if w.received)
    assert not any(h.lower().startswith("x-kvtier") for h in worker.headers[0])


def test_shared_prefixes_follow_the_cache_in_approximate_mode(cluster: Cluster) -> None:
    client = oai(cluster)
    contexts = [f"{name}: repository " + "source line\n" * 60 for name in "abcdefgh"]  # differ in block 0
    chosen: dict[int, set[str]] = {i: set() for i in range(len(contexts))}
    for turn in range(3):
        for i, context in enumerate(contexts):
            before = [len(w.received) for w in cluster.workers]
            client.chat.completions.create(model="m", messages=[{"role": "system", "content": context},
                                                                {"role": "user", "content": f"turn {turn}"}])
            after = [len(w.received) for w in cluster.workers]
            chosen[i].add(next(w.name for w, b, a in zip(cluster.workers, before, after) if a > b))
    assert all(len(workers) == 1 for workers in chosen.values())  # each context always on one worker
    assert len(set().union(*chosen.values())) == 2  # and the contexts spread over both workers
    metrics = http(cluster.url + "/metrics").text
    cached = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("kvtier_router_cached_blocks_total"))
    assert cached > 0


# --- Anthropic Messages -----------------------------------------------------------------------------------
def test_messages_tool_use_thinking_and_exact_replay(cluster: Cluster) -> None:
    client = claude(cluster)
    first = client.messages.create(model="m", max_tokens=64, tools=TOOLS_ANTHROPIC, system="be brief",
                                   thinking={"type": "enabled", "budget_tokens": 32},
                                   messages=[{"role": "user", "content": "open the main file"}])
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    assert first.stop_reason == "tool_use" and first.content[1].input == {"path": "main.py"}
    assert first.content[0].signature
    history = [{"role": "user", "content": "open the main file"},
               {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[1].id, "content": "print(1)"}]}]
    second = client.messages.create(model="m", max_tokens=64, tools=TOOLS_ANTHROPIC, system="be brief", messages=history)
    assert [b.type for b in second.content] == ["thinking", "text"] and second.stop_reason == "end_turn"
    bodies = all_received(cluster)
    sent_first, sent_second = bodies[0]["messages"], bodies[1]["messages"]
    assert sent_second[: len(sent_first)] == sent_first  # the prefix the worker cached is re-sent unchanged
    assistant = sent_second[len(sent_first)]
    assert assistant["reasoning_content"] == first.content[0].thinking
    assert assistant["tool_calls"][0]["function"]["arguments"] == TOOL_ARGS  # the model's own string
    worker_id = assistant["tool_calls"][0]["id"]  # the id's short head: call and result render alike
    assert first.content[1].id.startswith(worker_id)
    assert sent_second[-1] == {"role": "tool", "tool_call_id": worker_id, "content": "print(1)"}
    assert bodies[0]["chat_template_kwargs"] == {"enable_thinking": True}


def test_messages_interleaved_thinking_keeps_block_order(cluster: Cluster) -> None:
    client = claude(cluster)
    blocks = [{"type": "thinking", "thinking": "first I read", "signature": "s"},
              {"type": "tool_use", "id": "t1", "name": "read_file", "input": {"path": "a"}},
              {"type": "thinking", "thinking": "then I check", "signature": "s"},
              {"type": "text", "text": "checking"},
              {"type": "tool_use", "id": "t2", "name": "read_file", "input": {"path": "b"}}]
    client.messages.create(model="m", max_tokens=8, messages=[
        {"role": "user", "content": "go"}, {"role": "assistant", "content": blocks},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "A"},
                                     {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "B"}]},
                                     {"type": "text", "text": "next?"}]}])
    sent = all_received(cluster)[0]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "assistant", "tool", "tool", "user"]
    assert sent[1]["reasoning_content"] == "first I read" and sent[1]["tool_calls"][0]["id"] == "t1"
    assert sent[2]["reasoning_content"] == "then I check" and sent[2]["content"] == "checking"
    assert sent[2]["tool_calls"][0]["function"]["arguments"] == '{"path": "b"}'
    assert sent[4]["content"] == "B" and sent[5]["content"] == [{"type": "text", "text": "next?"}]


def test_messages_streaming_matches_non_streaming(cluster: Cluster) -> None:
    client = claude(cluster)
    kwargs = dict(model="m", max_tokens=64, tools=TOOLS_ANTHROPIC, messages=[{"role": "user", "content": "open it"}])
    with client.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    plain = client.messages.create(**kwargs)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in final.content] == [b.type for b in plain.content] == ["thinking", "tool_use"]
    assert final.content[0].thinking == plain.content[0].thinking
    assert final.content[1].input == plain.content[1].input == {"path": "main.py"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 7
    with client.messages.stream(model="m", max_tokens=16, messages=[{"role": "user", "content": "hello"}]) as stream:
        assert stream.get_final_text().endswith("says: hello")


def test_messages_bad_requests_are_4xx_in_anthropic_format(cluster: Cluster) -> None:
    client = claude(cluster)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match="role"):
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "robot", "content": "x"}])
    assert all_received(cluster) == []


# --- OpenAI Responses -------------------------------------------------------------------------------------
def test_responses_plain_and_streaming_with_function_calls(cluster: Cluster) -> None:
    client = oai(cluster)
    tools = [{"type": "function", "name": "read_file", "parameters": {"type": "object", "properties": {}}}]
    resp = client.responses.create(model="m", input="open the main file", tools=tools, instructions="be brief")
    assert [item.type for item in resp.output] == ["reasoning", "function_call"]
    call = resp.output[1]
    assert call.arguments == TOOL_ARGS and resp.status == "completed"
    follow_up = [{"role": "user", "content": "open the main file"}, resp.output[0].model_dump(exclude_none=True),
                 call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": "print(1)"}]
    events = list(client.responses.create(model="m", input=follow_up, tools=tools, instructions="be brief", stream=True))
    names = [e.type for e in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert "response.output_text.delta" in names and "response.reasoning_text.delta" in names
    done = events[-1].response
    assert [item.type for item in done.output] == ["reasoning", "message"]
    assert done.output[1].content[0].text.endswith("says: print(1)")
    first, second = (b["messages"] for b in all_received(cluster))
    assert second[: len(first)] == first
    assert second[len(first)]["tool_calls"][0]["function"]["arguments"] == TOOL_ARGS
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="m", input="x", previous_response_id="resp_1")


# --- robustness -------------------------------------------------------------------------------------------
def test_malformed_requests_get_clear_4xx(cluster: Cluster) -> None:
    cases = [("/v1/chat/completions", b"{not json", "not valid JSON"),
             ("/v1/chat/completions", b"[1, 2]", "JSON object"),
             ("/v1/chat/completions", b'{"model": "m", "messages": "hi"}', "messages"),
             ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": 1}', "stream"),
             ("/v1/completions", b'{"model": "m", "prompt": [true]}', "prompt"),
             ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "nvext": {"agent_hints": []}}', "agent_hints"),
             ("/v1/responses", b'{"model": "m", "input": 5}', "input")]
    for path, body, needle in cases:
        resp = http(cluster.url + path, content=body)
        assert resp.status_code == 400, (path, body, resp.text)
        assert needle in resp.json()["error"]["message"]
    worker_refusal = http(cluster.url + "/v1/chat/completions",
                                json_body={"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1})
    assert worker_refusal.status_code == 400 and "max_tokens" in worker_refusal.json()["error"]["message"]


def test_dead_worker_requests_are_rerouted_and_it_comes_back(cluster: Cluster) -> None:
    client = oai(cluster)
    messages = [{"role": "user", "content": "the shared context " * 30}]
    first = client.chat.completions.create(model="m", messages=messages).choices[0].message.content
    # the worker that holds the context is the one that dies, so the router must pick it and then reroute
    victim, survivor = sorted(cluster.workers, key=lambda w: not first.startswith(w.name))
    port = victim.port
    cluster.stop_worker(victim)
    for i in range(4):
        resp = client.chat.completions.create(model="m", messages=messages + [{"role": "user", "content": f"q{i}"}])
        assert resp.choices[0].message.content.startswith(survivor.name)
    health = http(cluster.url + "/health").json()
    assert [w["alive"] for w in health["workers"]] == [w is survivor for w in cluster.workers]
    assert "kvtier_router_reroutes_total 1.0" in http(cluster.url + "/metrics").text
    cluster.stop_worker(survivor)
    resp = http(cluster.url + "/v1/chat/completions", json_body={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 503 and "no live worker" in resp.json()["error"]["message"]
    # the first worker restarts on its old port and the health loop takes it back
    from aiohttp import web

    async def restart() -> None:
        runner = web.AppRunner(victim.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        victim.runner = runner

    cluster.loop.run(restart())
    deadline = time.monotonic() + 5
    victim_index = cluster.workers.index(victim)
    while time.monotonic() < deadline and not http(cluster.url + "/health").json()["workers"][victim_index]["alive"]:
        time.sleep(0.1)
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "back?"}]).choices[0].message.content


def test_saturated_workers_queue_then_refuse() -> None:
    config = RouterConfig(block_size=4, max_inflight_per_worker=1, max_waiting=1, health_interval_s=0.2)
    c = start_cluster(1, config=config, delay_s=0.6)
    try:
        import concurrent.futures

        body = {"model": "m", "messages": [{"role": "user", "content": "slow"}]}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = []
            for _ in range(3):
                futures.append(pool.submit(http, c.url + "/v1/chat/completions", json_body=body, timeout=10))
                time.sleep(0.15)
            codes = sorted(f.result().status_code for f in futures)
        assert codes == [200, 200, 429]  # one running, one waiting, one refused
    finally:
        stop_cluster(c)


def test_events_route_to_the_worker_whose_engine_cached_the_prompt(tmp_path) -> None:
    tokenizer = make_tokenizer(tmp_path)
    c = start_cluster(3, tokenizer=tokenizer, with_events=True,
                      config=RouterConfig(block_size=4, health_interval_s=0.2, weights=CostWeights(decode_weight=0.0)))
    try:
        assert http(c.url + "/health").json()["exact_hashing"] is True
        time.sleep(0.3)  # subscribers connect
        client = oai(c)
        context = [{"role": "system", "content": "a long shared agent context " * 8}]
        # prime: the chosen engine caches the prompt and announces it
        client.chat.completions.create(model="m", messages=context + [{"role": "user", "content": "one"}])
        owner = next(w for w in c.workers if w.received)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(c.router.indexer) == 0:
            time.sleep(0.05)
        assert len(c.router.indexer) > 0
        for turn in ("two", "three", "four"):
            client.chat.completions.create(model="m", messages=context + [{"role": "user", "content": turn}])
        assert len(owner.received) == 4 and sum(len(w.received) for w in c.workers) == 4
    finally:
        stop_cluster(c)


def test_cli_serves_and_rejects_bad_arguments(cluster: Cluster) -> None:
    from kvtier.cli import main

    with pytest.raises(SystemExit) as exited:  # argparse's one-line error
        main(["router", "--port", "1", "--worker", "http://127.0.0.1:1", "--events", "a", "--events", "b"])
    assert exited.value.code == 2
    assert main(["router", "--port", "1", "--worker", "http://127.0.0.1:1", "--events", "-", "--events", "-"]) == 2
    worker = cluster.workers[0].url
    with router_process(worker, ["--events", "-"]) as url:
        health = http(url + "/health")
        assert health.status_code == 200 and health.json()["workers"][0]["url"] == worker
        reply = http(url + "/v1/chat/completions", json_body={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].endswith("says: hi")


def test_workers_join_and_leave_at_runtime() -> None:
    c = start_cluster(2, config=RouterConfig(block_size=4, health_interval_s=0.2, auth=Auth(admin_key="root")))
    try:
        first, second = c.workers
        admin = {"Authorization": "Bearer root"}
        assert http(c.url + "/admin/workers", json_body={"url": "ftp://x"}, headers=admin).status_code == 400
        assert http(c.url + "/admin/workers", json_body={"url": first.url}, headers=admin).status_code == 400  # there
        assert http(c.url + "/admin/workers", json_body={"url": first.url}, headers=admin, method="DELETE").status_code == 200
        client = oai(c)
        for i in range(3):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"after leave {i}"}])
        assert len(first.received) == 0 and len(second.received) == 3
        assert http(c.url + "/admin/workers", json_body={"url": first.url}, headers=admin).json() == {"added": first.url}
        assert [w["url"] for w in http(c.url + "/health").json()["workers"]] == [second.url, first.url]
    finally:
        stop_cluster(c)
