"""The offload engine: what a model runner calls to keep KV below G1 and bring it back.

``lookup`` / ``load`` / ``store`` / ``release`` per request (DESIGN.md, "Engine API"). The engine owns G2
(a pinned ``HostTier``), and optionally G3 (``DiskTier``) and G4 (``RemoteTier``); the block ``Manager``
decides what lives where, and this class moves the bytes it decides on:

- ``store`` gathers a chunk's G1 blocks straight into a reserved G2 slot with the transfer kernels;
- ``lookup`` starts promoting every hit chunk held only in G3/G4: G2 slots reserved, one batched read per tier
  (promotion in place: no extra copy); ``load`` scatters a G2 slot back into G1 blocks, for a promoted chunk
  once its read landed within ``lower_tier_deadline_ms`` of being issued, or the runner recomputes;
- evictions chosen by the manager are demoted by a background mover (G2 -> G3 -> G4), so the serving path
  never waits on a disk or a server. A few spare host slots absorb chunks in flight.

Every tier change is published as vLLM-format KV events (G2 as ``CPU``, G3 and G4 together as ``STORAGE``)
and counted in Prometheus metrics. Chunk ``c`` of a request is keyed by the seq hash of its last block.
All manager state is guarded by one lock; transfers and I/O run outside it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial

import torch

from kvtier import kernels
from kvtier.cascade import G2, G3, G4, TIER_NAMES, Cascade, Promotion
from kvtier.config import KvtierConfig
from kvtier.events import MEDIUM_CPU, MEDIUM_STORAGE, EventPublisher
from kvtier.hashing import Namespace, block_hashes
from kvtier.hints import AgentHints, BlockPlan, block_plan
from kvtier.layout import PageLayout
from kvtier.metrics import EngineMetrics
from kvtier.tiers import open_remote_tier
from kvtier.tiers.base import Tier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostPool, HostTier, host_slots

log = logging.getLogger(__name__)



@dataclass
class EngineRequest:
    """One model call as the engine sees it: its prompt, tenant salt and agent hints."""

    request_id: str
    token_ids: Sequence[int]
    hints: AgentHints = field(default_factory=AgentHints)
    salt: str | None = None

    @property
    def session(self) -> str | None:
        """The session the hints name, within the request's tenant (two tenants' "s1" are two sessions)."""
        sid = self.hints.session_id
        return sid if sid is None or self.salt is None else f"{self.salt}\0{sid}"


@dataclass
class _RequestState:
    request: EngineRequest
    block_hashes: list[int]
    chunk_keys: list[int]
    plan: BlockPlan
    acquired: list[int] = field(default_factory=list)
    hit_tokens: dict[str, int] = field(default_factory=lambda: {"G2": 0, "G3": 0, "G4": 0})
    layer_ready: dict[int, torch.cuda.Event] = field(default_factory=dict)   # GPU: latest load per layer
    stores_done: list[torch.cuda.Event] = field(default_factory=list)       # GPU: offloads reading G1
    after_loads: list[Callable[[], None]] = field(default_factory=list)      # slot releases once loads land
    promotions: dict[int, Promotion] = field(default_factory=dict)          # started by lookup, not loaded yet


@dataclass(frozen=True)
class _ChunkMeta:
    """What a KV event needs about a chunk's blocks."""

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: tuple[int, ...]


class _ChunkEvents:
    """The engine's ``ChunkEvents``: vLLM-format KV events for chunks entering and leaving tiers, from what it
    remembers of each chunk's blocks while some tier holds it."""

    def __init__(self, publisher: EventPublisher | None, block_size: int, held: Callable[[int], bool]) -> None:
        self.publisher = publisher
        self.block_size = block_size
        self.held = held
        self.meta: dict[int, _ChunkMeta] = {}

    def remember(self, key: int, state: _RequestState, chunk: int, chunk_blocks: int) -> None:
        if key in self.meta:
            return
        lo, hi = chunk * chunk_blocks, (chunk + 1) * chunk_blocks
        bs = self.block_size
        self.meta[key] = _ChunkMeta(tuple(state.block_hashes[lo:hi]), state.block_hashes[lo - 1] if lo else None,
                                    tuple(int(t) for t in state.request.token_ids[lo * bs:hi * bs]))

    def blocks_of(self, keys: Iterable[int]) -> set[int]:
        return {h for k in keys if k in self.meta for h in self.meta[k].block_hashes}

    def stored(self, keys: list[int], medium: str) -> None:
        if self.publisher is None:
            return
        for key in keys:
            meta = self.meta.get(key)
            if meta is not None:
                self.publisher.block_stored(meta.block_hashes, meta.parent_hash, meta.token_ids, self.block_size,
                                            medium)

    def removed(self, keys: list[int], medium: str) -> None:
        if self.publisher is None:
            return
        hashes = [h for k in keys if k in self.meta for h in self.meta[k].block_hashes]
        if hashes:
            self.publisher.block_removed(hashes, medium)

    def forgotten(self, keys: list[int]) -> None:
        for key in keys:
            if not self.held(key):
                self.meta.pop(key, None)

    def promoted(self, key: int, g: int, ok: bool) -> None:
        """A promoted chunk's arrival in G2 is published as ``stored``; nothing more to say."""


