"""Moving chunks between G2 and the tiers below it: one ``Cascade``, used by composition by the engine and the
vLLM plug-in.

A ``Cascade`` owns the block ``Manager`` (the one record of what each tier holds) over a G2 ``HostTier`` and
optional G3 (``DiskTier``) and G4 (``RemoteTier``), and is the manager's listener: an eviction the manager decides
on is demoted by a background mover (G2 -> G3 -> G4), a chunk held only below is promoted back into a reserved G2
slot, and every lower-tier failure (error, damage, loss) makes the manager forget the chunk there, so it becomes
a miss, never an exception.

Its owner says how tier changes are published through ``ChunkEvents`` (``stored``, ``removed``, ``forgotten``).
All manager state is guarded by the owner's lock, which the cascade shares; I/O runs outside it on the mover or
the tiers' threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from kvtier.config import KvtierConfig
from kvtier.events import MEDIUM_CPU, MEDIUM_STORAGE
from kvtier.manager import Manager, TierSpec
from kvtier.manager.core import StorePlan, uncount
from kvtier.manager.tier import TIER_NAMES
from kvtier.metrics import EngineMetrics
from kvtier.tiers.base import Tier, guarded
from kvtier.tiers.host import HostTier

G1, G2, G3, G4 = 0, 1, 2, 3
UNBOUNDED = 2**62  # G4's size is the server's business (maxmemory); its evictions surface as misses
T = TypeVar("T")


SPARE_SLOTS = 2  # at least this many G2 slots stay outside the manager's capacity when G3/G4 exist


def spare_slots(num_slots: int) -> int:
    """G2 slots the manager never fills when tiers sit below it: a chunk evicted for demotion keeps its slot until
    the mover wrote it below, and G3 -> G4 moves pass through one. A sixteenth of G2 (at least ``SPARE_SLOTS``)
    absorbs a step's demotions; beyond that, stores and promotions wait for the mover (``reserve_slot``)."""
    return max(SPARE_SLOTS, num_slots // 16)


class ChunkEvents(Protocol):
    """How a cascade's owner publishes tier changes; called under the owner's lock."""

    def stored(self, keys: list[int], medium: str) -> None:
        """``keys`` entered a medium (``CPU`` for G2, ``STORAGE`` for G3/G4 together)."""

    def removed(self, keys: list[int], medium: str) -> None:
        """``keys`` left a medium."""

    def forgotten(self, keys: list[int]) -> None:
        """``keys`` may have left their last tier: drop what the owner keeps per chunk if no tier holds it."""

    def promoted(self, key: int, g: int, ok: bool) -> None:
        """A promotion of ``key`` from tier ``g`` ended: the chunk is in G2 (``ok``), or was forgotten below."""


@dataclass(eq=False)
class Promotion:
    """A chunk being read from G3/G4 into its reserved G2 slot. It settles itself when the read ends (the chunk
    enters G2, or is forgotten where it was damaged or lost); a waiter only decides how long it waits."""

    key: int
    tier: int                      # the G-number it is read from
    epoch: int                     # ``Cascade.reset`` calls before it started: a read from before one is never served
    deadline: float | None         # ``time.monotonic()`` a waiter gives up at; None (a prefetch) until one waits
    landed: threading.Event = field(default_factory=threading.Event)
    ok: bool = False               # set before ``landed``: the chunk is in G2
    late: bool = False             # a waiter gave up on it (counted as recomputed); it still lands for later use


class Cascade:
    """G2 and the tiers below under one manager; see the module docstring."""

    def __init__(self, config: KvtierConfig, metrics: EngineMetrics, host: HostTier, lower: Mapping[int, Tier], *,
                 unit: int, chunk_bytes: int, spare_host_slots: int, lock: threading.RLock,
                 events: ChunkEvents) -> None:
        """The manager over ``host`` (less ``spare_host_slots``, which absorb chunks in flight) and ``lower``
        (G3 and/or G4), capacities counted in ``unit`` bytes per chunk; ``chunk_bytes`` is what one chunk fills
        of a G2 slot (what a lower tier stores and returns). ``lock`` is the owner's (an RLock: the manager calls
        back into the cascade while it is held)."""
        self.config = config
        self.metrics = metrics
        self.host = host
        self.unit = unit
        self.chunk_bytes = chunk_bytes
        self.lock = lock
        self.events = events
        self.closed = False
        self.tiers: dict[int, Tier] = {G2: host, **lower}
        specs = [TierSpec("G1", 0), TierSpec("G2", (host.pool.num_slots - spare_host_slots) * unit)]
        if G3 in lower:
            # counted in the chunks the disk really holds (an extent is a header page plus the payload), so the
            # manager evicts (and demotes to G4) before the disk is full: a full disk skips the write
            specs.append(TierSpec("G3", max(1, lower[G3].capacity_chunks - spare_host_slots) * unit,
                                  config.admission_min_hits))
        if G4 in lower:
            specs.append(TierSpec("G4", UNBOUNDED, config.admission_min_hits))
        # manager tier index -> G-number (G3 may be absent while G4 is present)
        self._gnum = [G1, G2] + sorted(g for g in self.tiers if g > G2)
        self._index = {g: i for i, g in enumerate(self._gnum)}
        self.manager = Manager(specs, config.policy, write_through=config.write_through,
                               pin_budget_frac=config.pin_budget_frac,
                               tenant_pin_budget_frac=config.tenant_pin_budget_frac, pin_lease_s=config.pin_lease_s,
                               block_bytes=unit, listener=self)
        # (key, G-number) of demotions the manager already lists below whose bytes are not written yet
        self._landing: Counter[tuple[int, int]] = Counter()
        self._landed = threading.Condition(self.lock)  # notified when a demotion's write ended (its slot is free)
        self._mover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-mover")
        self._promotions: dict[int, Promotion] = {}
        self._epoch = 0
        self.deadline_s = config.lower_tier_deadline_ms / 1000  # how long a request waits for a lower tier
        self._adopt_what_lower_tiers_hold()

    def _adopt_what_lower_tiers_hold(self) -> None:
        """The manager's record starts with what the local tiers below already hold (a disk's index rebuilt
        after a restart): tiers never evict on their own, so chunks the manager does not know would fill them for
        good. What does not fit the manager's capacity is deleted."""
        for g, tier in self.tiers.items():
            held_keys = getattr(tier, "held_keys", None)
            if g == G2 or held_keys is None:
                continue
            keys = held_keys()
            kept = set(self.adopt(keys, g))
            extra = [k for k in keys if k not in kept]
            if extra:
                tier.delete(extra)

    # --- the manager's view and decisions, by G-number: the one tier id its users see -------------------------
    def prefix_hits(self, keys: Sequence[int]) -> dict[int, int]:
        """Under the lock: the leading ``keys`` some tier holds (the prefix rule), counted per G-number, each
        key under the deepest tier the prefix up to it needs."""
        hits, prev, out = self.manager.lookup(keys), 0, {}
        for i, total in enumerate(hits):
            if self._gnum[i] != G1:
                out[self._gnum[i]] = total - prev
            prev = total
        return out

    def prepare_store(self, keys: Sequence[int], session: Hashable = None) -> StorePlan:
        """Under the lock: G2 room for ``keys`` (see ``Manager.prepare_store``); then ``reserve_slot`` each."""
        return self.manager.prepare_store(keys, self._index[G2], session=session)

    def touch(self, keys: Sequence[int], session: Hashable = None) -> None:
        """Under the lock: a use of chunks G2 serves, by a request of ``session``."""
        self.manager.touch(keys, self._index[G2], session)

    def discard(self, keys: Iterable[int], g: int) -> None:
        """Under the lock: forget ``keys`` in tier ``g`` and free their bytes there."""
        self.manager.discard(keys, self._index[g])

    def adopt(self, keys: Sequence[int], g: int) -> list[int]:
        """Under the lock: record chunks tier ``g`` holds that this process never placed (no write)."""
        return self.manager.adopt(keys, self._index[g])

    def where(self, key: int) -> int | None:
        """Under the lock: the G-number of the fastest tier holding ``key``, or None."""
        i = self.manager.locate(key)
        return None if i is None else self._gnum[i]

    def held(self, g: int) -> dict[int, int]:
        """Under the lock: the chunks tier ``g`` holds (key -> bytes), the manager's record itself."""
        return self.manager.tiers[self._index[g]].sizes

    def writing(self, g: int) -> dict[int, int]:
        """Under the lock: the chunks reserved in tier ``g`` whose bytes are not written yet."""
        return self.manager.tiers[self._index[g]].pending

    def stats(self, g: int) -> dict[str, float]:
        """Under the lock: tier ``g``'s counters in the manager's view, plus the ``chunks`` it holds."""
        return {**self.manager.stats()[self._index[g]], "chunks": len(self.held(g))}

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run ``fn`` on the mover, after every demotion queued so far."""
        return self._mover.submit(fn, *args)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued demotion, eviction and prefetch has run and every promotion has landed."""
        self._mover.submit(lambda: None).result(timeout=timeout_s)
        with self.lock:
            in_flight = list(self._promotions.values())
        for promotion in in_flight:
            promotion.landed.wait(timeout_s)

    # --- manager listener: demotions and evictions ---------------------------------------------------------------
    def on_demote(self, src: int, dst: int, keys: list[int]) -> None:
        """Called under the lock, before ``src`` frees the keys: queue the copies for the mover."""
        g_src, g_dst = self._gnum[src], self._gnum[dst]
        self.metrics.demotions.labels(TIER_NAMES[g_src], TIER_NAMES[g_dst]).inc(len(keys))
        newly_stored = [k for k in keys if not self._in_storage(k, exclude=dst)]
        self.events.stored(newly_stored, MEDIUM_STORAGE)
        self._landing.update((k, g_dst) for k in keys)
        if g_src == G2:  # hold the slots now: the entries are dropped right after this call
            self._mover.submit(self._write_down, [(k, self.host.hold(k)) for k in keys], g_dst)
        else:
            self._mover.submit(self._move_down, keys, g_src, g_dst)

    def on_evict(self, tier: int, keys: list[int]) -> None:
        """Called under the lock after the manager forgot ``keys`` in ``tier``: free the bytes."""
        g = self._gnum[tier]
        if g == G1:
            return
        self.metrics.evictions.labels(TIER_NAMES[g]).inc(len(keys))
        if g == G2:
            self.host.delete(keys)
            self.events.removed(keys, MEDIUM_CPU)
        else:
            self._mover.submit(self._delete_below, keys, g)
            self.events.removed([k for k in keys if not self._in_storage(k)], MEDIUM_STORAGE)
        self.events.forgotten(keys)

    # --- the mover ------------------------------------------------------------------------------------------------
    def _write_down(self, held: list[tuple[int, tuple[torch.Tensor, Callable[[], None]] | None]], g_dst: int) -> None:
        """Mover: write G2 slots (held since ``on_demote``) into G3/G4, then let the slots go."""
        keys = [k for k, hold in held if hold is not None]
        lost = [k for k, hold in held if hold is None]  # not in G2 after all: nothing to write
        try:
            views = [hold[0] for _, hold in held if hold is not None]
            results = self.guarded(g_dst, "put", lambda: self.tiers[g_dst].put(keys, views), [False] * len(keys))
        finally:
            for _, hold in held:
                if hold is not None:
                    hold[1]()
        self._after_put(keys + lost, results + [False] * len(lost), g_dst)

    def _move_down(self, keys: list[int], g_src: int, g_dst: int) -> None:
        """Mover: G3 -> G4 through a spare host slot (queued before the G3 delete, so the file still exists)."""
        for key in keys:
            slots = self.host.pool.try_alloc(1)
            if slots is None:
                self._after_put([key], [False], g_dst)
                continue
            try:
                view = self.host.pool.view(slots[0])[:self.chunk_bytes]
                got = self.guarded(g_src, "get", lambda: self.tiers[g_src].get([key], [view]), [None])[0]
                ok = got == self.chunk_bytes and \
                    self.guarded(g_dst, "put", lambda: self.tiers[g_dst].put([key], [view]), [False])[0]
            finally:
                self.host.pool.free(slots)
            self._after_put([key], [ok], g_dst)

    def _after_put(self, keys: list[int], results: list[bool], g_dst: int) -> None:
        with self.lock:
            uncount(self._landing, ((k, g_dst) for k in keys))
            self._landed.notify_all()
        failed = [k for k, ok in zip(keys, results) if not ok]
        self.metrics.bytes_moved.labels(f"demote_{TIER_NAMES[g_dst]}").inc((len(keys) - len(failed)) * self.chunk_bytes)
        if failed:
            self.metrics.errors.labels(TIER_NAMES[g_dst], "put").inc(len(failed))
            self.lost(failed, g_dst)

    def _delete_below(self, keys: list[int], g: int) -> None:
        self.guarded(g, "delete", lambda: self.tiers[g].delete(keys), None)

    def complete_store(self, key: int, ok: bool) -> None:
        """A G2 store or promotion the manager planned ended: record the chunk in G2 (``ok``) or drop it."""
        with self.lock:
            self.manager.complete_store([key], self._index[G2], ok=ok)
            if ok:
                self.events.stored([key], MEDIUM_CPU)
            else:
                self.events.forgotten([key])
            self.set_gauges()

    def lost(self, keys: list[int], g: int) -> None:
        """A tier does not have what the manager thinks it has (failed write, damage, expiry): forget it. A
        read that missed a chunk still being written there proves nothing: that one stays."""
        with self.lock:
            if not self.closed:
                self.discard([k for k in keys if (k, g) not in self._landing], g)

    def demotions_in_flight(self) -> int:
        """Under the lock: demotions the manager lists below whose bytes are not written yet."""
        return sum(self._landing.values())

    def is_landing(self, key: int, g: int) -> bool:
        """Under the lock: the manager lists ``key`` in ``g`` but its demotion has not been written yet."""
        return (key, g) in self._landing

    def guarded(self, g: int, op: str, call: Callable[[], T], default: T) -> T:
        """``call`` against tier ``g``: an exception is logged, counted as an error of ``op`` and ``default``."""
        return guarded(f"{TIER_NAMES[g]} {op}", call, default, self.metrics.errors.labels(TIER_NAMES[g], op).inc)

    def _in_storage(self, key: int, exclude: int | None = None) -> bool:
        return any(key in self.manager.tiers[i].sizes for g, i in self._index.items() if g > G2 and i != exclude)

    def set_gauges(self) -> None:
        """Each tier's resident bytes, from the manager's record."""
        for g, i in self._index.items():
            if g > G1:
                self.metrics.resident_bytes.labels(TIER_NAMES[g]).set(self.manager.tiers[i].used)

    # --- promotion: start, poll or wait with a deadline, reset epochs ----------------------------------------------
    def promote(self, keys: Sequence[int], *, wait: bool = True, session: Hashable = None) -> dict[int, Promotion]:
        """Start reading the chunks among ``keys`` held only below G2 (not already coming up) into reserved G2
        slots, each tier's share in one batched read; chunks G2 has no room for are left out. ``wait``: a request
        waits for them, so the deadline counts from now, and a chunk just demoted is read once its write below
        ended (until the deadline); else (a prefetch) that chunk is left out and the deadline counts from the
        first waiter, and the policy decides whether the chunks of ``session`` deserve G2's room. Returns the
        promotions started."""
        deadline = time.monotonic() + self.deadline_s if wait else None
        started: dict[int, Promotion] = {}
        batches: dict[int, dict[int, torch.Tensor]] = {}
        with self.lock:
            for key in keys:
                g = self.where(key) if deadline is None else self._where_written(key, deadline)
                if g is None or g == G2 or key in self._promotions or self.is_landing(key, g):
                    continue
                slot = self._reserve_promotion(key, prefetch=not wait, session=session)
                if slot is not None:
                    started[key] = self._promotions[key] = Promotion(key, g, self._epoch, deadline)
                    batches.setdefault(g, {})[key] = slot
        for g, slots in batches.items():
            try:
                futures = self.tiers[g].get_rows_async(list(slots), list(slots.values()))
            except Exception as exc:  # noqa: BLE001 - a tier raising here fails the batch's reads (misses)
                futures = [Future() for _ in slots]
                for future in futures:
                    future.set_exception(exc)
            for key, future in zip(slots, futures):
                future.add_done_callback(lambda f, p=started[key]: self._read_ended(p, f))
        return started

    def _where_written(self, key: int, deadline: float) -> int | None:
        """Under the lock: where ``key`` is once a demotion of it in flight has been written (the lock is released
        while waiting); still landing at ``deadline``, the promotion skips it like a prefetch does."""
        while (g := self.where(key)) is not None and self.is_landing(key, g) and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._landed.wait(left)
        return g

    def promotion(self, key: int) -> Promotion | None:
        """Under the lock: the promotion of ``key`` in flight, if any."""
        return self._promotions.get(key)

    def promotions_in_flight(self) -> int:
        with self.lock:
            return len(self._promotions)

    def current(self, promotion: Promotion) -> bool:
        """Under the lock: started after the last ``reset`` (a read from before one is never served)."""
        return promotion.epoch == self._epoch

    def in_time(self, promotion: Promotion) -> bool:
        """Under the lock, for a caller that polls (vLLM asks again next step): whether it is still worth waiting
        for; the deadline starts now for a prefetch no one waited for yet."""
        if promotion.deadline is None:
            promotion.deadline = time.monotonic() + self.deadline_s
        if not promotion.late and time.monotonic() > promotion.deadline:
            self._give_up(promotion)
        return not promotion.late

    def await_promotion(self, promotion: Promotion) -> bool:
        """Wait for a promotion until its deadline (from now for a prefetch): True when its chunk is in G2. A late
        one is a miss for this waiter and still lands for later requests."""
        with self.lock:
            if promotion.deadline is None:
                promotion.deadline = time.monotonic() + self.deadline_s
        if promotion.landed.wait(max(0.0, promotion.deadline - time.monotonic())):
            return promotion.ok
        with self.lock:
            if not promotion.late:
                self._give_up(promotion)
        return False

    def reset(self) -> None:
        """Under the lock: promotions in flight now are never served (their reads land and are dropped)."""
        self._epoch += 1

    def _give_up(self, promotion: Promotion) -> None:
        promotion.late = True
        self.metrics.recomputed.labels(TIER_NAMES[promotion.tier]).inc()

    def _read_ended(self, promotion: Promotion, future: Future[int | None]) -> None:
        """A promotion's read ended (on a tier's I/O thread): the chunk enters G2, or is forgotten where it was
        damaged or lost; a read from before a reset is given up and its chunk forgotten wherever no reader holds
        it."""
        key, g = promotion.key, promotion.tier
        ok = self.guarded(g, "get", future.result, None) == self.chunk_bytes
        with self.lock:
            del self._promotions[key]
            stale = not self.current(promotion)
            if not self.closed:
                self._settle_promotion(key, ok and not stale)
                if stale:
                    entry = self.manager.entry(key)
                    if entry is not None and entry.readers == 0:
                        for tier in [t for t in self.tiers if key in self.held(t)]:
                            self.discard([key], tier)
                elif ok:
                    self.metrics.bytes_moved.labels(f"promote_{TIER_NAMES[g]}").inc(self.chunk_bytes)
                else:
                    self.metrics.errors.labels(TIER_NAMES[g], "get").inc()
                    self.lost([key], g)
                if not stale:
                    self.events.promoted(key, g, ok)
            promotion.ok = ok and not stale and not self.closed
        promotion.landed.set()

    def _reserve_promotion(self, key: int, prefetch: bool, session: Hashable) -> torch.Tensor | None:
        """Under the lock: a G2 reservation and slot for a chunk held below, or None when G2 has no room (or, for a
        prefetch, the policy would rather keep what is there). ``promote`` reads the chunk into the slot, then
        ``_read_ended`` settles it."""
        promoted = key in self.manager.prepare_store([key], self._index[G2], session=session, prefetch=prefetch).store
        slot = self.reserve_slot(key) if promoted else None
        if slot is None and promoted:
            self.complete_store(key, ok=False)
        return slot

    def reserve_slot(self, key: int, deadline: float | None = None) -> torch.Tensor | None:
        """Under the lock: the G2 slot for a store or promotion the manager planned. The chunks it evicted keep
        their slots until the mover wrote them below; while those hold every free slot, wait for the mover (the
        lock released meanwhile), up to ``lower_tier_deadline_ms``: vLLM never offers a refused store again once
        its request has ended. A batch of stores passes one ``deadline`` (``time.monotonic()``) for all its slots.
        None when no slot came (or the key is already stored or being written)."""
        if deadline is None:
            deadline = time.monotonic() + self.deadline_s
        while (slot := self.host.reserve(key, self.chunk_bytes)) is None and self._landing and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._landed.wait(left)
        return slot

    def _settle_promotion(self, key: int, ok: bool) -> None:
        """The read into the reserved slot of ``key`` ended: publish the chunk in G2, or give the slot back."""
        (self.host.commit if ok else self.host.abort)(key)
        self.complete_store(key, ok=ok)

    def close(self) -> None:
        """Stop every user of G2's slots before G2: the mover, then the lower tiers from the bottom up (closing
        one waits for its queued I/O, which reads, checksums or fills slots: late promotions, writes), then
        the host tier, whose pool memory goes last."""
        with self.lock:
            self.closed = True
            self._landed.notify_all()
        self._mover.shutdown(wait=True)
        for g in sorted(self.tiers, reverse=True):
            self.tiers[g].close()
