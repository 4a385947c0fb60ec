"""Scheduler process: ``KvtierOffloadingManager`` answers vLLM's lookups and plans stores with kvtier's block
``Manager`` (eviction policy, agent-hint retention: pins, priorities, ephemeral chunks, the G3/G4 admission
filter) over the full tier cascade. It owns the slots (a chunk has the same slot in every rank's part) and
moves bytes below G2 itself, with the engine's own ``Cascade``: evictions are demoted G2 -> G3 -> G4 by a
background mover, one entry per rank (namespace ``tp_rank = rank``); a chunk held only in G3/G4 is promoted
into a G2 slot in the background while ``lookup`` answers ``HIT_PENDING`` (vLLM asks again next step), all
ranks or none. A failed, damaged or late (``lower_tier_deadline_ms``) promotion answers ``MISS`` and vLLM
recomputes: no worker job ever fails, which vLLM would assert on. An evicted chunk keeps its G2 slot until
the mover wrote it below; while every spare slot is busy that way, stores and promotions wait for the mover
(up to ``lower_tier_deadline_ms``: vLLM never offers a finished request's chunks again), then a store waits a
step (all of a request's chunks or none: vLLM does not offer again what a partial answer leaves out), and a
lookup finding no free slot answers ``RETRY``. A chunk answered ``HIT``, or ``HIT_PENDING`` while it is
promoted, is held until the request's load (or store, or end) is planned, so a later promotion for the same
request cannot evict it (to promote it again). ``reset_cache`` forgets every tier; the chunks of jobs in flight
stay fenced (``MISS``) until vLLM reports them flushed, and reads in flight from before the reset are never
served.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    LoadStoreSpec,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingGaugeMetadata,
    OffloadingManager,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
)

from kvtier.cascade import G2, G4, TIER_NAMES, Cascade, spare_slots
from kvtier.config import KvtierConfig
from kvtier.events import MEDIUM_CPU
from kvtier.hashing import Namespace
from kvtier.hints import TENANT_FIELD, AgentHints, HintError, parse_hints
from kvtier.integrations.common import engine_key
from kvtier.integrations.vllm.ranks import lower_tiers, rank_namespace
from kvtier.manager import ManagerError
from kvtier.manager.core import uncount
from kvtier.metrics import EngineMetrics
from kvtier.tiers.host import HostPool, HostTier
from kvtier.tiers.shared_region import SharedRegion

log = logging.getLogger(__name__)


HINTS_FIELD = "agent_hints"
PROBE_WAIT_S = 0.002  # how long a lookup waits in-line for Redis to say whether it holds an unknown chunk
_PROBING = object()   # _find_below: Redis has not answered yet
MAX_PROBES = 256      # probes remembered before expired ones are dropped

# vLLM >= 0.33 enters ``manager.lock`` around every manager call; 0.32 (its CPU build) has no such lock and
# calls the manager bare, while kvtier's tier threads land promotions and demotions concurrently.
VLLM_HOLDS_MANAGER_LOCK = hasattr(OffloadingManager, "lock")


def _locked(method):
    """Run a manager method under the manager's lock where vLLM does not hold it for us (0.32)."""
    if VLLM_HOLDS_MANAGER_LOCK:
        return method

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


# vLLM 0.33 tells the manager when the jobs in flight at a reset are done (on_reset_flushed); 0.32 flushes them in
# the next step and drops their completions without a word, so the manager counts schedule ends instead (one for the
# step that flushes, one more for a step scheduled ahead of it, one spare).
VLLM_REPORTS_RESET_FLUSHED = hasattr(OffloadingManager, "on_reset_flushed")
RESET_FLUSH_STEPS = 3

