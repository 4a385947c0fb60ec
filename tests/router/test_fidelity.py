"""Protocol fidelity: worker failures reach clients as their protocol's errors, tool calls replay exactly without
router state, and request fields the worker needs are not dropped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from .conftest import TOOL_ARGS, Cluster, free_port, make_tokenizer, router_process, start_cluster, stop_cluster
from .test_front import TOOLS_ANTHROPIC, claude, oai

USER = [{"role": "user", "content": "hello there"}]
TOOLS_RESPONSES = [{"type": "function", "name": "read_file", "parameters": {"type": "object", "properties": {}}}]


@pytest.fixture
def single() -> Iterator[Cluster]:
    """One worker: the bodies it received are in the order they were sent."""
    c = start_cluster(1)
    yield c
    stop_cluster(c)


def broken(cluster: Cluster, fault: str) -> Cluster:
    for worker in cluster.workers:
        worker.fault = fault
    return cluster


# --- worker failures -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["error_event", "error_object", "garbage", "truncated", "text_stream"])
def test_anthropic_stream_failures_are_error_events(cluster: Cluster, fault: str) -> None:
    with pytest.raises(anthropic.APIStatusError) as err:
        with claude(broken(cluster, fault)).messages.stream(model="m", max_tokens=8, messages=USER) as stream:
            list(stream)
    body = err.value.body
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert {"error_event": "engine died", "error_object": "engine died", "garbage": "not an event", "truncated": "before the answer finished",
            "text_stream": "not an event stream"}[fault] in body["error"]["message"]


@pytest.mark.parametrize("fault", ["error_event", "garbage", "truncated"])
def test_responses_stream_failures_are_response_failed(cluster: Cluster, fault: str) -> None:
    events = list(oai(broken(cluster, fault)).responses.create(model="m", input="hi", stream=True))
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message


@pytest.mark.parametrize("fault, needle", [("text_stream", "not an event stream"), ("garbage", "not an event"),
                                           ("truncated", r"before data: \[DONE\]"), ("error_event", "engine died")])
def test_chat_stream_failures_are_openai_errors(cluster: Cluster, fault: str, needle: str) -> None:
    with pytest.raises(openai.APIError, match=needle):
        list(oai(broken(cluster, fault)).chat.completions.create(model="m", messages=USER, stream=True))


def test_a_bad_body_is_a_502(cluster: Cluster) -> None:
    broken(cluster, "bad_body")
    for call in (lambda: oai(cluster).chat.completions.create(model="m", messages=USER),
                 lambda: oai(cluster).responses.create(model="m", input="hi")):
        with pytest.raises(openai.InternalServerError) as err:
            call()
        assert err.value.status_code == 502
    with pytest.raises(anthropic.InternalServerError) as err:
        claude(cluster).messages.create(model="m", max_tokens=8, messages=USER)
    assert err.value.status_code == 502 and err.value.body["error"]["type"] == "api_error"


@pytest.mark.parametrize("status, error, kind", [
    (400, anthropic.BadRequestError, "invalid_request_error"), (404, anthropic.NotFoundError, "not_found_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"), (500, anthropic.InternalServerError, "api_error"),
    (503, anthropic.InternalServerError, "overloaded_error"), (529, anthropic.InternalServerError, "overloaded_error")])
def test_worker_error_statuses_map_to_anthropic_error_types(cluster: Cluster, status: int, error: type, kind: str) -> None:
    with pytest.raises(error) as err:
        claude(broken(cluster, f"status:{status}")).messages.create(model="m", max_tokens=8, messages=USER)
    assert err.value.status_code == status and err.value.body["error"]["type"] == kind
    assert f"worker says {status}" in err.value.body["error"]["message"]


# --- exact tool-call replay without router state ---------------------------------------------------------------
def test_tool_arguments_replay_exactly_across_a_router_restart(cluster: Cluster) -> None:
    worker = cluster.workers[0]
    port = free_port()
    asks = {"open the main file": "tool_use", "cut short": "max_tokens"}  # "cut": arguments truncated by max_tokens
    with router_process(worker.url, port=port) as url:
        client = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
        firsts = {ask: client.messages.create(model="m", max_tokens=64, tools=TOOLS_ANTHROPIC,
                                              messages=[{"role": "user", "content": ask}]) for ask in asks}
        with client.messages.stream(model="m", max_tokens=64, tools=TOOLS_ANTHROPIC,
                                    messages=[{"role": "user", "content": "open the main file"}]) as stream:
            streamed = stream.get_final_message()
    assert {ask: m.stop_reason for ask, m in firsts.items()} == asks
    assert firsts["cut short"].content[-1].input == {}  # what a client gets for partial JSON
    received = len(worker.received)
    with router_process(worker.url, port=port) as url:  # a fresh router: no memory of those calls
        client = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
        for ask, first in [*firsts.items(), ("open the main file", streamed)]:
            call = first.content[-1]
            client.messages.create(model="m", max_tokens=64, tools=TOOLS_ANTHROPIC, messages=[
                {"role": "user", "content": ask},
                {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "ok"}]}])
    replayed = [body["messages"][-2]["tool_calls"][0]["function"]["arguments"] for body in worker.received[received:]]
    assert replayed == [TOOL_ARGS, TOOL_ARGS[:9], TOOL_ARGS]  # the model's strings, odd spacing and cut included


def test_edited_or_foreign_tool_ids_replay_the_input_as_json(single: Cluster) -> None:
    first = claude(single).messages.create(model="m", max_tokens=64, tools=TOOLS_ANTHROPIC,
                                            messages=[{"role": "user", "content": "open it"}])
    call = first.content[-1]
    for tool_id, value in [(call.id, {"path": "other.py"}), ("toolu_01abc", {"path": "main.py"}), (call.id[:-3], call.input)]:
        claude(single).messages.create(model="m", max_tokens=8, messages=[
            {"role": "user", "content": "open it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "read_file", "input": value}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "ok"}]}])
    sent = [b["messages"][1]["tool_calls"][0]["function"]["arguments"] for b in single.workers[0].received[1:]]
    assert sent == ['{"path": "other.py"}', '{"path": "main.py"}', '{"path": "main.py"}']


# --- request fields reach the worker ---------------------------------------------------------------------------
def test_anthropic_thinking_and_tool_errors_reach_the_worker(single: Cluster) -> None:
    client = claude(single)
    client.messages.create(model="m", max_tokens=4096, messages=USER, thinking={"type": "enabled", "budget_tokens": 2048})
    client.messages.create(model="m", max_tokens=64, messages=USER)
    client.messages.create(model="m", max_tokens=64, messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read_file", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "no such file", "is_error": True}]}])
    with_thinking, without, tool_error = single.workers[0].received
    assert with_thinking["chat_template_kwargs"] == {"enable_thinking": True} and with_thinking["reasoning_effort"] == "low"
    assert without["chat_template_kwargs"] == {"enable_thinking": False} and "reasoning_effort" not in without
    assert tool_error["messages"][-1] == {"role": "tool", "tool_call_id": "t1", "content": "Error: no such file"}
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        client.messages.create(model="m", max_tokens=64, messages=USER, thinking={"type": "enabled", "budget_tokens": 64})


def test_responses_reasoning_effort_and_echoed_tools(single: Cluster) -> None:
    client = oai(single)
    plain = client.responses.create(model="m", input="open it", tools=TOOLS_RESPONSES, tool_choice="required",
                                    reasoning={"effort": "high"})
    events = list(client.responses.create(model="m", input="open it", tools=TOOLS_RESPONSES, stream=True))
    assert single.workers[0].received[0]["reasoning_effort"] == "high"
    assert plain.tool_choice == "required" and [t.name for t in plain.tools] == ["read_file"]
    done = events[-1].response
    assert done.tool_choice == "auto" and [t.name for t in done.tools] == ["read_file"]
    assert events[0].response.tools[0].name == "read_file"
    with pytest.raises(openai.BadRequestError, match="effort"):
        client.responses.create(model="m", input="x", reasoning={"effort": "extreme"})


def test_message_start_reports_the_prompts_input_tokens(tmp_path: Path) -> None:
    c = start_cluster(1, tokenizer=make_tokenizer(tmp_path))
    try:
        with claude(c).messages.stream(model="m", max_tokens=8, messages=USER) as stream:
            start = next(e for e in stream if e.type == "message_start")
        assert start.message.usage.input_tokens == 40  # the worker's count (vLLM continuous usage stats)
        c.workers[0].continuous_usage = False
        with claude(c).messages.stream(model="m", max_tokens=8, messages=USER) as stream:
            start = next(e for e in stream if e.type == "message_start")
        tokens = len(c.router.hasher.chat_tokens(c.workers[0].received[-1]["messages"]))
        assert start.message.usage.input_tokens == tokens > 0  # the router's own count with a tokenizer
    finally:
        stop_cluster(c)
