"""Moving chunks between G2 and the tiers below it, shared by the engine and the vLLM plug-in.

``TierCascade`` is the block ``Manager``'s listener over a G2 ``HostTier`` and optional G3 (``DiskTier``)
and G4 (``RemoteTier``): an eviction the manager decides on is demoted by a background mover (G2 -> G3 ->
G4), a chunk held only below is promoted back into a reserved G2 slot, and every lower-tier failure
(error, damage, loss) makes the manager forget the chunk there, so it becomes a miss, never an exception.

A subclass provides how its tier changes are published: ``_publish_stored(keys, medium)``,
``_publish_removed(keys, medium)`` and ``_forget_meta(keys)`` (drop what it keeps per chunk once no tier
holds it). All manager state is guarded by ``_lock``; I/O runs outside it on the mover or the tiers' threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from kvtier.config import KvtierConfig
from kvtier.events import MEDIUM_CPU, MEDIUM_STORAGE
from kvtier.manager import Manager, TierSpec
from kvtier.metrics import EngineMetrics
from kvtier.tiers.base import Tier, guarded
from kvtier.tiers.host import HostTier

G1, G2, G3, G4 = 0, 1, 2, 3
TIER_NAMES = ("G1", "G2", "G3", "G4")
UNBOUNDED = 2**62  # G4's size is the server's business (maxmemory); its evictions surface as misses


def uncount(counter: Counter, items: Iterable[Hashable]) -> None:
    """Take one of each item off ``counter``, dropping the items that reach zero (``in`` stays meaningful)."""
    for item in items:
        counter[item] -= 1
        if counter[item] <= 0:
            del counter[item]


class TierCascade:
    """G2 and the tiers below under one manager; see the module docstring. Call ``_build_cascade`` first."""

    config: KvtierConfig
    metrics: EngineMetrics
    chunk_bytes: int          # the bytes of one chunk in a G2 slot (what a lower tier stores and returns)
    _lock: object             # an RLock: the manager calls back into the listener while it is held
    _closed: bool

    def _build_cascade(self, config: KvtierConfig, host: HostTier, lower: Mapping[int, Tier], unit: int,
                       spare_host_slots: int) -> None:
        """The manager over ``host`` (less ``spare_host_slots``, which absorb chunks in flight) and ``lower``
        (G3 and/or G4), capacities counted in ``unit`` bytes per chunk."""
        self.host = host
        self.unit = unit
        self.tiers: dict[int, Tier] = {G2: host, **lower}
        specs = [TierSpec("G1", 0), TierSpec("G2", (host.pool.num_slots - spare_host_slots) * unit)]
        if G3 in lower:
            # counted in the chunks the disk really holds (an extent is a header page plus the payload), so the
            # manager evicts (and demotes to G4) before the disk tier would drop chunks on its own
            specs.append(TierSpec("G3", max(1, lower[G3].capacity_chunks - spare_host_slots) * unit,
                                  config.admission_min_hits))
        if G4 in lower:
            specs.append(TierSpec("G4", UNBOUNDED, config.admission_min_hits))
        # manager tier index -> G-number (G3 may be absent while G4 is present)
        self._gnum = [G1, G2] + sorted(g for g in self.tiers if g > G2)
        self._index = {g: i for i, g in enumerate(self._gnum)}
        self.manager = Manager(specs, config.policy, write_through=config.write_through,
                               pin_budget_frac=config.pin_budget_frac, pin_lease_s=config.pin_lease_s,
                               block_bytes=unit, listener=self)
        for g, tier in self.tiers.items():
            tier.on_evicted = lambda keys, g=g: self._tier_dropped(g, keys)
        # (key, G-number) of demotions the manager already lists below whose bytes are not written yet
        self._landing: Counter[tuple[int, int]] = Counter()
        self._landed = threading.Condition(self._lock)  # notified when a demotion's write ended (its slot is free)
        self._mover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-mover")

    # --- manager listener: demotions and evictions ---------------------------------------------------------------
    def on_demote(self, src: int, dst: int, keys: list[int]) -> None:
        """Called under the lock, before ``src`` frees the keys: queue the copies for the mover."""
        g_src, g_dst = self._gnum[src], self._gnum[dst]
        self.metrics.demotions.labels(TIER_NAMES[g_src], TIER_NAMES[g_dst]).inc(len(keys))
        newly_stored = [k for k in keys if not self._in_storage(k, exclude=dst)]
        self._publish_stored(newly_stored, MEDIUM_STORAGE)
        self._landing.update((k, g_dst) for k in keys)
        if g_src == G2:  # hold the slots now: the entries are dropped right after this call
            holds = [(k, self.host.borrow(k)) for k in keys]
            views = [(k, cm, cm.__enter__()) for k, cm in holds]
            self._mover.submit(self._write_down, views, g_dst)
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
            self._publish_removed(keys, MEDIUM_CPU)
        else:
            self._mover.submit(self._delete_below, keys, g)
            self._publish_removed([k for k in keys if not self._in_storage(k)], MEDIUM_STORAGE)
        self._forget_meta(keys)

    # --- the mover ------------------------------------------------------------------------------------------------
    def _write_down(self, held: list, g_dst: int) -> None:
        """Mover: write G2 slots (held since ``on_demote``) into G3/G4, then let the slots go."""
        keys = [k for k, _, view in held if view is not None]
        lost = [k for k, _, view in held if view is None]  # not in G2 after all: nothing to write
        try:
            views = [view for _, _, view in held if view is not None]
            results = self._guarded(g_dst, "put", lambda: self.tiers[g_dst].put(keys, views), [False] * len(keys))
        finally:
            for _, cm, _ in held:
                cm.__exit__(None, None, None)
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
                got = self._guarded(g_src, "get", lambda: self.tiers[g_src].get([key], [view]), [None])[0]
                ok = got == self.chunk_bytes and \
                    self._guarded(g_dst, "put", lambda: self.tiers[g_dst].put([key], [view]), [False])[0]
            finally:
                self.host.pool.free(slots)
            self._after_put([key], [ok], g_dst)

    def _after_put(self, keys: list[int], results: list[bool], g_dst: int) -> None:
        with self._lock:
            uncount(self._landing, ((k, g_dst) for k in keys))
            self._landed.notify_all()
        failed = [k for k, ok in zip(keys, results) if not ok]
        self.metrics.bytes_moved.labels(f"demote_{TIER_NAMES[g_dst]}").inc((len(keys) - len(failed)) * self.chunk_bytes)
        if failed:
            self.metrics.errors.labels(TIER_NAMES[g_dst], "put").inc(len(failed))
            self._lost_many(failed, g_dst)

    def _delete_below(self, keys: list[int], g: int) -> None:
        self._guarded(g, "delete", lambda: self.tiers[g].delete(keys), None)

    def _complete_store(self, key: int, ok: bool) -> None:
        with self._lock:
            self.manager.complete_store([key], self._index[G2], ok=ok)
            if ok:
                self._publish_stored([key], MEDIUM_CPU)
            else:
                self._forget_meta([key])
            self._set_gauges()

    def _lost(self, key: int, g: int) -> None:
        self._lost_many([key], g)

    def _lost_many(self, keys: list[int], g: int) -> None:
        """A tier does not have what the manager thinks it has (failed write, damage, expiry): forget it. A
        read that missed a chunk still being written there proves nothing: that one stays."""
        with self._lock:
            if not self._closed:
                self.manager.discard([k for k in keys if (k, g) not in self._landing], self._index[g])

    def _is_landing(self, key: int, g: int) -> bool:
        """Under the lock: the manager lists ``key`` in ``g`` but its demotion has not been written yet."""
        return (key, g) in self._landing

    def _tier_dropped(self, g: int, keys: list[int]) -> None:
        """A tier evicted or dropped keys on its own (damage found, its own capacity): tell the manager."""
        with self._lock:
            held = [k for k in keys if k in self.manager.tiers[self._index[g]].sizes]
            if held and not self._closed:
                self.manager.discard(held, self._index[g])

    def _guarded(self, g: int, op: str, call, default):
        return guarded(f"{TIER_NAMES[g]} {op}", call, default, self.metrics.errors.labels(TIER_NAMES[g], op).inc)

    def _in_storage(self, key: int, exclude: int | None = None) -> bool:
        return any(key in self.manager.tiers[i].sizes for g, i in self._index.items() if g > G2 and i != exclude)

    def _set_gauges(self) -> None:
        for g, i in self._index.items():
            if g > G1:
                self.metrics.resident_bytes.labels(TIER_NAMES[g]).set(self.manager.tiers[i].used)

    # --- promotion -------------------------------------------------------------------------------------------------
    def _reserve_promotion(self, key: int) -> torch.Tensor | None:
        """Under the lock: a G2 reservation and slot for a chunk held below, or None when G2 has no room.
        The caller reads the chunk into the slot, then calls ``_settle_promotion``."""
        promoted = key in self.manager.prepare_store([key], self._index[G2]).store
        slot = self._reserve_slot(key) if promoted else None
        if slot is None and promoted:
            self._complete_store(key, ok=False)
        return slot

    def _reserve_slot(self, key: int) -> torch.Tensor | None:
        """Under the lock: the G2 slot for a store or promotion the manager planned. The chunks it evicted keep
        their slots until the mover wrote them below; while those hold every free slot, wait for the mover (the
        lock released meanwhile), up to ``lower_tier_deadline_ms``: vLLM never offers a refused store again once
        its request has ended. None when no slot came (or the key is already stored or being written)."""
        deadline = time.monotonic() + self.config.lower_tier_deadline_ms / 1000
        while (slot := self.host.reserve(key, self.chunk_bytes)) is None and self._landing and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._landed.wait(left)
        return slot

    def _settle_promotion(self, key: int, ok: bool) -> None:
        """The read into the reserved slot of ``key`` ended: publish the chunk in G2, or give the slot back."""
        (self.host.commit if ok else self.host.abort)(key)
        self._complete_store(key, ok=ok)

    def _close_cascade(self) -> None:
        """Stop every user of G2's slots before G2: the mover, then the lower tiers from the bottom up (closing
        one waits for its queued I/O, which reads, checksums or fills slots: late promotions, writes), then
        the host tier, whose pool memory goes last."""
        self._mover.shutdown(wait=True)
        for g in sorted(self.tiers, reverse=True):
            self.tiers[g].close()
