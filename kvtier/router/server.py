"""The router's HTTP front: OpenAI chat/completions/responses and Anthropic messages, proxied to the worker
that already holds the request's prefix (vLLM or SGLang OpenAI-compatible servers).

Errors the client caused are 4xx with a message; a worker that cannot be reached is marked dead, its KV
forgotten, and the request goes to the next best worker; the router itself answers 5xx only with a reason
(no live worker: 503; a worker's answer that is not a completion: 502; a worker's own error status is passed
through with its message), always as JSON in the client's protocol, and a stream that fails after its first
byte ends with that protocol's error event. Who may call is :mod:`kvtier.router.auth`; what a request may
make the router parse, store or forward is :mod:`kvtier.router.limits`; the agent hints it derives from what the
client sent and hands to the worker in ``kv_transfer_params.agent_hints``, :mod:`kvtier.router.signals`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import xxhash
import yarl
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvtier.events import EventSubscriber, KVEventBatch
from kvtier.hints import TENANT_FIELD
from kvtier.router.auth import Auth, Tenant
from kvtier.router.choice import Chooser, CostWeights, PriorityGate, QueueFull, SessionTable, WorkerLoad
from kvtier.router.indexer import KvIndexer, Overlap
from kvtier.router.limits import parse_json_object
from kvtier.router.prompt import PromptHasher
from kvtier.router.signals import SOURCES, Derived, derive, read_signals
from kvtier.router.translate import (AnthropicReply, BadRequest, ChatReply, ResponsesReply, WorkerError,
                                     anthropic_error_type, need, responses_echo, worker_body)

Reply = AnthropicReply | ResponsesReply | ChatReply

log = logging.getLogger(__name__)

_CONTROL_CONNECTIONS = 4
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
    max_body_bytes: int = 32 * 2**20      # vLLM's uvicorn front has no cap; aiohttp's default 1 MiB is too small
    max_sessions: int = 100_000
    max_approx_blocks: int = 1_000_000    # per approximate-mode worker
    max_salt_chars: int = 256
    auth: Auth = field(default_factory=Auth)
    derive_hints: bool = True             # False: forward explicit agent hints only (kvtier.router.signals)

    def __post_init__(self) -> None:
        if self.max_inflight_per_worker <= 0:
            raise ValueError("max_inflight_per_worker must be positive")
        if min(self.max_body_bytes, self.max_sessions, self.max_approx_blocks, self.max_salt_chars) <= 0:
            raise ValueError("max_body_bytes, max_sessions, max_approx_blocks and max_salt_chars must be positive")
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


@dataclass
class _Route:
    """One attempt at serving a request: the worker chosen, and what to learn if the worker accepts it."""

    worker: Worker
    hashes: list[int]
    overlap: Overlap
    session: str | None
    decode_blocks: int    # the KV its answer will hold: the prompt's blocks and, with agent hints' osl, the output


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
        self.approx = Gauge("kvtier_router_approx_blocks", "blocks assumed cached from routing decisions", registry=r)
        self.sessions = Gauge("kvtier_router_sessions", "sessions remembered for stickiness", registry=r)
        self.hint_sources = Counter("kvtier_router_hint_source", "requests by where their session came from "
                                    "(explicit agent_hints, session_header, metadata, prompt_cache_key, prefix "
                                    "continuation; explicit without a session; none)", ["source"], registry=r)
        self.derived_pins = Counter("kvtier_router_derived_pins", "pins derived from cache_control breakpoints and "
                                    "prompt_cache_retention (unplaced: no tokenizer, or no text to place it in)",
                                    ["outcome"], registry=r)
        self.source = {s: self.hint_sources.labels(s) for s in SOURCES}  # bound once, each shown from the start
        self.cached = {m: self.cached_blocks.labels(m) for m in ("device", "host", "disk")}  # bound once: hot path
        self.route_seconds = Histogram("kvtier_router_route_seconds", "time to choose a worker", registry=r,
                                       buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1))


class KvRouter:
    def __init__(self, worker_urls: list[str], config: RouterConfig | None = None, tokenizer: str | None = None,
                 events: dict[str, EventSource] | None = None) -> None:
        need(len(worker_urls) > 0, "at least one worker is required")
        self._pending_urls = [check_worker_url(u) for u in worker_urls]
        self.config = config or RouterConfig()
        self.hasher = PromptHasher(self.config.block_size, tokenizer)
        self.indexer = KvIndexer(self.config.block_size, approx_ttl_s=self.config.approx_ttl_s,
                                 max_approx_blocks=self.config.max_approx_blocks)
        self.chooser = Chooser(self.config.weights, self.config.seed)
        self.sessions = SessionTable(self.config.max_sessions, ttl_s=self.config.session_ttl_s)
        self.gate = PriorityGate(self.config.max_waiting)
        self.metrics = _Metrics()
        self.workers: dict[str, Worker] = {}
        self._events = dict(events or {})
        self._http: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_task: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors])
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
        # as many connections per worker as requests it may have in flight (aiohttp's default, 100 in all,
        # would queue requests inside the router), plus a few for /v1/models and health probes
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.config.max_inflight_per_worker + _CONTROL_CONNECTIONS)
        # no cookie jar: a cookie one client's answer set must not ride along on other clients' requests
        self._http = aiohttp.ClientSession(timeout=timeout, connector=connector, cookie_jar=aiohttp.DummyCookieJar())
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
    async def _acquire(self, hashes: list[int], session: str | None, latency_sensitivity_s: float, decode_blocks: int,
                       exclude: set[str]) -> _Route:
        while True:
            live = [w for w in self.workers.values() if w.alive and w.url not in exclude]
            if not live:
                raise NoWorker("no live worker can take the request" + (" (all tried)" if exclude else ""))
            free = [w.url for w in live if w.load.inflight < self.config.max_inflight_per_worker]
            if free:
                break
            self.metrics.waiting.set(len(self.gate) + 1)
            try:
                await self.gate.wait(latency_sensitivity_s)
            finally:
                self.metrics.waiting.set(len(self.gate))
        started = time.perf_counter()
        overlaps = self.indexer.find_matches(hashes)
        home = self.sessions.get(session) if session else None
        if home is not None and home.worker in free:
            # what the session's latest call left on its worker counts as held there (in host memory at least)
            # even before the worker's KV events say so; the session stays unless another worker would still
            # finish it sooner recomputing it (a session pinned to a busy worker leaves another one idle)
            held = min(home.blocks, len(hashes))
            known = overlaps.get(home.worker, Overlap(0, 0, 0))
            overlaps[home.worker] = Overlap(known.device, max(known.host, held), max(known.any, held))
        loads = {u: self.workers[u].load for u in free}
        choice = self.chooser.choose(len(hashes), overlaps, loads, free, tie_key=hashes[0] if hashes else 0)
        self.metrics.route_seconds.observe(time.perf_counter() - started)
        return _Route(self.workers[choice], hashes, overlaps.get(choice, Overlap(0, 0, 0)), session, decode_blocks)

    def _remember(self, route: _Route) -> None:
        """The worker accepted the request (2xx): only now learn its session and (approximately) its KV, so
        refused or failed requests leave nothing behind."""
        url, overlap = route.worker.url, route.overlap
        if route.session:
            self.sessions.put(route.session, url, len(route.hashes))
        self.indexer.record_routing(url, route.hashes)
        self.metrics.prompt_blocks.inc(len(route.hashes))
        self.metrics.cached["device"].inc(overlap.device)
        self.metrics.cached["host"].inc(overlap.host - overlap.device)
        self.metrics.cached["disk"].inc(overlap.any - overlap.host)
        self.metrics.routed.labels(url).inc()

    def _begin(self, route: _Route) -> None:
        load = route.worker.load
        load.inflight += 1
        load.prefill_blocks += len(route.hashes) - route.overlap.any
        load.active_blocks += route.decode_blocks

    def _prefilled(self, route: _Route) -> None:
        route.worker.load.prefill_blocks -= len(route.hashes) - route.overlap.any

    def _end(self, route: _Route) -> None:
        load = route.worker.load
        load.inflight -= 1
        load.active_blocks -= route.decode_blocks
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
            return _error(429, str(exc), anthropic)
        except NoWorker as exc:
            return _error(503, str(exc), anthropic, "overloaded_error" if anthropic else "service_unavailable")
        except web.HTTPException as exc:  # auth, body too large, unknown path or method: JSON like every error
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason, anthropic)

    def _client(self, request: web.Request) -> Tenant:
        tenant = self.config.auth.client(request)
        if tenant is None:
            raise web.HTTPUnauthorized(reason="a valid API key is required (Authorization: Bearer KEY or x-api-key: KEY)")
        return tenant

    def _admin(self, request: web.Request) -> None:
        if not self.config.auth.admin_enabled:
            raise web.HTTPNotFound(reason="the admin API is off (start the router with --admin-key)")
        if not self.config.auth.admin(request):
            raise web.HTTPUnauthorized(reason="the admin key is required (Authorization: Bearer KEY)")

    def _endpoint(self, kind: str) -> Callable:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                response = await self._handle(kind, request)
            except (BadRequest, web.HTTPException) as exc:
                self.metrics.requests.labels(kind, str(getattr(exc, "status", 400))).inc()
                raise
            self.metrics.requests.labels(kind, str(response.status)).inc()
            return response
        return handle

    async def _handle(self, kind: str, request: web.Request) -> web.StreamResponse:
        tenant = self._client(request)
        body = parse_json_object(await request.read())
        signals = read_signals(kind, body, request.headers, self.config.derive_hints)
        salt = self._salt(body, tenant)
        stream = body.get("stream", False)
        need(isinstance(stream, bool), "body.stream must be a boolean")
        chat = worker_body(kind, body, stream)
        tokens, offsets = self._prompt(kind, chat)
        derived = derive(signals, kind, chat, salt, offsets, len(tokens) if self.hasher.exact else None)
        self._deliver(chat, body.get("kv_transfer_params"), derived, salt)
        hashes = self.hasher.hashes(tokens, salt)
        payload = json.dumps(chat).encode()
        path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        headers = {"Content-Type": "application/json"}
        reply = (AnthropicReply(chat["model"], len(tokens) if self.hasher.exact else None) if kind == "messages"
                 else ResponsesReply(chat["model"], responses_echo(body)) if kind == "responses" else ChatReply())
        hints = derived.hints
        decode_blocks = len(hashes) + -(-(hints.osl or 0) // self.config.block_size)
        tried: set[str] = set()
        while True:
            route = await self._acquire(hashes, hints.session_id, hints.latency_sensitivity or 0.0, decode_blocks,
                                        tried)
            self._begin(route)
            try:
                return await self._proxy(request, route, path, payload, stream, headers, reply)
            except WorkerUnreachable as exc:
                tried.add(route.worker.url)
                self._mark_dead(route.worker, str(exc))
                self.metrics.reroutes.inc()
            finally:
                self._end(route)

    def _salt(self, body: dict, tenant: Tenant) -> str | None:
        """The request's cache salt: its key's tenant salt (a different claimed one is refused), else the
        client's ``cache_salt`` on any protocol."""
        claimed = body.get("cache_salt")
        need(claimed is None or (isinstance(claimed, str) and len(claimed) <= self.config.max_salt_chars),
             f"body.cache_salt must be a string of at most {self.config.max_salt_chars} characters")
        if tenant.salt is not None and claimed not in (None, tenant.salt):
            raise web.HTTPForbidden(reason="body.cache_salt differs from the tenant salt of this API key")
        return tenant.salt or claimed or None

    def _prompt(self, kind: str, chat: dict) -> tuple[Any, Callable[[dict, int], list[int] | None]]:
        """The prompt's token ids, and how to find the token offsets of markers in a copy of ``chat``."""
        if kind == "completions":
            prompt = chat.get("prompt")
            need(isinstance(prompt, (str, list)) and len(prompt) > 0, "body.prompt must be a non-empty string or array")
            if isinstance(prompt, list):
                need(all(isinstance(p, (str, list)) for p in prompt) or all(isinstance(p, int) and not isinstance(p, bool)
                     and 0 <= p < 2**32 for p in prompt), "body.prompt must be text, token ids, or a list of those")
            return self.hasher.completion_tokens(prompt), lambda marked, n: None
        messages = chat.get("messages")
        need(isinstance(messages, list) and len(messages) > 0, "body.messages must be a non-empty array")
        for i, msg in enumerate(messages):
            need(isinstance(msg, dict) and isinstance(msg.get("role"), str), f"body.messages[{i}] needs a string role")
        tools = chat.get("tools")
        need(tools is None or isinstance(tools, list), "body.tools must be an array")
        prompt = self.hasher.chat_prompt(messages, tools)
        return prompt.tokens, lambda marked, n: self.hasher.marker_offsets(prompt, marked, n)

    def _deliver(self, chat: dict, params: Any, derived: Derived, salt: str | None) -> None:
        """What the worker needs to know, in the fields vLLM reads: the hints in ``kv_transfer_params`` (beside the
        client's own ``params``, on every protocol), their priority as the request's ``priority`` (unless the
        client set one), the salt."""
        self.metrics.source[derived.source].inc()
        self.metrics.derived_pins.labels("placed").inc(derived.pins_placed)
        self.metrics.derived_pins.labels("unplaced").inc(derived.pins_unplaced)
        if salt is not None:
            chat["cache_salt"] = salt
        need(params is None or isinstance(params, dict), "body.kv_transfer_params must be an object")
        params = {k: v for k, v in (params or {}).items() if k not in ("agent_hints", TENANT_FIELD)}
        hints = derived.wire()
        if hints:
            params["agent_hints"] = hints
        if salt is not None:  # pins count against the tenant's share of the pin budget
            params[TENANT_FIELD] = f"t{xxhash.xxh3_64_hexdigest(salt.encode())}"
        if params or "kv_transfer_params" in chat:
            chat["kv_transfer_params"] = params
        if derived.vllm_priority is not None and "priority" not in chat:
            chat["priority"] = derived.vllm_priority

    async def _proxy(self, request: web.Request, route: _Route, path: str, payload: bytes, stream: bool,
                     headers: dict, reply: Reply) -> web.StreamResponse:
        try:
            upstream = await self._http.post(route.worker.url + path, data=payload, headers=headers)
        except _CONNECT_ERRORS as exc:
            raise WorkerUnreachable(describe_failure(exc)) from None
        async with upstream:
            self._prefilled(route)
            if upstream.status < 300:
                self._remember(route)
            anthropic = isinstance(reply, AnthropicReply)
            if upstream.status >= 400 or not stream:
                try:
                    raw = await upstream.read()
                except _CONNECT_ERRORS as exc:
                    raise WorkerUnreachable(describe_failure(exc)) from None
                return _finish_plain(upstream.status, raw, reply, anthropic)
            if upstream.content_type != "text/event-stream":
                return _error(502, f"the worker answered a stream request with {upstream.content_type!r}, "
                                   "not an event stream", anthropic)
            return await self._relay_stream(request, upstream, reply)

    async def _relay_stream(self, request: web.Request, upstream: aiohttp.ClientResponse,
                            reply: Reply) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await _write(response, reply.start())
            relay = self._pass_stream if isinstance(reply, ChatReply) else self._translate_stream
            await relay(upstream, reply, response)
            await _write(response, reply.finish())
        except (WorkerError, *_CONNECT_ERRORS) as exc:
            # bytes already reached the client, so the stream cannot move to another worker: end it with the
            # protocol's error event (unless it is the client that went away)
            log.warning("stream from the worker to the client failed: %s", describe_failure(exc))
            try:
                await _write(response, reply.fail(f"the worker's stream failed: {describe_failure(exc)}"))
            except _CONNECT_ERRORS:
                return response
        try:
            await response.write_eof()
        except _CONNECT_ERRORS:
            pass
        return response

    async def _lines(self, upstream: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
        """The complete lines of each read from a worker's stream (without their newlines)."""
        pending: list[bytes] = []
        size = 0
        async for data in upstream.content.iter_any():
            *lines, rest = data.split(b"\n")
            if lines:
                lines[0] = b"".join(pending) + lines[0]
                pending, size = [], 0
                yield lines
            pending.append(rest)
            size += len(rest)
            if size > self.config.max_body_bytes:
                raise WorkerError(f"the worker sent a stream line longer than {self.config.max_body_bytes} bytes")

    async def _pass_stream(self, upstream: aiohttp.ClientResponse, reply: ChatReply,
                           response: web.StreamResponse) -> None:
        """Chat and completions streams go out as the worker's bytes, checked line by line: a line that is not
        an event, or an end without ``data: [DONE]``, is a failure (vLLM's error events are OpenAI's shape
        already and pass as they are)."""
        done = False
        async for lines in self._lines(upstream):
            for line in lines:
                done = done or _sse_data(line) == b"[DONE]"
            await response.write(b"\n".join(lines) + b"\n")
        if not done:
            raise WorkerError("the stream ended before data: [DONE]")

    async def _translate_stream(self, upstream: aiohttp.ClientResponse, reply: AnthropicReply | ResponsesReply,
                                response: web.StreamResponse) -> None:
        async for lines in self._lines(upstream):
            for line in lines:
                chunk = _sse_chunk(line)
                if chunk is not None:
                    await _write(response, reply.chunk(chunk))
        if reply.state.finish_reason is None:
            raise WorkerError("the stream ended before the answer finished")

    async def _models(self, request: web.Request) -> web.Response:
        self._client(request)
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
        for worker in self.workers.values():
            self.metrics.inflight.labels(worker.url).set(worker.load.inflight)
        self.metrics.approx.set(self.indexer.approx_blocks)
        self.metrics.sessions.set(len(self.sessions))
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        workers = [{"url": w.url, "alive": w.alive, "inflight": w.load.inflight,
                    "events": w.subscriber is not None} for w in self.workers.values()]
        ok = any(w.alive for w in self.workers.values())
        body = {"status": "ok" if ok else "no live worker", "workers": workers, "indexed_blocks": len(self.indexer),
                "exact_hashing": self.hasher.exact}
        return web.json_response(body, status=200 if ok else 503)

    async def _admin_add(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = parse_json_object(await request.read())
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
        self._admin(request)
        body = parse_json_object(await request.read())
        url = body.get("url")
        need(isinstance(url, str), "body.url must be a string")
        self.remove_worker(url)
        return web.json_response({"removed": url.rstrip("/")})


class NoWorker(Exception):
    """No live worker can take the request."""


class WorkerUnreachable(Exception):
    """The worker could not be reached before any byte of its answer was relayed."""


async def _write(response: web.StreamResponse, pieces: list[bytes]) -> None:
    for piece in pieces:
        await response.write(piece)


_SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")


def _sse_data(line: bytes) -> bytes | None:
    """The payload of a ``data:`` line of a worker's event stream; None for the other SSE lines. A line that
    is not SSE at all is a :class:`WorkerError`."""
    line = line.strip()
    if line.startswith(b"data:"):
        return line[5:].strip()
    if line and not line.startswith(_SSE_FIELDS):
        raise WorkerError(f"the worker sent a line that is not an event: {line[:200]!r}")
    return None


def _sse_chunk(line: bytes) -> dict | None:
    """The chat chunk on one line of a worker's event stream; None for other SSE lines and ``[DONE]``. A
    worker's error event, or a line that is not SSE or not a JSON object, is a :class:`WorkerError`."""
    payload = _sse_data(line)
    if payload is None or payload == b"[DONE]":
        return None
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        raise WorkerError(f"the worker sent an event that is not JSON: {payload[:200]!r}") from None
    if not isinstance(value, dict):
        raise WorkerError("the worker sent an event that is not a JSON object")
    if "error" in value or value.get("object") == "error":  # vLLM's two shapes of a mid-stream error
        raise WorkerError(f"worker error: {_worker_error_message(value, payload)}")
    return value


def _finish_plain(status: int, raw: bytes, reply: Reply, anthropic: bool) -> web.Response:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    if status >= 400:
        return _error(status, f"worker error: {_worker_error_message(data, raw)}", anthropic)
    try:
        if not isinstance(data, dict):
            raise WorkerError("the worker answered with something that is not a JSON object")
        answer = reply.plain(data)
    except WorkerError as exc:
        return _error(502, str(exc), anthropic)
    if answer is data:  # passed through unchanged: the worker's own bytes
        return web.Response(body=raw, status=status, content_type="application/json")
    return web.json_response(answer, status=status)


def _worker_error_message(data: Any, raw: bytes) -> str:
    if isinstance(data, dict):
        err = data.get("error", data.get("message", data.get("detail")))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)
    return raw[:500].decode("utf-8", "replace") or "(empty body)"


def _error(status: int, message: str, anthropic: bool, kind: str | None = None) -> web.Response:
    """One JSON error in the client's protocol: Anthropic ``{"type": "error", "error": {type, message}}``,
    OpenAI ``{"error": {message, type, code}}``."""
    kind = kind or anthropic_error_type(status)
    if anthropic:
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)