# Prometheus series kvtier adds to vLLM's /metrics (through OffloadingSpec.build_metric_definitions)
LOADED_TOKENS = "vllm:kvtier_loaded_tokens"
PROMOTED_CHUNKS = "vllm:kvtier_promoted_chunks"
REFUSED_STORES = "vllm:kvtier_refused_store_chunks"
RESIDENT_CHUNKS = "vllm:kvtier_resident_chunks"
REQUESTS = "vllm:kvtier_requests"
PINNED_CHUNKS = "vllm:kvtier_pinned_chunks"
SESSIONS = "vllm:kvtier_sessions"
METRIC_DEFINITIONS = {
    LOADED_TOKENS: OffloadingCounterMetadata(
        "Tokens of the chunks kvtier loaded into vLLM's KV cache, by the tier that held them when they were "
        "looked up (G2; G3 or G4 when promoted for that load)", ("tier",)),
    PROMOTED_CHUNKS: OffloadingCounterMetadata(
        "Chunks read from a lower tier into G2, by source tier and outcome (ok, failed)", ("tier", "outcome")),
    REFUSED_STORES: OffloadingCounterMetadata(
        "Chunks vLLM offered that kvtier did not store, by reason (full: no room this step, busy: G2's free slots "
        "still held by demotions after lower_tier_deadline_ms, policy: declined)", ("reason",)),
    RESIDENT_CHUNKS: OffloadingGaugeMetadata("Chunks each kvtier tier holds", ("tier",)),
    REQUESTS: OffloadingCounterMetadata(
        "Requests kvtier saw, by what their kv_transfer_params.agent_hints carried (session: a session id; "
        "no_session: none; invalid: hints that did not parse, ignored)", ("hints",)),
    PINNED_CHUNKS: OffloadingCounterMetadata(
        "Chunks agent hints pinned (pinned), or asked to pin beyond pin_budget_frac (over_budget: priority 100 "
        "for the lease instead)", ("outcome",)),
    SESSIONS: OffloadingGaugeMetadata("Agent sessions whose chunks some kvtier tier holds", ()),
}


class KvtierChunksSpec(BlockIDsLoadStoreSpec):
    """Where chunks live in G2: ``block_ids`` are host-pool slot numbers, one per chunk."""


@dataclass
class _RequestHints:
    hints: AgentHints
    tenant: str | None = None                              # whose pin budget its pins count against
    chunks: dict[int, int] = field(default_factory=dict)   # chunk index -> kvtier key

    def ordered_keys(self) -> list[int]:
        """The request's chunk keys from chunk 0 up to the first one not seen."""
        out = []
        while len(out) in self.chunks:
            out.append(self.chunks[len(out)])
        return out


