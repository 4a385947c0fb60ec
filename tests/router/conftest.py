"""Real HTTP workers (small OpenAI-compatible aiohttp servers) and a real router, on loopback ports, run on
one background event loop so the tests can drive them with the official synchronous SDKs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kvtier.events import EventPublisher
from kvtier.router.prompt import PromptHasher
from kvtier.router.server import EventSource, KvRouter, RouterConfig
from kvtier.testing.vllm_server import free_port, wait_healthy

BLOCK = 4
TOOL_ARGS = '{"path":  "main.py"}'  # odd spacing: the router must send back exactly this string


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@dataclass
class FakeWorker:
    """Enough of vLLM's OpenAI server: chat and text completions, streaming or not, reasoning and tool calls.
    With a publisher it also behaves like an engine with prefix caching: every prompt's full blocks are
    announced as BlockStored events, named by sha256 bytes as vLLM names them."""

    name: str
    hasher: PromptHasher | None = None
    publisher: EventPublisher | None = None
    delay_s: float = 0.0
    fault: str | None = None          # misbehave like a broken worker: see _faulty
    continuous_usage: bool = True     # honour stream_options.continuous_usage_stats as vLLM does
    hold_until: int = 0               # >0: hold every request until this many are in flight at once
    active: int = 0
    peak: int = 0
    _all_in: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._validating(self.chat))
        app.router.add_post("/v1/completions", self._validating(self.completions))
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        return app

    @staticmethod
    def _validating(handler):
        """Like vLLM's pydantic request models: a body of the wrong shape is a 400, not a crash."""
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
                return web.json_response({"error": {"message": f"invalid request: {exc!r}", "code": 400}}, status=400)
        return handle

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def _body(self, request: web.Request) -> dict:
        body = json.loads(await request.read())
        self.received.append(body)
        self.headers.append(dict(request.headers))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hold_until:
            await self._hold()
        return body

    async def _hold(self) -> None:
        """Wait until ``hold_until`` requests are in flight together (or 10 s pass): measures concurrency."""
        self.active += 1
        self.peak = max(self.peak, self.active)
        if self.active >= self.hold_until:
            self._all_in.set()
        try:
            await asyncio.wait_for(self._all_in.wait(), 10)
        except asyncio.TimeoutError:
            pass
        self.active -= 1

    @staticmethod
    def _invalid(body: dict) -> str | None:
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0):
            return "max_tokens must be a positive integer"
        if not isinstance(body.get("model", ""), str):
            return "model must be a string"
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        problem = self._invalid(body)
        messages = body.get("messages")
        if problem or not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return web.json_response({"error": {"message": problem or "bad messages", "code": 400}}, status=400)
        if self.fault:
            return await self._faulty(request, bool(body.get("stream")))
        self._publish(messages, body.get("tools"))
        last = messages[-1]
        wants_tool = bool(body.get("tools")) and last.get("role") == "user"
        cut = wants_tool and "cut" in str(last.get("content"))  # the output runs out of tokens mid-arguments
        reasoning = f"{self.name} considers the request."
        text = None if wants_tool else f"{self.name} says: {str(last.get('content'))[:40]}"
        arguments = TOOL_ARGS[:9] if cut else TOOL_ARGS
        call = {"id": f"call_{len(self.received)}", "type": "function",
                "function": {"name": body["tools"][0]["function"]["name"], "arguments": arguments}} if wants_tool else None
        finish = "length" if cut else "tool_calls" if wants_tool else "stop"
        usage = {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47}
        if not body.get("stream"):
            message = {"role": "assistant", "content": text, "reasoning_content": reasoning,
                       "tool_calls": [call] if call else []}
            return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body.get("model", "m"),
                                      "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage},
                                     headers={"Set-Cookie": f"sid={self.name}-session; Path=/"})  # must not travel on
        deltas: list[dict] = [{"role": "assistant", "content": ""}]
        deltas += [{"reasoning_content": part} for part in _halves(reasoning)]
        if call:
            first, second = _halves(arguments)
            deltas.append({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"], "arguments": first}}]})
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": second}}]})
        else:
            deltas += [{"content": part} for part in _halves(text)]
        chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        options = body.get("stream_options") or {}
        if options.get("continuous_usage_stats") and self.continuous_usage:
            chunks = [{**c, "usage": usage} for c in chunks]
        if options.get("include_usage"):
            chunks.append({"choices": [], "usage": usage})
        return await self._stream(request, [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                             "model": body.get("model", "m"), **c} for c in chunks])

    async def _faulty(self, request: web.Request, stream: bool) -> web.StreamResponse:
        """``status:N``: an error status; ``bad_body``: 200 with a body that is no completion; ``text_stream``:
        200 text/plain to a stream request; ``error_event`` / ``garbage`` / ``truncated``: a stream that carries
        vLLM's mid-stream error, a line that is not an event, or stops before finishing."""
        if self.fault.startswith("status:"):
            status = int(self.fault.split(":")[1])
            return web.json_response({"error": {"message": f"worker says {status}", "code": status}}, status=status)
        if self.fault == "bad_body" or (self.fault == "text_stream" and not stream):
            return web.json_response({"unexpected": True})
        if self.fault == "text_stream":
            return web.Response(text="not a stream")
        first = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "par"}}]}
        tail = {"error_event": b'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n',
                "error_object": b'data: {"object": "error", "message": "engine died", "code": 500}\n\n',
                "garbage": b"<html>oops</html>\n\n", "truncated": b""}[self.fault]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {json.dumps(first)}\n\n".encode() + tail)
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        problem = self._invalid(body)
        if problem or not isinstance(body.get("prompt"), (str, list)):
            return web.json_response({"error": {"message": problem or "bad prompt", "code": 400}}, status=400)
        text = f"{self.name} continues."
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body.get("model", "m")}
        if not body.get("stream"):
            return web.json_response({**base, "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        parts = _halves(text)
        return await self._stream(request, [{**base, "choices": [{"index": 0, "text": p, "logprobs": None,
                                                                  "finish_reason": None if i == 0 else "stop"}]}
                                            for i, p in enumerate(parts)])

    @staticmethod
    async def _stream(request: web.Request, chunks: list[dict]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _publish(self, messages: list[dict], tools: list | None) -> None:
        if self.publisher is None:
            return
        tokens = [int(t) for t in self.hasher.chat_tokens(messages, tools)]
        n = len(tokens) // BLOCK
        names = [hashlib.sha256(json.dumps(tokens[: (i + 1) * BLOCK]).encode()).digest() for i in range(n)]
        if n:
            self.publisher.block_stored(names, None, tokens[: n * BLOCK], BLOCK)


def _halves(text: str) -> list[str]:
    mid = len(text) // 2
    return [text[:mid], text[mid:]]


@dataclass
class Cluster:
    loop: LoopThread
    router: KvRouter
    workers: list[FakeWorker]
    url: str
    runner: web.AppRunner

    def stop_worker(self, worker: FakeWorker) -> None:
        self.loop.run(worker.runner.cleanup())
        worker.runner = None


def make_tokenizer(directory: Path) -> Path:
    """A real Hugging Face tokenizer (word level over a small vocabulary) saved as tokenizer.json."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    words = ["<unk>"] + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def start_cluster(n_workers: int, *, config: RouterConfig | None = None, tokenizer: Path | None = None,
                  with_events: bool = False, delay_s: float = 0.0) -> Cluster:
    loop = LoopThread()
    hasher = PromptHasher(BLOCK, str(tokenizer) if tokenizer else None)
    workers, events = [], {}
    for i in range(n_workers):
        publisher = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") if with_events else None
        worker = FakeWorker(f"worker{i}", hasher, publisher, delay_s)
        worker.runner, worker.port = loop.run(_serve(worker.app()))
        workers.append(worker)
        if publisher:
            events[worker.url] = EventSource(publisher.endpoint, publisher.replay_endpoint)
    router = KvRouter([w.url for w in workers], config or RouterConfig(block_size=BLOCK, health_interval_s=0.2),
                      tokenizer=str(tokenizer) if tokenizer else None, events=events)
    runner, port = loop.run(_serve(router.app()))
    return Cluster(loop, router, workers, f"http://127.0.0.1:{port}", runner)


def stop_cluster(cluster: Cluster) -> None:
    cluster.loop.run(cluster.runner.cleanup())
    for worker in cluster.workers:
        if worker.runner is not None:
            cluster.loop.run(worker.runner.cleanup())
        if worker.publisher:
            worker.publisher.close()
    cluster.loop.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = start_cluster(2)
    yield c
    stop_cluster(c)


@contextlib.contextmanager
def router_process(worker: str, args: list[str] = (), env: dict | None = None, port: int | None = None) -> Iterator[str]:
    """``kvtier router`` in its own process (the console entry point), yielding its URL once /health answers."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "router", "--port", str(port), "--worker", worker,
                             "--log-level", "WARNING", *args], env=env or dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
