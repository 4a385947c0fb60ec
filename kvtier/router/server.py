"""The router's HTTP front: OpenAI chat/completions/responses and Anthropic messages, proxied to the worker
that already holds the request's prefix (vLLM or SGLang OpenAI-compatible servers).

Errors the client caused are 4xx with a message; a worker that cannot be reached is marked dead, its KV
forgotten, and the request goes to the next best worker; the router itself answers 5xx only with a reason
(no live worker: 503; a worker's own error status is passed through with its body).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvtier.events import EventSubscriber, KVEventBatch
from kvtier.router.choice import Chooser, CostWeights, PriorityGate, QueueFull, SessionTable, WorkerLoad
from kvtier.router.indexer import KvIndexer, Overlap
from kvtier.router.prompt import PromptHasher
from kvtier.router.translate import (AnthropicStreamWriter, BadRequest, ResponsesStreamWriter, ToolArgsMemo,
                                     anthropic_to_chat, chat_to_anthropic, chat_to_responses, need, responses_to_chat)

log = logging.getLogger(__name__)

_CONNECT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)
HEALTH_FAILURES_TO_DIE = 2


def check_worker_url(url: str) -> str:
    """A worker's base URL without a trailing slash; BadRequest unless it is http(s)://host[:port][/path]."""
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise BadRequest(f"a worker URL looks like http://host:port, got {url!r}")
    return url.rstrip("/")


def describe_failure(exc: BaseException) -> str:
    """A connection failure in words, for logs a person reads (not the exception's repr)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the worker closed the connection"
    return str(exc) or type(exc).__name__


@dataclass
class RouterConfig:
    block_size: int = 16
    weights: CostWeights = field(default_factory=CostWeights)
    max_inflight_per_worker: int = 64
    max_waiting: int = 1024
    approx_ttl_s: float = 120.0
    session_ttl_s: float = 1800.0
    health_interval_s: float = 2.0
    connect_timeout_s: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_inflight_per_worker <= 0:
            raise ValueError("max_inflight_per_worker must be positive")
        if self.health_interval_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("health_interval_s and connect_timeout_s must be positive")


@dataclass
class EventSource:
    endpoint: str
    replay_endpoint: str | None = None

    @classmethod
    def parse(cls, text: str) -> EventSource:
        """``tcp://host:5557`` or ``tcp://host:5557,tcp://host:5558`` (live stream, replay socket)."""
        live, _, replay = text.partition(",")
        if not live.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"not a ZMQ endpoint: {text!r}")
        return cls(live, replay or None)


@dataclass
class Worker:
    url: str
    load: WorkerLoad = field(default_factory=WorkerLoad)
    alive: bool = True
    subscriber: EventSubscriber | None = None


class _Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("kvtier_router_requests", "requests answered", ["endpoint", "status"], registry=r)
        self.routed = Counter("kvtier_router_routed", "requests sent to each worker", ["worker"], registry=r)
        self.prompt_blocks = Counter("kvtier_router_prompt_blocks", "full blocks of routed prompts", registry=r)
        self.cached_blocks = Counter("kvtier_router_cached_blocks", "routed prompt blocks the chosen worker held",
                                     ["medium"], registry=r)
        self.reroutes = Counter("kvtier_router_reroutes", "requests moved off an unreachable worker", registry=r)
        self.worker_deaths = Counter("kvtier_router_worker_deaths", "workers marked dead", ["worker"], registry=r)
        self.inflight = Gauge("kvtier_router_inflight", "requests in flight per worker", ["worker"], registry=r)
        self.alive = Gauge("kvtier_router_worker_alive", "1 when the worker is reachable", ["worker"], registry=r)
        self.waiting = Gauge("kvtier_router_waiting", "requests queued because every worker is saturated", registry=r)
        self.indexed = Gauge("kvtier_router_indexed_blocks", "distinct blocks in the index", registry=r)
        self.route_seconds = Histogram("kvtier_router_route_seconds", "time to choose a worker", registry=r,
                                       buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1))