class KvtierOffloadingManager(OffloadingManager):
    """vLLM's scheduler-side view of kvtier's tiers: G2 slots in the shared region, then G3 and G4.

    Chunk keys are one per chunk for all ranks; a chunk sits in the same slot of every rank's part of G2,
    and in G3/G4 as one entry per rank (``RankedTier``). A chunk held only below G2 is promoted into a G2
    slot in the background: ``lookup`` answers ``HIT_PENDING`` until it landed (vLLM asks again next step),
    then ``HIT``; a failed, damaged or late read answers ``MISS`` (vLLM recomputes), never a failed job.
    """

    def __init__(self, namespace: Namespace, regions: Sequence[SharedRegion], part_bytes: int, num_slots: int,
                 chunk_bytes: int, chunk_tokens: int, cfg: KvtierConfig, enable_events: bool) -> None:
        self.config = cfg
        self.namespace = namespace
        self.num_slots = num_slots
        self.chunk_bytes = chunk_bytes
        self.chunk_tokens = chunk_tokens
        self.metrics = EngineMetrics()
        self._lock = threading.RLock()
        self._closed = False
        self._regions = list(regions)
        self._offload_key: dict[int, OffloadKey] = {}   # chunks some tier holds or is writing
        # readers this manager holds: chunks answered HIT, per request, until its load (or store, or end) is
        # planned, so a later promotion cannot evict them; and the readers of vLLM's load jobs
        self._protected: dict[str, set[int]] = {}
        self._job_readers: Counter[int] = Counter()
        # jobs in flight at a reset_cache that vLLM will never complete: their chunks until on_reset_flushed
        self._fenced_readers: Counter[int] = Counter()
        self._fenced_stores: set[int] = set()
        self._steps_since_reset: int | None = None  # vLLM 0.32: schedule ends since a reset not yet flushed
        self._landing_waits: dict[int, float] = {}  # deadline of lookups waiting for a demotion's write
        self._events: list[OffloadingEvent] | None = [] if enable_events else None
        self._evicted_now: list[OffloadKey] = []
        self._stats = OffloadingConnectorStats()
        self._probes: dict[int, tuple[futures.Future, float]] = {}  # Redis asked whether it holds a chunk
        self._prober = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-probe")
        self._promoted_from: dict[int, int] = {}  # chunks in G2 because a lookup promoted them: source tier
        self._short_of_slots: set[str] = set()  # requests answered RETRY in this schedule (no free G2 slot)
        parts = [r.buffer[:num_slots * part_bytes] for r in self._regions]
        pool = HostPool(num_slots * part_bytes, part_bytes, pin=False, buffer=parts[0])
        lower = lower_tiers(cfg, namespace, len(parts), parts, chunk_bytes)
        spare = spare_slots(num_slots) if lower else 0   # the spec checked that G2 holds more than these
        self.cascade = Cascade(cfg, self.metrics, HostTier(rank_namespace(namespace, 0, len(parts)), pool,
                                                           own_pool=True),
                               lower, unit=part_bytes * len(parts), chunk_bytes=chunk_bytes, spare_host_slots=spare,
                               lock=self._lock, events=self)
        # the cascade's, named here for this manager's own calls and for callers that inspect it
        self.manager, self.host, self.tiers = self.cascade.manager, self.cascade.host, self.cascade.tiers

    @property
    def lock(self):
        return self._lock

    # --- keys and requests -----------------------------------------------------------------------------------
    def key(self, offload_key: OffloadKey) -> int:
        return engine_key(self.namespace, offload_key)

    def _keys(self, offload_keys: Iterable[OffloadKey], ctx: ReqContext | None, remember: bool = False) -> list[int]:
        """kvtier keys of vLLM's; ``remember`` keeps vLLM's key for events (for chunks about to enter a tier)."""
        state = ctx.get_state(_RequestHints) if ctx is not None else None
        out = []
        for ok in offload_keys:
            k = self.key(ok)
            if remember:
                self._offload_key[k] = ok
            end = ctx.get_offload_key_position(ok) if state is not None else None
            if end is not None:
                state.chunks[(end - 1) // self.chunk_tokens] = k
            out.append(k)
        return out

    @_locked
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        params = req_context.kv_transfer_params or {}
        try:
            hints = parse_hints(params.get(HINTS_FIELD)) if isinstance(params, dict) else AgentHints()
            kind = "session" if hints.session_id is not None else "no_session"
        except HintError as exc:
            log.warning("kvtier: request %s: ignoring agent_hints: %s", req_context.req_id, exc)
            hints, kind = AgentHints(), "invalid"
        self._stats.increase_counter(REQUESTS, 1, (kind,))
        tenant = params.get(TENANT_FIELD) if isinstance(params, dict) else None
        req_context.set_state(_RequestHints(hints, tenant if isinstance(tenant, str) else None))
        self.manager.begin_request(hints.session_id, hints=hints)
        return RequestOffloadingContext()

    @staticmethod
    def _session(ctx: ReqContext) -> str | None:
        """The session the request's hints name: every manager call of the request is made for it (requests
        interleave, so the manager keeps no "current" one)."""
        state = ctx.get_state(_RequestHints)
        return state.hints.session_id if state is not None else None

    @_locked
    def on_request_finished(self, req_context: ReqContext) -> None:
        """The response ended: the policy learns each session's gap after it (vLLM does not say why it ended)."""
        state = req_context.get_state(_RequestHints)
        self._unprotect(req_context.req_id)
        if state is not None:
            self.manager.end_request(state.hints.session_id, final=state.hints.session_final)
        self._apply_hints(req_context, finished=True)
        if state is not None and (state.hints.prefetch or state.hints.next_call_delay_s):
            self._prefetch(state.ordered_keys(), state.hints.session_id)

    def _prefetch(self, keys: list[int], session: str | None) -> None:
        """Start promoting the chunks held only in G3/G4, in order, while G2 has room for them (the policy weighs
        the session's next call against what it would evict)."""
        for k in keys:
            where = self.cascade.where(k)
            if where is None or where == G2 or self.cascade.promotion(k) is not None or \
                    self.cascade.is_landing(k, where):
                continue
            offload_key = self._offload_key.get(k)
            if offload_key is not None and not self._promote(offload_key, k, wait=False, session=session):
                return

    def _apply_hints(self, ctx: ReqContext, finished: bool = False) -> None:
        """Retention from the request's hints, over the chunks stored so far: as each store completes (so a pin
        holds from then on), and once more when the request ends (counted then, once per request)."""
        state = ctx.get_state(_RequestHints)
        if state is None or state.hints == AgentHints():
            return
        report = self.manager.apply_hints(state.ordered_keys(), state.hints, self.chunk_tokens, tenant=state.tenant)
        if finished:
            self._stats.increase_counter(PINNED_CHUNKS, len(report.pinned), ("pinned",))
            self._stats.increase_counter(PINNED_CHUNKS, len(report.downgraded), ("over_budget",))
        if report.downgraded:
            log.info("kvtier: %d pinned chunks over the pin budget were given priority 100 instead",
                     len(report.downgraded))

    # --- loads ---------------------------------------------------------------------------------------------------
    @_locked
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        (k,) = self._keys([key], req_context)
        if k in self._fenced_readers or k in self._fenced_stores:
            return LookupResult.MISS  # in use by a job vLLM dropped at a reset: gone once it is flushed
        where = self.cascade.where(k)
        if where is None and self.cascade.promotion(k) is None and k not in self.cascade.writing(G2):
            where = self._find_below(k)
            if where is _PROBING:
                return LookupResult.HIT_PENDING
        if where == G2:
            self._protect(req_context.req_id, k)
            return LookupResult.HIT
        if where is not None and self.cascade.is_landing(k, where):  # just demoted, not written below yet
            now = time.monotonic()
            if now <= self._landing_waits.setdefault(k, now + self.config.lower_tier_deadline_ms / 1000):
                return LookupResult.HIT_PENDING
            self.metrics.recomputed.labels(TIER_NAMES[where]).inc()
            return LookupResult.MISS  # a slow or backed-up write: recompute rather than wait on it
        self._landing_waits.pop(k, None)
        promotion = self.cascade.promotion(k)
        if promotion is not None:
            # a read from before a reset (forgotten when it lands), or a late one (vLLM recomputes; it still
            # lands in G2 for later requests): a miss
            if not self.cascade.current(promotion) or not self.cascade.in_time(promotion):
                return LookupResult.MISS
            self._protect(req_context.req_id, k)
            return LookupResult.HIT_PENDING
        if k in self.cascade.writing(G2):
            return LookupResult.HIT_PENDING  # a store in flight
        if where is not None and (req_context.req_id in self._short_of_slots or self.host.pool.free_slots == 0):
            # every spare slot is a demotion in flight: a slot frees up shortly. The request's later chunks wait
            # with this one even if the mover frees a slot meanwhile: promotions stay in prefix order, so no
            # chunk past the prefix G2 can hold takes a slot and is then evicted for the chunks before it
            self._short_of_slots.add(req_context.req_id)
            return LookupResult.RETRY
        if where is None or not self._promote(key, k, wait=True):
            self.metrics.lookups.labels("none", "miss").inc()
            return LookupResult.MISS
        self.metrics.lookups.labels(TIER_NAMES[where], "hit").inc()
        # held for this request from now: landed before vLLM asks again, it must not make room for a chunk
        # this same request promotes next (a pass that reaches it late would promote it again: thrashing)
        self._protect(req_context.req_id, k)
        return LookupResult.HIT_PENDING

    def _find_below(self, key: int) -> int | object | None:
        """A chunk this manager never placed may still be in Redis, written by another process or machine (what
        an earlier process left on disk the cascade adopted at start). Found, it is recorded in the manager (no
        write) and answered like any chunk held there. Redis is asked on a probe thread, waited for
        ``PROBE_WAIT_S`` here, then across steps (``_PROBING``: vLLM asks again) until
        ``lower_tier_deadline_ms``, so a slow Redis never stalls the scheduler."""
        if G4 not in self.tiers:
            return None
        probe = self._probes.get(key)
        if probe is None:
            now = time.monotonic()
            if len(self._probes) >= MAX_PROBES:  # probes no lookup came back for (aborted requests)
                self._probes = {k: p for k, p in self._probes.items() if p[1] > now}
            deadline = now + self.config.lower_tier_deadline_ms / 1000
            probe = (self._prober.submit(self.tiers[G4].contains, [key]), deadline)
            self._probes[key] = probe
            futures.wait([probe[0]], timeout=PROBE_WAIT_S)
        future, deadline = probe
        if not future.done():
            if time.monotonic() <= deadline:
                return _PROBING
            del self._probes[key]
            self.metrics.recomputed.labels("G4").inc()
            return None
        del self._probes[key]
        if not self.cascade.guarded(G4, "contains", lambda: future.result()[0], False):
            return None
        return G4 if self.cascade.adopt([key], G4) else None

    def _protect(self, req_id: str, key: int) -> None:
        protected = self._protected.setdefault(req_id, set())
        if key not in protected and self.manager.locate(key) is not None:  # a promotion's source may be lost
            self.manager.acquire([key])
            protected.add(key)

    def _unprotect(self, req_id: str) -> None:
        self.manager.release(self._protected.pop(req_id, ()))

    def _promote(self, offload_key: OffloadKey, key: int, wait: bool, session: str | None = None) -> bool:
        """Start reading a chunk held only below into a reserved G2 slot (``wait``: a lookup waits for it, so its
        deadline runs from now; else a prefetch of ``session``'s, whose runs from the first lookup); False when G2
        has no room."""
        self._offload_key[key] = offload_key  # its events name vLLM's key
        return key in self.cascade.promote([key], wait=wait, session=session)

    def _slot(self, key: int) -> int:
        with self.host.borrow(key) as view:
            if view is None:
                raise ManagerError(f"chunk {key:#x} is not in G2")
            return self.host.slot_offset(view) // self.host.pool.slot_bytes

    @_locked
    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        ks = self._keys(keys, req_context)
        self.manager.acquire(ks)
        self._job_readers.update(ks)
        self._unprotect(req_context.req_id)
        self.cascade.touch(ks, self._session(req_context))
        for k in ks:
            source = TIER_NAMES[self._promoted_from.pop(k, G2)]
            self._stats.increase_counter(LOADED_TOKENS, self.chunk_tokens, (source,))
        return KvtierChunksSpec([self._slot(k) for k in ks])

    @_locked
    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.cascade.touch(self._keys(keys, req_context), self._session(req_context))

    @_locked
    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        ks = self._keys(keys, req_context)
        self.manager.release(ks)
        uncount(self._job_readers, ks)

    # --- stores --------------------------------------------------------------------------------------------------
    @_locked
    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        ks = self._keys(keys, req_context, remember=True)
        self._unprotect(req_context.req_id)  # its loads are planned by now
        g2, writing = self.cascade.held(G2), self.cascade.writing(G2)
        held = [k for k in dict.fromkeys(ks) if k in g2]
        wanted = [k for k in dict.fromkeys(ks) if k not in g2 and k not in writing]
        self._evicted_now = []
        self.manager.acquire(held)  # vLLM: keys passed in must not be evicted by this call
        try:
            plan = self.cascade.prepare_store(ks, session=self._session(req_context))
        finally:
            self.manager.release(held)
        evicted, self._evicted_now = self._evicted_now, []
        stored = set(plan.store)
        self.forgotten([k for k in wanted if k not in stored])
        if wanted and not plan.store:
            if set(plan.declined) == set(wanted):  # the policy will not take them: no point asking again
                self._stats.increase_counter(REFUSED_STORES, len(wanted), ("policy",))
                return PrepareStoreOutput([], KvtierChunksSpec([]), evicted)
            self._stats.increase_counter(REFUSED_STORES, len(wanted), ("full",))
            return None  # no room now (everything pinned or in use): vLLM retries next step
        deadline = time.monotonic() + self.cascade.deadline_s   # one wait for all of them, not one each
        views = [self.cascade.reserve_slot(key, deadline) for key in plan.store]
        if any(view is None for view in views):
            # the slots of chunks just evicted stayed busy past the wait for the mover to demote them: all or
            # nothing (vLLM does not offer again what a partial answer leaves out), vLLM retries next step
            for key, view in zip(plan.store, views):
                if view is not None:
                    self.host.abort(key)
            for key in plan.store:
                self.cascade.complete_store(key, ok=False)
            self._stats.increase_counter(REFUSED_STORES, len(plan.store), ("busy",))
            return None
        slots = [self.host.slot_offset(view) // self.host.pool.slot_bytes for view in views]
        return PrepareStoreOutput([self._offload_key[k] for k in plan.store], KvtierChunksSpec(slots), evicted)

    @_locked
    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        pending = self.cascade.writing(G2)
        for k in self._keys(keys, req_context):
            if k in pending and self.cascade.promotion(k) is None:
                (self.host.commit if success else self.host.abort)(k)
                self.cascade.complete_store(k, ok=success)
        if success:
            self._apply_hints(req_context)

    # --- events (the cascade's ChunkEvents) ------------------------------------------------------------------
    def stored(self, keys: list[int], medium: str) -> None:
        self._publish(keys, medium, removed=False)

    def removed(self, keys: list[int], medium: str) -> None:
        if medium == MEDIUM_CPU:
            self._evicted_now += [self._offload_key[k] for k in keys if k in self._offload_key]
            for k in keys:
                self._promoted_from.pop(k, None)
        self._publish(keys, medium, removed=True)

    def _publish(self, keys: list[int], medium: str, removed: bool) -> None:
        offload_keys = [self._offload_key[k] for k in keys if k in self._offload_key]
        if self._events is not None and offload_keys:
            storage = medium != MEDIUM_CPU
            # removal_expected: vLLM keeps a STORAGE chunk's block metadata until its removal is announced
            self._events.append(OffloadingEvent(keys=offload_keys, removed=removed,
                                                medium=Medium.STORAGE if storage else Medium.CPU,
                                                removal_expected=storage and not removed))

    def promoted(self, key: int, g: int, ok: bool) -> None:
        self._stats.increase_counter(PROMOTED_CHUNKS, 1, (TIER_NAMES[g], "ok" if ok else "failed"))
        if ok:
            self._promoted_from[key] = g

    def forgotten(self, keys: list[int]) -> None:
        for key in keys:
            if self.manager.locate(key) is None and not any(key in self.cascade.writing(g) for g in self.tiers):
                self._offload_key.pop(key, None)
                self._promoted_from.pop(key, None)
                self._landing_waits.pop(key, None)

    def get_stats(self) -> OffloadingConnectorStats:
        """What kvtier did since vLLM last asked (once per step), plus each tier's chunk count."""
        with self._lock:
            stats, self._stats = self._stats, OffloadingConnectorStats()
            for g in self.tiers:
                stats.set_gauge(RESIDENT_CHUNKS, len(self.cascade.held(g)), (TIER_NAMES[g],))
            stats.set_gauge(SESSIONS, self.manager.sessions_held(), ())
        return stats

    def take_events(self) -> Iterable[OffloadingEvent]:
        with self._lock:
            if not self._events:
                return ()
            events, self._events = self._events, []
            return events

    # --- housekeeping -------------------------------------------------------------------------------------------
    @_locked
    def has_pending_work(self) -> bool:
        return self.cascade.promotions_in_flight() > 0

    @_locked
    def reset_cache(self) -> None:
        """Forget every chunk in every tier (vLLM's reset_prefix_cache with the connector). vLLM never completes
        the jobs in flight at a reset: their chunks (loads reading, stores being written) are answered MISS and
        dropped with their slots once the workers reported those jobs (``on_reset_flushed``)."""
        for req_id in list(self._protected):
            self._unprotect(req_id)
        self.cascade.reset()
        self._landing_waits.clear()
        self._probes.clear()
        self._fenced_readers.update(self._job_readers)
        self._job_readers.clear()
        self._fenced_stores |= {k for k in self.cascade.writing(G2) if self.cascade.promotion(k) is None}
        self._discard_unused()
        if not VLLM_REPORTS_RESET_FLUSHED:
            self._steps_since_reset = 0

    @_locked
    def on_schedule_end(self, context: Any) -> None:
        self._short_of_slots.clear()
        if self._steps_since_reset is None:
            return
        self._steps_since_reset += 1
        if self._steps_since_reset >= RESET_FLUSH_STEPS:
            self._steps_since_reset = None
            self.on_reset_flushed()

    @_locked
    def on_reset_flushed(self) -> None:
        """The workers reported every job in flight at the last reset: release what they held, then forget it."""
        fenced = [*self._fenced_readers, *self._fenced_stores]
        for key, readers in self._fenced_readers.items():
            self.manager.release([key] * readers)
        for key in self._fenced_stores:
            self.host.abort(key)
            self.cascade.complete_store(key, ok=False)
        self._fenced_readers.clear()
        self._fenced_stores.clear()
        self._discard_unused(fenced)  # chunks stored since the reset stay

    def _discard_unused(self, keys: Collection[int] | None = None) -> None:
        """Forget ``keys`` (default: every chunk) in every tier, except where a reader still holds one."""
        for g in self.tiers:
            held = self.cascade.held(g)
            candidates = list(held) if keys is None else [k for k in keys if k in held]
            self.cascade.discard([k for k in candidates if self.manager.entry(k).readers == 0], g)

    def config_info(self) -> Sequence[dict[str, Any]]:
        return ({"kvtier_host_chunks": self.num_slots, "kvtier_policy": self.config.policy,
                 "kvtier_namespace": self.namespace.prefix,
                 "kvtier_tiers": ",".join(TIER_NAMES[g] for g in sorted(self.tiers))},)

    def stats(self, tier: str = "G2") -> dict[str, float]:
        """One tier's counters in the manager's view (hits are counted by vLLM), plus ``chunks`` held."""
        with self._lock:
            return self.cascade.stats(TIER_NAMES.index(tier))

    def held(self, tier: str) -> set[int]:
        """The chunk keys ``tier`` ("G2", "G3", "G4") holds in the manager's view."""
        return set(self.cascade.held(TIER_NAMES.index(tier)))

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until queued demotions and deletions ran and promotions landed (tests, shutdown)."""
        self.cascade.drain(timeout_s)

    def shutdown(self) -> None:
        """Finish queued demotions, close the tiers, unmap the shared region (vLLM calls this without the lock)."""
        with self._lock:
            if self._closed:
                return
        self.drain()
        with self._lock:
            self._closed = True
        self._prober.shutdown(wait=True)
        self.cascade.close()
        for region in self._regions:
            region.close()
