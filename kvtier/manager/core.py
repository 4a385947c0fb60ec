"""The block manager: which chunk lives in which tier, for how long, and what moves when space runs out.

Sizes only; bytes are moved by whoever listens (the engine). The index is a struct of dicts rather than an
object per entry so that a request of thousands of blocks costs a few dict operations per block.

Lifecycle rules, all checked (``ManagerError`` on violation):
- a key with readers or a write in flight (``acquire`` / ``prepare_store``) is never evicted;
- ``release`` and ``complete_store`` must match an earlier ``acquire`` / ``prepare_store``;
- eviction from tier k writes the key into tier k+1 only if it is worth keeping (not ephemeral, passes k+1's
  admission filter) and not already there (write once, read many); otherwise it is dropped;
- a key that leaves its last tier loses its retention state; nothing else forgets a key.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvtier.hints import DEFAULT_PRIORITY, AgentHints, block_plan
from kvtier.manager.policies import Key, make_policy
from kvtier.manager.tier import EPHEMERAL, HIGH, LANE_NAMES, LOW, NORMAL, PINNED, TierSpec, TierState

FIRST_COLD_TIER = 2  # G3 and below: admission filter applies, ephemeral keys never go there


class ManagerError(RuntimeError):
    """A lifecycle rule was broken (double release, completing a store that was never prepared, ...)."""


class ManagerListener(Protocol):
    """How the engine learns what to move. Called synchronously, demotions before the source is freed."""

    def on_demote(self, src: int, dst: int, keys: list[Key]) -> None:
        """Copy ``keys`` from tier ``src`` into ``dst`` (an eviction's demotion, or write-through)."""

    def on_evict(self, tier: int, keys: list[Key]) -> None: ...


@dataclass
class StorePlan:
    store: list[Key]                                            # keys the caller must now write
    evicted: list[tuple[Key, int, int | None]] = field(default_factory=list)  # (key, from tier, demoted to)
    declined: list[Key] = field(default_factory=list)           # refused by the policy's admission, not for room


@dataclass
class PinReport:
    pinned: list[Key] = field(default_factory=list)
    downgraded: list[Key] = field(default_factory=list)   # over the pin budget: given top priority instead
    missing: list[Key] = field(default_factory=list)      # not held by any tier


@dataclass(frozen=True)
class EntryInfo:
    key: Key
    tiers: tuple[int, ...]
    bytes: int
    readers: int
    lane: str
    priority: int
    priority_expiry: float | None
    pin_expiry: float | None
    frequency: int
    session: Hashable


class Manager:
    def __init__(self, tiers: Sequence[TierSpec], policy: str = "agent", *, policy_kwargs: dict | None = None,
                 write_through: bool = False, pin_budget_frac: float = 0.5, tenant_pin_budget_frac: float = 1.0,
                 pin_lease_s: float = 600.0,
                 block_bytes: int = 1, listener: ManagerListener | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not tiers:
            raise ValueError("a manager needs at least one tier")
        if not 0.0 <= pin_budget_frac <= 1.0 or not 0.0 <= tenant_pin_budget_frac <= 1.0:
            raise ValueError(f"pin_budget_frac and tenant_pin_budget_frac must be within [0, 1], got "
                             f"{pin_budget_frac}, {tenant_pin_budget_frac}")
        self.tenant_pin_budget_frac = tenant_pin_budget_frac
        if block_bytes <= 0 or pin_lease_s <= 0:
            raise ValueError("block_bytes and pin_lease_s must be positive")
        self.block_bytes = block_bytes
        self.write_through = write_through
        self.pin_lease_s = pin_lease_s
        self.listener = listener
        self._clock = clock
        # The configured policy orders the first tier that holds anything (where requests store: G1 in a replay,
        # G2 under an engine); the tiers below hold what it let go and keep leaf-first LRU order. Measured on the
        # synthetic regimes with G2 = 4x and G3 = 16x G1 at 1% (benchmarks/RESULTS.md): hits from any tier
        # .791 -> .889 (agentic), .802 -> .845 (crowded), .859 -> .891 (subagents) against the agent policy in
        # every tier, with a fifth of the G3 writes. The offline bound (belady) stays in every tier.
        top = next((i for i, spec in enumerate(tiers) if spec.capacity > 0), 0)
        self.tiers = [TierState(spec, make_policy(policy, spec.capacity // block_bytes, **(policy_kwargs or {}))
                                if i <= top or policy == "belady" else make_policy("lru", spec.capacity // block_bytes),
                                int(spec.capacity * pin_budget_frac)) for i, spec in enumerate(tiers)]
        self._busy: dict[Key, int] = {}        # readers + writes in flight
        self._writing: dict[tuple[Key, int], None] = {}
        self._lane: dict[Key, int] = {}        # absent: NORMAL
        self._priority: dict[Key, tuple[int, float]] = {}
        self._pin_expiry: dict[Key, float] = {}
        self._pin_owner: dict[Key, Hashable] = {}   # pinned keys -> the tenant whose budget they count against
        self._expiries: list[tuple[float, int, Key]] = []
        self._seq = 0
        self._track_freq = any(spec.admission_min_hits > 1 for spec in tiers)
        self._freq: dict[Key, int] = {}
        # the session each key was stored for: where a store completes, a key is demoted or re-laned, the policy
        # is told whose it is (requests interleave, so "the request that called last" is nobody's in particular)
        self._session_of: dict[Key, Hashable] = {}
        self._session_keys: Counter[Hashable] = Counter()   # session -> keys credited to it

    # --- queries -------------------------------------------------------------------------------------------
    def locate(self, key: Key) -> int | None:
        """The fastest tier holding ``key`` (0 = G1), or None."""
        for i, tier in enumerate(self.tiers):
            if key in tier.sizes:
                return i
        return None

    def lookup(self, keys: Sequence[Key]) -> list[int]:
        """Prefix hits per tier: ``hits[k]`` leading keys are each held by some tier 0..k."""
        hits = [0] * len(self.tiers)
        depth = 0
        for key in keys:
            where = self.locate(key)
            if where is None:
                break
            depth = max(depth, where)
            hits[depth] += 1
        for k in range(1, len(hits)):
            hits[k] += hits[k - 1]
        return hits

    def entry(self, key: Key) -> EntryInfo | None:
        tiers = tuple(i for i, t in enumerate(self.tiers) if key in t.sizes)
        if not tiers:
            return None
        priority, expiry = self._priority.get(key, (DEFAULT_PRIORITY, None))
        return EntryInfo(key, tiers, self.tiers[tiers[0]].sizes[key], self._busy.get(key, 0),
                         LANE_NAMES[self._lane.get(key, NORMAL)], priority, expiry, self._pin_expiry.get(key),
                         self._freq.get(key, 0), self._session_of.get(key))

    def __contains__(self, key: Key) -> bool:
        return self.locate(key) is not None

    # --- request context ---------------------------------------------------------------------------------------
    def begin_request(self, session: Hashable = None, now: float | None = None,
                      hints: AgentHints | None = None) -> float:
        now = self._clock() if now is None else now
        if self._expiries and self._expiries[0][0] <= now:
            self.tick(now)
        delay = hints.next_call_delay_s if hints is not None else None
        for tier in self.tiers:
            tier.policy.begin_request(session, now, delay)
        return now

    def end_request(self, session: Hashable = None, now: float | None = None, stop_reason: str | None = None,
                    final: bool = False) -> None:
        """A response of ``session`` finished (see ``Policy.end_request``); the server knows why it stopped, and
        the client may have said it was the session's last request (``final``)."""
        now = self._clock() if now is None else now
        for tier in self.tiers:
            tier.policy.end_request(session, now, stop_reason, final)

    def credit(self, keys: Iterable[Key], session: Hashable) -> None:
        """Record ``keys`` as stored for ``session`` (the policy orders them as its when they enter a tier)."""
        session_of, counts = self._session_of, self._session_keys
        for key in keys:
            old = session_of.get(key)
            if old != session:
                if old is not None:
                    uncount(counts, (old,))
                session_of[key] = session
                counts[session] += 1

    def sessions_held(self) -> int:
        """Sessions with keys credited to them that some tier holds or is writing."""
        return len(self._session_keys)

    # --- engine / connector API ----------------------------------------------------------------------------------
    def touch(self, keys: Sequence[Key], tier: int = 0, session: Hashable = None) -> None:
        """Record a use by a request of ``session`` of keys the caller holds (hits it is about to serve)."""
        held = self.tiers[tier].sizes
        lane = self._lane
        self.tiers[tier].policy.touch_request([k for k in keys if k in held and k not in lane], (), session)
        if self._track_freq:
            for key in keys:
                self._freq[key] = self._freq.get(key, 0) + 1

    def acquire(self, keys: Iterable[Key]) -> None:
        """Readers in flight: until ``release``, these keys are not evicted from any tier."""
        busy = self._busy
        for key in keys:
            if self.locate(key) is None:
                raise ManagerError(f"acquire of a key no tier holds: {key!r}")
            busy[key] = busy.get(key, 0) + 1

    def release(self, keys: Iterable[Key]) -> None:
        busy = self._busy
        for key in keys:
            count = busy.get(key, 0)
            if count <= 0:
                raise ManagerError(f"release without acquire: {key!r}")
            if count == 1:
                del busy[key]
            else:
                busy[key] = count - 1

    def prepare_store(self, keys: Sequence[Key], tier: int = 0, nbytes: Sequence[int] | None = None,
                      session: Hashable = None, *, prefetch: bool = False) -> StorePlan:
        """Reserve room in ``tier`` for the keys it neither holds nor is writing (deduplicated), stored for a
        request of ``session`` (None: no session, e.g. a promotion, which keeps the session that stored the key).
        Returns what the caller must write and what was evicted to make room (with demotion targets). Reserved
        keys are invisible to ``lookup`` and cannot be evicted until ``complete_store``.

        Which keys get room: the policy's admission decides in the last tier, where what it evicts is lost, and
        for a ``prefetch`` (keys a lower tier holds, only maybe wanted soon). A store into a tier with one below it
        always gets room: whatever it evicts is demoted, not lost, while a refused store would be recomputed."""
        if nbytes is not None and len(nbytes) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(nbytes)} sizes")
        if nbytes is not None and any(n <= 0 for n in nbytes):
            raise ValueError("entry sizes must be positive")
        self._check_tier(tier)
        state = self.tiers[tier]
        wanted = [k for k in dict.fromkeys(keys) if k not in state.sizes and k not in state.pending]
        sizes = dict(zip(keys, nbytes)) if nbytes is not None else None
        evicted: list[tuple[Key, int, int | None]] = []
        declined: list[Key] = []
        stored = self._store(tier, wanted, self._busy, sizes, evicted, pending=True, declined=declined,
                             session=session, admit=prefetch or tier + 1 == len(self.tiers))
        for key in stored:
            self._busy[key] = self._busy.get(key, 0) + 1
        if session is not None:
            self.credit(stored, session)
        return StorePlan(list(stored), evicted, declined)

    def complete_store(self, keys: Sequence[Key], tier: int = 0, ok: bool = True) -> None:
        """The writes of ``prepare_store`` finished (``ok``) or failed (the reservation is dropped)."""
        self._check_tier(tier)
        state = self.tiers[tier]
        for key in keys:
            if key not in state.pending:
                raise ManagerError(f"complete_store without prepare_store: {key!r} in tier {tier}")
        self.release(keys)
        lane = self._lane
        written_then_ephemeral = []   # marked ephemeral while written below G2, where ephemeral keys never stay
        for key in keys:
            size = state.pending.pop(key)
            if ok and (tier < FIRST_COLD_TIER or lane.get(key) != EPHEMERAL):
                state.sizes[key] = size
                self._place(state, key, lane.get(key, NORMAL))
                continue
            state.used -= size
            state.stats.writes -= 1
            state.stats.write_bytes -= size
            state.stats.refused += 1
            if ok:
                written_then_ephemeral.append(key)
        if written_then_ephemeral and self.listener is not None:
            self.listener.on_evict(tier, written_then_ephemeral)
        if not ok or written_then_ephemeral:
            self._forget([k for k in keys if self.locate(k) is None and k not in self._busy])
        if ok and self.write_through:  # a copy into every tier below (G4 too, so other machines see it); the source keeps it
            durable = [k for k in keys if lane.get(k) != EPHEMERAL]
            for lower in range(tier + 1, len(self.tiers)):
                copied = self._store(lower, durable, self._busy, None, None)
                if self.listener is not None and copied:
                    self.listener.on_demote(tier, lower, list(copied))

    def adopt(self, keys: Sequence[Key], tier: int) -> list[Key]:
        """Record chunks ``tier`` already holds that this manager never placed there (written by an earlier
        process to its disk, or by another machine to Redis), so they hit without being written again.
        Admission does not apply (the bytes are there, nothing is written); room is made as for a store.
        Returns the keys recorded (a prefix of the new ones, as many as fit)."""
        self._check_tier(tier)
        state = self.tiers[tier]
        before = (state.stats.writes, state.stats.write_bytes)
        recorded = list(self._store(tier, keys, self._busy, adopted=True))
        state.stats.writes, state.stats.write_bytes = before
        return recorded

    def discard(self, keys: Iterable[Key], tier: int) -> None:
        """A tier lost these keys (failed write, checksum mismatch, remote expiry): forget them there."""
        self._check_tier(tier)
        state = self.tiers[tier]
        lane = self._lane
        gone = []
        for key in keys:
            if key in state.sizes:
                state.lane_remove(key, lane.get(key, NORMAL), self._pin_owner.get(key))
                state.used -= state.sizes.pop(key)
                gone.append(key)
        self._forget([k for k in gone if self.locate(k) is None and k not in self._busy])
        if self.listener is not None and gone:
            self.listener.on_evict(tier, gone)

    # --- retention -----------------------------------------------------------------------------------------------
    def pin(self, keys: Iterable[Key], lease_s: float | None = None, now: float | None = None,
            owner: Hashable = None) -> PinReport:
        """Pin (or renew the lease of) held keys for ``lease_s``, on behalf of ``owner`` (a tenant; None: the
        deployment). A pin that would exceed the pin budget of a tier holding the key, or the owner's share of it
        (``tenant_pin_budget_frac``), is downgraded to priority 100 for the same duration, and reported."""
        now = self._clock() if now is None else now
        lease = self.pin_lease_s if lease_s is None else lease_s
        if lease <= 0:
            raise ValueError(f"pin lease must be positive, got {lease}")
        report = PinReport()
        for key in keys:
            holders = [t for t in self.tiers if key in t.sizes]
            if not holders:
                report.missing.append(key)
                continue
            if self._lane.get(key) != PINNED:
                if any(t.pinned_bytes + t.sizes[key] > t.pin_budget or (owner is not None and t.pinned_by[owner]
                       + t.sizes[key] > t.pin_budget * self.tenant_pin_budget_frac) for t in holders):
                    report.downgraded.append(key)
                    self.set_priority([key], 100, lease, now)
                    continue
                self._pin_owner[key] = owner
                self._relane(key, PINNED)
            self._pin_expiry[key] = now + lease
            self._push_expiry(now + lease, key)
            report.pinned.append(key)
        return report

    def unpin(self, keys: Iterable[Key]) -> None:
        for key in keys:
            if self._pin_expiry.pop(key, None) is not None:
                self._relane(key, self._lane_after_pin(key))

    def set_priority(self, keys: Iterable[Key], priority: int, duration_s: float, now: float | None = None) -> None:
        """Priority 0-100 for ``duration_s``; then the keys decay to the default (the policy's order)."""
        if not 0 <= priority <= 100:
            raise ValueError(f"priority must be within 0..100, got {priority}")
        if duration_s <= 0:
            raise ValueError(f"priority duration must be positive, got {duration_s}")
        now = self._clock() if now is None else now
        for key in keys:
            if self.locate(key) is None:
                continue
            if priority == DEFAULT_PRIORITY:
                self._priority.pop(key, None)
            else:
                self._priority[key] = (priority, now + duration_s)
                self._push_expiry(now + duration_s, key)
            if self._lane.get(key, NORMAL) not in (PINNED, EPHEMERAL):
                self._relane(key, self._lane_after_pin(key))

    def mark_ephemeral(self, keys: Iterable[Key]) -> None:
        """Reasoning / scratch blocks: evicted first, never demoted, dropped from G3/G4 if already there.
        Pinned keys stay pinned; a key being read from G3/G4 is left as it is (its readers need it). A key
        still being written (``prepare_store``) enters the ephemeral lane when its store completes."""
        for key in keys:
            if self.locate(key) is None:
                if any(key in t.pending for t in self.tiers):
                    self._lane[key] = EPHEMERAL
                continue
            if self._lane.get(key) == PINNED:
                continue
            cold = [i for i in range(FIRST_COLD_TIER, len(self.tiers)) if key in self.tiers[i].sizes]
            if cold and key in self._busy:
                continue
            self._relane(key, EPHEMERAL)
            for i in cold:
                self.discard([key], i)

    def apply_hints(self, keys: Sequence[Key], hints: AgentHints, block_size: int,
                    now: float | None = None, tenant: Hashable = None) -> PinReport:
        """Map a request's hints onto its blocks (``keys[i]`` = tokens ``[i*bs, (i+1)*bs)``); its pins count
        against ``tenant``'s share of the pin budget."""
        now = self._clock() if now is None else now
        plan = block_plan(hints, len(keys), block_size)
        self.mark_ephemeral([keys[i] for i in plan.ephemeral])
        for blocks, priority, duration in plan.priorities:
            self.set_priority([keys[i] for i in blocks], priority, duration, now)
        report = PinReport()
        for lease, blocks in plan.pins.items():
            got = self.pin([keys[i] for i in blocks], lease, now, tenant)
            report.pinned += got.pinned
            report.downgraded += got.downgraded
            report.missing += got.missing
        return report

    def tick(self, now: float | None = None) -> None:
        """Expire pin leases and priorities that are due."""
        now = self._clock() if now is None else now
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expiry, _, key = heapq.heappop(heap)
            if self._pin_expiry.get(key) == expiry:
                del self._pin_expiry[key]
                self._relane(key, self._lane_after_pin(key, now))
            prio = self._priority.get(key)
            if prio is not None and prio[1] == expiry:
                del self._priority[key]
                if self._lane.get(key, NORMAL) in (LOW, HIGH):
                    self._relane(key, NORMAL)

    # --- checks --------------------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise ``ManagerError`` if any bookkeeping disagrees (used by the stateful tests)."""
        lane = self._lane
        for i, t in enumerate(self.tiers):
            total = sum(t.sizes.values()) + sum(t.pending.values())
            _require(t.used == total, f"tier {i}: used {t.used} != held {total}")
            _require(t.used <= t.capacity, f"tier {i}: used {t.used} > capacity {t.capacity}")
            normal = [k for k in t.sizes if lane.get(k, NORMAL) == NORMAL]
            _require(len(t.policy) == len(normal), f"tier {i}: policy holds {len(t.policy)}, normal {len(normal)}")
            _require(all(k in t.policy for k in normal), f"tier {i}: a normal key is missing from the policy")
            _require(set(t.ephemeral) == {k for k in t.sizes if lane.get(k) == EPHEMERAL}, f"tier {i}: ephemeral")
            _require(set(t.low) == {k for k in t.sizes if lane.get(k) == LOW}, f"tier {i}: low lane")
            _require(set(t.high) == {k for k in t.sizes if lane.get(k) == HIGH}, f"tier {i}: high lane")
            pinned = sum(s for k, s in t.sizes.items() if lane.get(k) == PINNED)
            _require(t.pinned_bytes == pinned, f"tier {i}: pinned bytes {t.pinned_bytes} != {pinned}")
            by_owner = Counter()
            for k, s in t.sizes.items():
                if lane.get(k) == PINNED:
                    by_owner[self._pin_owner.get(k)] += s
            _require(t.pinned_by == +by_owner, f"tier {i}: pinned bytes by owner {t.pinned_by} != {by_owner}")
            _require(not set(t.sizes) & set(t.pending), f"tier {i}: a key both held and pending")
            if i >= FIRST_COLD_TIER:
                _require(not t.ephemeral, f"tier {i}: ephemeral key below G2")
        for key, count in self._busy.items():
            _require(count > 0, f"busy count {count} for {key!r}")
            _require(self.locate(key) is not None or any(key in t.pending for t in self.tiers),
                     f"busy key {key!r} held nowhere")
        for key in list(lane) + list(self._pin_expiry) + list(self._priority):
            _require(self.locate(key) is not None or any(key in t.pending for t in self.tiers),
                     f"retention state for a key held nowhere: {key!r}")

    def stats(self) -> list[dict[str, float]]:
        return [dict(name=t.spec.name, capacity=t.capacity, used=t.used, **t.stats.as_dict()) for t in self.tiers]

    # --- internals -----------------------------------------------------------------------------------------------
    def _check_tier(self, tier: int) -> None:
        if not 0 <= tier < len(self.tiers):
            raise ValueError(f"tier {tier} out of range (0..{len(self.tiers) - 1})")

    def _push_expiry(self, when: float, key: Key) -> None:
        self._seq += 1
        heapq.heappush(self._expiries, (when, self._seq, key))

    def _lane_after_pin(self, key: Key, now: float = -math.inf) -> int:
        prio = self._priority.get(key)
        if prio is None or prio[1] <= now:
            return NORMAL
        return LOW if prio[0] < DEFAULT_PRIORITY else HIGH

    def _relane(self, key: Key, new: int) -> None:
        old = self._lane.get(key, NORMAL)
        priority = self._priority.get(key, (DEFAULT_PRIORITY, 0.0))[0]
        if old == new and new not in (LOW, HIGH):
            return
        for t in self.tiers:
            if key in t.sizes:
                t.lane_remove(key, old, self._pin_owner.get(key))
        if old == PINNED:
            self._pin_owner.pop(key, None)
        if new == NORMAL:
            self._lane.pop(key, None)
        else:
            self._lane[key] = new
        for t in self.tiers:
            if key in t.sizes:
                self._place(t, key, new, priority)

    def _place(self, state: TierState, key: Key, lane: int, priority: int | None = None) -> None:
        if priority is None:
            priority = self._priority.get(key, (DEFAULT_PRIORITY, 0.0))[0]
        state.lane_add(key, lane, priority, self._session_of.get(key), self._pin_owner.get(key))

    def _store(self, ti: int, keys: Sequence[Key], protect, sizes: dict[Key, int] | None = None,
               evicted: list | None = None, *, pending: bool = False, declined: list | None = None,
               adopted: bool = False, session: Hashable = None, admit: bool = True) -> Sequence[Key]:
        """Make room in tier ``ti`` and add the keys that fit (a prefix of the admitted ones). Keys go to their
        lane, except normal keys of G1 in ``access``, which ``touch_request`` hands to the policy."""
        state = self.tiers[ti]
        lane = self._lane
        if ti > 0:  # deduplicate: write once
            keys = [k for k in keys if k not in state.sizes and k not in state.pending]
        if ti >= FIRST_COLD_TIER and not adopted:
            floor = state.spec.admission_min_hits
            ok = [k for k in keys if lane.get(k) != EPHEMERAL and (floor <= 1 or self._freq.get(k, 0) >= floor)]
            state.stats.refused += len(keys) - len(ok)
            keys = ok
        if not keys:
            return ()
        admitted = state.policy.admit(keys, session) if admit and not adopted else keys
        if declined is not None and len(admitted) < len(keys):
            declined.extend(set(keys).difference(admitted))
        keys = admitted
        unit = self.block_bytes
        need = len(keys) * unit if sizes is None else sum(sizes[k] for k in keys)
        deficit = state.used + need - state.capacity
        if deficit > 0:
            victims = state.choose_victims(deficit, max(unit, 1), protect)
            if victims:
                self._evicted(ti, victims, evicted)
            if state.used + need > state.capacity:
                keys = self._fit(state, keys, sizes)
        target = state.pending if pending else state.sizes
        if sizes is None:
            target.update(dict.fromkeys(keys, unit))
            added = len(keys) * unit
        else:
            added = 0
            for k in keys:
                target[k] = sizes[k]
                added += sizes[k]
        state.used += added
        state.stats.writes += len(keys)
        state.stats.write_bytes += added
        if not pending and (ti > 0 or lane):
            for k in keys:
                if ti > 0 or lane.get(k, NORMAL) != NORMAL:
                    self._place(state, k, lane.get(k, NORMAL))
        return keys

    def _fit(self, state: TierState, keys: Sequence[Key], sizes: dict[Key, int] | None) -> Sequence[Key]:
        room = state.capacity - state.used
        out = []
        for k in keys:
            size = self.block_bytes if sizes is None else sizes[k]
            if size > room:
                break  # prefix rule: what follows a missing block is useless
            room -= size
            out.append(k)
        state.stats.refused += len(keys) - len(out)
        return out

    def _evicted(self, ti: int, victims: list[Key], evicted: list | None) -> None:
        state = self.tiers[ti]
        sizes = state.sizes
        freed = 0
        for k in victims:
            freed += sizes.pop(k)
        state.used -= freed
        state.stats.evictions += len(victims)
        demoted: Sequence[Key] = ()
        if ti + 1 < len(self.tiers):
            below = self.tiers[ti + 1]
            lane = self._lane
            worth = [k for k in victims if lane.get(k) != EPHEMERAL and k not in below.sizes and k not in below.pending]
            if worth:
                demoted = self._store(ti + 1, worth, self._busy, None, evicted)
                state.stats.demotions_out += len(demoted)
                if self.listener is not None and demoted:
                    self.listener.on_demote(ti, ti + 1, list(demoted))
        if evicted is not None:
            down = set(demoted)
            evicted.extend((k, ti, ti + 1 if k in down else None) for k in victims)
        if self.listener is not None:
            self.listener.on_evict(ti, victims)
        if self._lane or self._freq or self._session_of or self._priority or self._pin_expiry:
            self._forget([k for k in victims if self.locate(k) is None and k not in self._busy])

    def _forget(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._lane.pop(key, None)
            self._priority.pop(key, None)
            self._pin_expiry.pop(key, None)
            self._pin_owner.pop(key, None)
            self._freq.pop(key, None)
            session = self._session_of.pop(key, None)
            if session is not None:
                uncount(self._session_keys, (session,))


def uncount(counter: Counter, items: Iterable[Hashable]) -> None:
    """Take one of each item off ``counter``, dropping the items that reach zero (``in`` stays meaningful)."""
    for item in items:
        counter[item] -= 1
        if counter[item] <= 0:
            del counter[item]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ManagerError(message)