class KvRouter:
    def __init__(self, worker_urls: list[str], config: RouterConfig | None = None, tokenizer: str | None = None,
                 events: dict[str, EventSource] | None = None) -> None:
        need(len(worker_urls) > 0, "at least one worker is required")
        self._pending_urls = [check_worker_url(u) for u in worker_urls]
        self.config = config or RouterConfig()
        self.hasher = PromptHasher(self.config.block_size, tokenizer)
        self.indexer = KvIndexer(self.config.block_size, approx_ttl_s=self.config.approx_ttl_s)
        self.chooser = Chooser(self.config.weights, self.config.seed)
        self.sessions = SessionTable(ttl_s=self.config.session_ttl_s)
        self.gate = PriorityGate(self.config.max_waiting)
        self.memo = ToolArgsMemo()
        self.metrics = _Metrics()
        self.workers: dict[str, Worker] = {}
        self._events = dict(events or {})
        self._http: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_task: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 2**20, middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self._endpoint("chat"))
        app.router.add_post("/v1/completions", self._endpoint("completions"))
        app.router.add_post("/v1/responses", self._endpoint("responses"))
        app.router.add_post("/v1/messages", self._endpoint("messages"))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_post("/admin/workers", self._admin_add)
        app.router.add_delete("/admin/workers", self._admin_remove)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s, sock_read=3600)
        self._http = aiohttp.ClientSession(timeout=timeout)
        for url in self._pending_urls:
            self.add_worker(url, self._events.get(url))
        self._health_task = asyncio.create_task(self._health_loop())

    async def _cleanup(self, app: web.Application) -> None:
        if self._health_task:
            self._health_task.cancel()
        for url in list(self.workers):
            self.remove_worker(url)
        if self._http:
            await self._http.close()

    def add_worker(self, url: str, events: EventSource | None = None) -> None:
        """Join: with an event source the index follows the worker's KV events, else routing decisions."""
        url = check_worker_url(url)
        need(url not in self.workers, f"worker {url} is already registered")
        self.indexer.add_worker(url, approximate=events is None)
        worker = Worker(url)
        if events is not None:
            loop = self._loop
            assert loop is not None
            worker.subscriber = EventSubscriber(
                events.endpoint, events.replay_endpoint,
                on_batch=lambda seq, batch: loop.call_soon_threadsafe(self._apply_events, url, batch),
                on_reset=lambda reason: loop.call_soon_threadsafe(self._forget, url)).start()
        self.workers[url] = worker
        self.metrics.alive.labels(url).set(1)

    def remove_worker(self, url: str) -> None:
        """Leave: no more requests, and everything it held is forgotten."""
        worker = self.workers.pop(url.rstrip("/"), None)
        need(worker is not None, f"unknown worker {url}")
        if worker.subscriber is not None:
            worker.subscriber.close()
        self.indexer.remove_worker(worker.url)
        self.sessions.forget_worker(worker.url)

    def _apply_events(self, url: str, batch: KVEventBatch) -> None:
        if url in self.workers:
            self.indexer.apply_batch(url, batch)

    def _forget(self, url: str) -> None:
        if url in self.workers:
            self.indexer.clear_worker(url)

    def _mark_dead(self, worker: Worker, reason: str) -> None:
        if worker.alive:
            log.warning("worker %s is unreachable (%s); rerouting its requests", worker.url, reason)
            worker.alive = False
            self.metrics.worker_deaths.labels(worker.url).inc()
            self.metrics.alive.labels(worker.url).set(0)
            self._forget(worker.url)
            self.sessions.forget_worker(worker.url)

    async def _health_loop(self) -> None:
        """Every worker's ``/health``, every ``health_interval_s``: a worker that stops answering is marked dead
        before a request finds out (after ``HEALTH_FAILURES_TO_DIE`` failed checks in a row, so one slow answer
        from a busy worker does not cost it its sessions); a dead one that answers again is taken back."""
        failures: dict[str, int] = {}
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            workers = list(self.workers.values())
            problems = await asyncio.gather(*(self._check_health(w) for w in workers))
            for worker, problem in zip(workers, problems):
                if problem is None:
                    failures.pop(worker.url, None)
                    if not worker.alive:
                        log.info("worker %s is back", worker.url)
                        worker.alive = True
                        self.metrics.alive.labels(worker.url).set(1)
                        self.gate.release()
                    continue
                failures[worker.url] = failures.get(worker.url, 0) + 1
                if worker.alive and failures[worker.url] >= HEALTH_FAILURES_TO_DIE:
                    self._mark_dead(worker, f"health check: {problem}")

    async def _check_health(self, worker: Worker) -> str | None:
        """None when the worker answers ``/health`` with 200, else what went wrong."""
        timeout = aiohttp.ClientTimeout(total=max(2.0, self.config.health_interval_s))
        try:
            async with self._http.get(worker.url + "/health", timeout=timeout) as resp:
                return None if resp.status == 200 else f"status {resp.status}"
        except _CONNECT_ERRORS as exc:
            return describe_failure(exc)

    # --- routing ----------------------------------------------------------------------------------------
    async def _acquire(self, hashes: list[int], session: str | None, priority: int, exclude: set[str]) -> tuple[Worker, Overlap]:
        while True:
            live = [w for w in self.workers.values() if w.alive and w.url not in exclude]
            if not live:
                raise NoWorker("no live worker can take the request" + (" (all tried)" if exclude else ""))
            free = [w.url for w in live if w.load.inflight < self.config.max_inflight_per_worker]
            if free:
                break
            self.metrics.waiting.set(len(self.gate) + 1)
            try:
                await self.gate.wait(priority)
            finally:
                self.metrics.waiting.set(len(self.gate))
        started = time.perf_counter()
        overlaps = self.indexer.find_matches(hashes)
        sticky = self.sessions.get(session) if session else None
        if sticky in free:
            choice = sticky
        else:
            loads = {u: self.workers[u].load for u in free}
            choice = self.chooser.choose(len(hashes), overlaps, loads, free, tie_key=hashes[0] if hashes else 0)
        if session:
            self.sessions.put(session, choice)
        self.indexer.record_routing(choice, hashes)
        self.metrics.route_seconds.observe(time.perf_counter() - started)
        overlap = overlaps.get(choice, Overlap(0, 0, 0))
        self.metrics.prompt_blocks.inc(len(hashes))
        self.metrics.cached_blocks.labels("device").inc(overlap.device)
        self.metrics.cached_blocks.labels("host").inc(overlap.host - overlap.device)
        self.metrics.cached_blocks.labels("disk").inc(overlap.any - overlap.host)
        self.metrics.routed.labels(choice).inc()
        return self.workers[choice], overlap

    def _begin(self, worker: Worker, n_blocks: int, overlap: Overlap) -> None:
        worker.load.inflight += 1
        worker.load.prefill_blocks += n_blocks - overlap.any
        worker.load.active_blocks += n_blocks
        self.metrics.inflight.labels(worker.url).set(worker.load.inflight)

    def _prefilled(self, worker: Worker, n_blocks: int, overlap: Overlap) -> None:
        worker.load.prefill_blocks -= n_blocks - overlap.any

    def _end(self, worker: Worker, n_blocks: int) -> None:
        worker.load.inflight -= 1
        worker.load.active_blocks -= n_blocks
        self.metrics.inflight.labels(worker.url).set(worker.load.inflight)
        self.gate.release()

    # --- endpoints --------------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        anthropic = request.path.startswith("/v1/messages")
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc), anthropic)
        except QueueFull as exc:
            return _error(429, str(exc), anthropic, "rate_limit_error")
        except NoWorker as exc:
            return _error(503, str(exc), anthropic, "overloaded_error" if anthropic else "service_unavailable")

    def _endpoint(self, kind: str) -> Callable:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                response = await self._handle(kind, request)
            except BadRequest:
                self.metrics.requests.labels(kind, "400").inc()
                raise
            self.metrics.requests.labels(kind, str(response.status)).inc()
            return response
        return handle

    async def _handle(self, kind: str, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        need(isinstance(body, dict), "the request body must be a JSON object")
        hints = _agent_hints(body)
        if kind == "messages":
            chat = anthropic_to_chat(body, self.memo)
        elif kind == "responses":
            chat = responses_to_chat(body, self.memo)
        else:
            chat = body
        stream = body.get("stream", False)
        need(isinstance(stream, bool), "body.stream must be a boolean")
        if kind in ("messages", "responses"):
            chat["stream"] = stream
            if stream:
                chat["stream_options"] = {"include_usage": True}
            if "nvext" in body:
                chat["nvext"] = body["nvext"]
        hashes = self._hashes(kind, chat)
        session = hints.get("session_id")
        priority = hints.get("priority", 0)
        path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        headers = {"x-kvtier-agent-hints": json.dumps(hints)} if hints else {}
        tried: set[str] = set()
        while True:
            worker, overlap = await self._acquire(hashes, session, priority, tried)
            self._begin(worker, len(hashes), overlap)
            try:
                return await self._proxy(kind, request, worker, path, chat, headers, stream,
                                         lambda: self._prefilled(worker, len(hashes), overlap))
            except WorkerUnreachable as exc:
                tried.add(worker.url)
                self._mark_dead(worker, str(exc))
                self.metrics.reroutes.inc()
            finally:
                self._end(worker, len(hashes))

    def _hashes(self, kind: str, chat: dict) -> list[int]:
        salt = chat.get("cache_salt")
        need(salt is None or isinstance(salt, str), "body.cache_salt must be a string")
        if kind == "completions":
            prompt = chat.get("prompt")
            need(isinstance(prompt, (str, list)) and len(prompt) > 0, "body.prompt must be a non-empty string or array")
            if isinstance(prompt, list):
                need(all(isinstance(p, (str, list)) for p in prompt) or all(isinstance(p, int) and not isinstance(p, bool)
                     and 0 <= p < 2**32 for p in prompt), "body.prompt must be text, token ids, or a list of those")
            tokens = self.hasher.completion_tokens(prompt)
        else:
            messages = chat.get("messages")
            need(isinstance(messages, list) and len(messages) > 0, "body.messages must be a non-empty array")
            for i, msg in enumerate(messages):
                need(isinstance(msg, dict) and isinstance(msg.get("role"), str), f"body.messages[{i}] needs a string role")
            tools = chat.get("tools")
            need(tools is None or isinstance(tools, list), "body.tools must be an array")
            tokens = self.hasher.chat_tokens(messages, tools)
        return self.hasher.hashes(tokens, salt)

    async def _proxy(self, kind: str, request: web.Request, worker: Worker, path: str, body: dict,
                     headers: dict, stream: bool, on_first_byte: Callable[[], None]) -> web.StreamResponse:
        try:
            upstream = await self._http.post(worker.url + path, json=body, headers=headers)
        except _CONNECT_ERRORS as exc:
            raise WorkerUnreachable(describe_failure(exc)) from None
        async with upstream:
            on_first_byte()
            if upstream.status >= 400 or not stream:
                try:
                    raw = await upstream.read()
                except _CONNECT_ERRORS as exc:
                    raise WorkerUnreachable(describe_failure(exc)) from None
                return self._finish_plain(kind, upstream.status, raw, body.get("model", ""))
            return await self._relay_stream(kind, request, upstream, body.get("model", ""))

    def _finish_plain(self, kind: str, status: int, raw: bytes, model: str) -> web.Response:
        anthropic = kind == "messages"
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if status >= 400:
            message = _worker_error_message(data, raw)
            return _error(status, f"worker error: {message}", anthropic, "api_error" if status >= 500 else "invalid_request_error")
        if not isinstance(data, dict):
            return _error(502, "the worker answered with something that is not a JSON object", anthropic, "api_error")
        if kind == "messages":
            data = chat_to_anthropic(data, model, self.memo)
        elif kind == "responses":
            data = chat_to_responses(data, model, self.memo)
        return web.json_response(data, status=status)

    async def _relay_stream(self, kind: str, request: web.Request, upstream: aiohttp.ClientResponse,
                            model: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        writer = (AnthropicStreamWriter(model, self.memo) if kind == "messages"
                  else ResponsesStreamWriter(model, self.memo) if kind == "responses" else None)
        if writer is not None:
            for piece in writer.start():
                await response.write(piece)
        buffer = b""
        try:
            async for data in upstream.content.iter_any():
                if writer is None:
                    await response.write(data)
                    continue
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    chunk = _sse_json(line)
                    if chunk is not None:
                        for piece in writer.chunk(chunk):
                            await response.write(piece)
        except _CONNECT_ERRORS as exc:
            # bytes already reached the client, so the stream cannot move to another worker: end it with an
            # explicit error event (unless it is the client that went away)
            log.warning("stream from the worker to the client broke: %s", describe_failure(exc))
            error = {"type": "error", "error": {"type": "api_error",
                                                "message": f"worker stream broke: {describe_failure(exc)}"}}
            try:
                await response.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
                await response.write_eof()
            except _CONNECT_ERRORS:
                pass
            return response
        if writer is not None:
            for piece in writer.finish():
                await response.write(piece)
        await response.write_eof()
        return response

    async def _models(self, request: web.Request) -> web.Response:
        for worker in self.workers.values():
            if worker.alive:
                try:
                    async with self._http.get(worker.url + "/v1/models") as resp:
                        return web.json_response(await resp.json(content_type=None), status=resp.status)
                except (*_CONNECT_ERRORS, ValueError):
                    continue
        raise NoWorker("no live worker answered /v1/models")

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.indexed.set(len(self.indexer))
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        workers = [{"url": w.url, "alive": w.alive, "inflight": w.load.inflight,
                    "events": w.subscriber is not None} for w in self.workers.values()]
        ok = any(w.alive for w in self.workers.values())
        body = {"status": "ok" if ok else "no live worker", "workers": workers, "indexed_blocks": len(self.indexer),
                "exact_hashing": self.hasher.exact}
        return web.json_response(body, status=200 if ok else 503)

    async def _admin_add(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        url = body.get("url")
        need(isinstance(url, str), "body.url must be a string")
        events = body.get("events")
        need(events is None or isinstance(events, str), "body.events must be a string")
        try:
            self.add_worker(url, EventSource.parse(events) if events else None)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return web.json_response({"added": url.rstrip("/")})

    async def _admin_remove(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        url = body.get("url")
        need(isinstance(url, str), "body.url must be a string")
        self.remove_worker(url)
        return web.json_response({"removed": url.rstrip("/")})


class NoWorker(Exception):
    """No live worker can take the request."""


class WorkerUnreachable(Exception):
    """The worker could not be reached before any byte of its answer was relayed."""


async def _json_object(request: web.Request) -> dict:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    need(isinstance(body, dict), "the request body must be a JSON object")
    return body


def _agent_hints(body: dict) -> dict:
    nvext = body.get("nvext")
    if nvext is None:
        return {}
    need(isinstance(nvext, dict), "body.nvext must be an object")
    hints = nvext.get("agent_hints")
    if hints is None:
        return {}
    need(isinstance(hints, dict), "body.nvext.agent_hints must be an object")
    session = hints.get("session_id")
    need(session is None or isinstance(session, str), "agent_hints.session_id must be a string")
    priority = hints.get("priority", 0)
    need(isinstance(priority, int) and not isinstance(priority, bool), "agent_hints.priority must be an integer")
    return hints


def _sse_json(line: bytes) -> dict | None:
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return None
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _worker_error_message(data: Any, raw: bytes) -> str:
    if isinstance(data, dict):
        err = data.get("error", data.get("message", data.get("detail")))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)
    return raw[:500].decode("utf-8", "replace") or "(empty body)"


def _error(status: int, message: str, anthropic: bool, kind: str = "invalid_request_error") -> web.Response:
    if anthropic:
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)