class KvtierEngine:
    def __init__(self, config: KvtierConfig, layout: PageLayout, namespace: Namespace, *,
                 metrics: EngineMetrics | None = None, events: EventPublisher | None = None,
                 spare_host_slots: int = 4) -> None:
        self.config = config
        self.layout = layout
        self.namespace = namespace
        self.chunk_blocks = config.chunk_blocks
        self.chunk_tokens = config.block_size * config.chunk_blocks
        self.chunk_bytes = layout.block_bytes * config.chunk_blocks
        self.metrics = metrics or EngineMetrics()
        self._own_events = events is None and bool(config.events_endpoint)
        if self._own_events:
            events = EventPublisher(config.events_endpoint, config.events_replay_endpoint or None)
        self.events = events
        self._lock = threading.RLock()
        self._requests: dict[str, _RequestState] = {}
        self._closed = False

        host_slots(config.host_capacity_bytes, self.chunk_bytes, spare_host_slots)
        lower: dict[int, Tier] = {}
        try:
            if config.disk_path:
                lower[G3] = DiskTier.from_config(config, namespace, self.chunk_bytes)
            if config.remote_url:
                lower[G4] = open_remote_tier(config, namespace)
            pool = HostPool(config.host_capacity_bytes, self.chunk_bytes)
        except BaseException:  # nothing opened so far outlives a failed start
            for tier in lower.values():
                tier.close()
            if self._own_events:
                events.close()
            raise
        self._chunks = _ChunkEvents(events, config.block_size, lambda key: self.manager.locate(key) is not None)
        self.cascade = Cascade(config, self.metrics, HostTier(namespace, pool, own_pool=True), lower,
                               unit=pool.slot_bytes, chunk_bytes=self.chunk_bytes, spare_host_slots=spare_host_slots,
                               lock=self._lock, events=self._chunks)
        # the cascade's, named here for the engine's own calls and for callers that inspect the engine
        self.manager, self.host, self.tiers = self.cascade.manager, self.cascade.host, self.cascade.tiers
        # GPU transfers run on a side stream ordered against the compute stream by events; CPU ones inline
        self._side = torch.cuda.Stream(layout.device) if layout.device.type == "cuda" else None
        self._parts = [(layout, 0)]
        if config.layerwise_load:
            slices = layout.layer_slices()
            if slices is None:
                raise ValueError(f"layerwise_load needs per-layer segments; layout {layout.name} stores each "
                                 "block's layers as one segment")
            self._parts = slices
        self.cascade.set_gauges()

    # --- the engine API ----------------------------------------------------------------------------------------
    def chunk_keys(self, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
        """The keys of a prompt's full chunks: the seq hash of each chunk's last block."""
        return self._keys_of(block_hashes(token_ids, self.config.block_size, salt))

    def chunk_key(self, request_id: str, chunk_index: int) -> int:
        """The key of one chunk of an active request."""
        with self._lock:
            return self._chunk_key(self._state(request_id), chunk_index)

    def begin(self, request: EngineRequest) -> None:
        """Register a request (hash its prompt once); ``lookup``/``load``/``store`` then refer to its id."""
        hashes = block_hashes(request.token_ids, self.config.block_size, request.salt)
        keys = self._keys_of(hashes)
        plan = block_plan(request.hints, len(keys), self.chunk_tokens)
        with self._lock:
            self._check_open()
            if request.request_id in self._requests:
                raise ValueError(f"request {request.request_id!r} is already active")
            self._requests[request.request_id] = _RequestState(request, hashes, keys, plan)
            self.manager.begin_request(request.session, hints=request.hints)

    def lookup(self, request_id: str, max_chunks: int | None = None) -> dict[str, int]:
        """Hit tokens per tier by the prefix rule; the hit chunks are protected from eviction until
        ``release``, and those held only below G2 start coming up into G2 now, all at once."""
        with self._lock:
            state = self._state(request_id)
            keys = state.chunk_keys if max_chunks is None else state.chunk_keys[:max_chunks]
            hits = self.cascade.prefix_hits(keys)
            held = sum(hits.values())
            fresh = [k for k in keys[:held] if k not in state.acquired]
            self.manager.acquire(fresh)
            state.acquired += fresh
            out = {}
            for g, count in hits.items():
                out[TIER_NAMES[g]] = count * self.chunk_tokens
                self.metrics.lookups.labels(TIER_NAMES[g], "hit").inc(count)
            self.metrics.lookups.labels("none", "miss").inc(len(keys) - held)
            unread = [k for k in keys[:held] if k not in state.promotions]
        started = self.cascade.promote(unread)
        with self._lock:
            state.promotions.update(started)
        return out

    def load(self, request_id: str, chunk_index: int, block_ids: Sequence[int]) -> bool:
        """Fill G1 blocks ``block_ids`` with chunk ``chunk_index``. False on any failure (miss, checksum,
        deadline): the caller recomputes the chunk."""
        self._check_blocks(block_ids)
        with self._lock:
            state = self._state(request_id)
            key = self._chunk_key(state, chunk_index)
            read = state.promotions.pop(key, None)
            where = self.cascade.where(key)
            if read is None and where is None:
                return False
            tier = where if read is None else read.tier
        ok = self._load_from_host(key, block_ids, state) if tier == G2 else \
            self._load_from_below(key, tier, read, block_ids, state)
        if ok:
            state.hit_tokens[TIER_NAMES[tier]] += self.chunk_tokens
        return ok

    def store(self, request_id: str, chunk_index: int, block_ids: Sequence[int]) -> bool:
        """Copy a computed chunk from G1 blocks ``block_ids`` into G2. False when it was not stored (already
        held, no room, ...); that is never an error for the caller."""
        self._check_blocks(block_ids)
        with self._lock:
            state = self._state(request_id)
            key = self._chunk_key(state, chunk_index)
            self._chunks.remember(key, state, chunk_index, self.chunk_blocks)
            plan = self.cascade.prepare_store([key], session=state.request.session)
            if key not in plan.store:
                self._chunks.forgotten([key])  # kept only while some tier holds the chunk
                return False
            slot = self.cascade.reserve_slot(key)
        if slot is None:
            self.cascade.complete_store(key, ok=False)
            return False
        try:
            done = self._transfer(kernels.offload, self.layout, block_ids, slot, 0)
        except Exception:
            self.host.abort(key)
            self.cascade.complete_store(key, ok=False)
            raise
        self.metrics.bytes_moved.labels("offload").inc(self.chunk_bytes)
        ephemeral = chunk_index in state.plan.ephemeral
        if done is None:
            self._publish_store(key, ephemeral)
        else:  # the slot is published once the copy has landed; G1 blocks wait for it at release
            state.stores_done.append(done)
            self.cascade.submit(lambda: (done.synchronize(), self._publish_store(key, ephemeral)))
        return True

    def wait_layer(self, request_id: str, layer: int) -> None:
        """Order the compute stream after this request's loads of ``layer`` (``layerwise_load``): layer i+1
        keeps arriving while layer i computes. A no-op on CPU, where loads are synchronous."""
        with self._lock:
            event = self._state(request_id).layer_ready.get(layer)
        if event is not None:
            torch.cuda.current_stream(self.layout.device).wait_event(event)

    def release(self, request_id: str, stop_reason: str | None = None) -> dict[str, int]:
        """The request is over: apply its retention hints, drop its reader protection, prefetch what the
        hints ask for. ``stop_reason`` is why the response ended ("tool_use", "end_turn"), which tells the
        policy how soon the session is likely to call again. Returns the tokens this request loaded per tier."""
        with self._lock:
            state = self._requests.pop(request_id, None)
            if state is None:
                raise ValueError(f"unknown request {request_id!r}")
        self._settle_transfers(state)
        with self._lock:
            self.manager.release(state.acquired)
            self.manager.end_request(state.request.session, stop_reason=stop_reason,
                                     final=state.request.hints.session_final)
            self._apply_retention(state)
            self.cascade.set_gauges()
            below = [k for k in state.chunk_keys if (w := self.cascade.where(k)) is not None and w > G2]
        if below and (state.request.hints.prefetch or state.request.hints.next_call_delay_s):
            self.prefetch(below, state.request.session)
        return dict(state.hit_tokens)

    def prefetch(self, keys: Sequence[int], session: Hashable = None) -> Future[int]:
        """Bring chunks held only in G3/G4 up into G2 in the background, where the policy finds ``session``'s next
        call worth the room; resolves to how many came up."""
        return self.cascade.submit(self._prefetch, list(keys), session)

    # --- views, stats, lifecycle ----------------------------------------------------------------------------------
    def resident_blocks(self) -> dict[str, set[int]]:
        """The block hashes the engine holds per event medium: what a subscriber of its events must rebuild."""
        with self._lock:
            cold = set().union(*(self.cascade.held(g) for g in self.tiers if g > G2))
            return {MEDIUM_CPU: self._chunks.blocks_of(self.cascade.held(G2)),
                    MEDIUM_STORAGE: self._chunks.blocks_of(cold)}

    def held_chunks(self) -> dict[str, set[int]]:
        """Chunk keys per tier (G2..G4) in the manager's view."""
        with self._lock:
            return {TIER_NAMES[g]: set(self.cascade.held(g)) for g in self.tiers}

    def clear(self, tier: str) -> int:
        """Drop every chunk not being read from one tier (``"G2"``, ``"G3"``, ``"G4"``), without demoting:
        after a failover, to hand memory back, or to force reads from the tiers below. Returns how many."""
        g = TIER_NAMES.index(tier) if tier in TIER_NAMES else -1
        if g not in self.tiers:
            raise ValueError(f"no tier {tier!r} in this engine; it has {[TIER_NAMES[g] for g in sorted(self.tiers)]}")
        with self._lock:
            keys = [k for k in self.cascade.held(g) if self.manager.entry(k).readers == 0]
            self.cascade.discard(keys, g)
            self.cascade.set_gauges()
        return len(keys)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued demotion, eviction and prefetch has run (tests, shutdown)."""
        self.cascade.drain(timeout_s)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.cascade.close()
        if self.events is not None:
            self.events.all_cleared()
            if self._own_events:
                self.events.close()

    def __enter__(self) -> KvtierEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- moving bytes ----------------------------------------------------------------------------------------------
    def _load_from_host(self, key: int, block_ids: Sequence[int], state: _RequestState) -> bool:
        held = self.host.hold(key)
        if held is None:
            self.cascade.lost([key], G2)
            return False
        slot, let_go = held
        self._scatter(slot, block_ids, state, let_go)
        with self._lock:
            self.cascade.touch([key], state.request.session)
        return True

    def _load_from_below(self, key: int, tier: int, promotion: Promotion | None, block_ids: Sequence[int],
                         state: _RequestState) -> bool:
        """Wait for the chunk's promotion into G2 (started by ``lookup``, else now) until its deadline, then
        load it from there; when G2 has no room for it, read through a spare slot without promoting."""
        promotion = promotion or self.cascade.promote([key]).get(key)
        if promotion is None:
            return self._load_through_spare(key, tier, block_ids, state)
        return self.cascade.await_promotion(promotion) and self._load_from_host(key, block_ids, state)

    def _load_through_spare(self, key: int, tier: int, block_ids: Sequence[int], state: _RequestState) -> bool:
        """G2 has no room to promote the chunk: read it into a spare slot, load it from there, let the slot go
        (a read past ``lower_tier_deadline_ms`` is a miss and lets the slot go when it ends)."""
        slots = self.host.pool.try_alloc(1)
        if slots is None:
            return False
        view = self.host.pool.view(slots[0])[:self.chunk_bytes]
        free = partial(self.host.pool.free, slots)
        try:
            read = self.tiers[tier].get_rows_async([key], [view])[0]
            size = read.result(timeout=self.cascade.deadline_s)
        except FutureTimeout:
            self.metrics.recomputed.labels(TIER_NAMES[tier]).inc()
            read.add_done_callback(lambda _f: free())  # the slot is written until the read ends
            return False
        except Exception:  # noqa: BLE001 - tiers should not raise; if one does, it is a miss
            log.exception("kvtier: %s get failed", TIER_NAMES[tier])
            size = None
        if size != self.chunk_bytes:
            free()
            self.metrics.errors.labels(TIER_NAMES[tier], "get").inc()
            self.cascade.lost([key], tier)
            return False
        self._scatter(view, block_ids, state, free)
        return True

    def _scatter(self, slot: torch.Tensor, block_ids: Sequence[int], state: _RequestState,
                 release_slot: Callable[[], None]) -> None:
        """Load a slot into G1 blocks, layer by layer when configured. On a GPU the copies are queued on the
        side stream and the slot is let go at ``release``; on CPU they are done when this returns."""
        try:
            for layer, (part, offset) in enumerate(self._parts):
                ready = self._transfer(kernels.load, part, block_ids, slot, offset)
                if ready is not None:
                    state.layer_ready[layer] = ready
        except Exception:
            release_slot()
            raise
        if self._side is None:
            release_slot()
        else:
            state.after_loads.append(release_slot)
            if len(self._parts) == 1:  # not layer by layer: the compute stream waits for the whole chunk
                torch.cuda.current_stream(self.layout.device).wait_event(state.layer_ready[0])
        self.metrics.bytes_moved.labels("load").inc(self.chunk_bytes)

    def _transfer(self, move, part: PageLayout, block_ids: Sequence[int], slot: torch.Tensor,
                  offset: int) -> torch.cuda.Event | None:
        """One kernel batch between G1 blocks and a slot; on a GPU on the side stream after the compute
        stream's work so far, returning the event that marks its end."""
        base = self.host.slot_offset(slot) + offset
        offsets = [base + i * self.layout.block_bytes for i in range(len(block_ids))]
        if self._side is None:
            move(part, block_ids, self.host.pool.buffer, offsets, impl=self.config.transfer_impl,
                 sm_budget=self.config.sm_budget)
            return None
        self._side.wait_stream(torch.cuda.current_stream(self.layout.device))
        with torch.cuda.stream(self._side):
            move(part, block_ids, self.host.pool.buffer, offsets, impl=self.config.transfer_impl,
                 sm_budget=self.config.sm_budget)
            done = torch.cuda.Event()
            done.record(self._side)
        return done

    def _settle_transfers(self, state: _RequestState) -> None:
        """At release: G1 blocks may be reused by later compute only after this request's offloads read them,
        and slots held for loads are let go once those loads landed."""
        if self._side is not None:
            compute = torch.cuda.current_stream(self.layout.device)
            for done in state.stores_done:
                compute.wait_event(done)
            for ready in state.layer_ready.values():
                ready.synchronize()
        for release_slot in state.after_loads:
            release_slot()

    def _publish_store(self, key: int, ephemeral: bool) -> None:
        """A stored chunk's bytes are in its slot: make it visible (ephemeral chunks go to the front of
        eviction and are never copied below G2, not even by write-through)."""
        self.host.commit(key)
        if ephemeral:
            with self._lock:
                self.manager.mark_ephemeral([key])
        self.cascade.complete_store(key, ok=True)

    def _prefetch(self, keys: list[int], session: Hashable) -> int:
        """Mover: promote the chunks held only below G2; how many came up by the deadline."""
        promotions = self.cascade.promote(keys, wait=False, session=session)
        return sum(self.cascade.await_promotion(p) for p in promotions.values())

    # --- helpers ---------------------------------------------------------------------------------------------------
    def _apply_retention(self, state: _RequestState) -> None:
        report = self.manager.apply_hints(state.chunk_keys, state.request.hints, self.chunk_tokens,
                                          tenant=state.request.salt)
        if report.downgraded:
            log.info("kvtier: %d pinned chunks over the pin budget were given priority 100 instead",
                     len(report.downgraded))

    def _state(self, request_id: str) -> _RequestState:
        self._check_open()
        state = self._requests.get(request_id)
        if state is None:
            raise ValueError(f"unknown request {request_id!r}; call begin() first")
        return state

    def _keys_of(self, hashes: list[int]) -> list[int]:
        return hashes[self.chunk_blocks - 1::self.chunk_blocks]

    def _chunk_key(self, state: _RequestState, chunk_index: int) -> int:
        if not 0 <= chunk_index < len(state.chunk_keys):
            raise ValueError(f"chunk {chunk_index} out of range: the prompt has {len(state.chunk_keys)} full chunks")
        return state.chunk_keys[chunk_index]

    def _check_blocks(self, block_ids: Sequence[int]) -> None:
        if len(block_ids) != self.chunk_blocks:
            raise ValueError(f"a chunk is {self.chunk_blocks} blocks, got {len(block_ids)} block ids")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")
