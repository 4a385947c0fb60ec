"""One tier's bookkeeping: which keys it holds, their bytes, and the retention lanes that order eviction.

Every key a tier holds sits in exactly one lane. Eviction drains the lanes in a fixed order: ephemeral
(FIFO) -> low priority (lowest first) -> the pluggable policy -> high priority (lowest first). Pinned keys
are in no evictable lane at all; pins are bounded by the tier's pin budget.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field

from kvtier.manager.policies import Key, Policy
from kvtier.manager.policies.base import pop_front

TIER_NAMES = ("G1", "G2", "G3", "G4")  # a tier's G-number is its index here
NORMAL, EPHEMERAL, LOW, HIGH, PINNED = 0, 1, 2, 3, 4
LANE_NAMES = {NORMAL: "normal", EPHEMERAL: "ephemeral", LOW: "low", HIGH: "high", PINNED: "pinned"}


@dataclass(frozen=True)
class TierSpec:
    """A tier's name (G1..G4), capacity in bytes (or blocks, with 1-byte blocks) and G3/G4 admission."""

    name: str
    capacity: int
    admission_min_hits: int = 0   # a key enters this tier only after this many accesses (spares SSD writes)

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError(f"tier {self.name}: capacity must not be negative, got {self.capacity}")
        if self.admission_min_hits < 0:
            raise ValueError(f"tier {self.name}: admission_min_hits must not be negative")


@dataclass
class TierStats:
    hit_blocks: int = 0        # prefix-rule hits served by this tier
    hit_bytes: int = 0
    writes: int = 0            # keys written into this tier (stores, demotions, promotions)
    write_bytes: int = 0
    reads: int = 0             # keys read out of this tier (hits, promotions)
    read_bytes: int = 0
    evictions: int = 0
    demotions_out: int = 0     # evicted keys written one tier down
    refused: int = 0           # keys not stored: no room, admission filter, or ephemeral below G2

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.__dict__)
        out["read_write_ratio"] = self.reads / self.writes if self.writes else 0.0
        return out


@dataclass
class TierState:
    spec: TierSpec
    policy: Policy
    pin_budget: int
    sizes: dict[Key, int] = field(default_factory=dict)       # every key this tier holds -> bytes
    pending: dict[Key, int] = field(default_factory=dict)     # reserved by prepare_store, not yet written
    used: int = 0
    ephemeral: dict[Key, None] = field(default_factory=dict)
    low: dict[Key, int] = field(default_factory=dict)          # key -> priority
    high: dict[Key, int] = field(default_factory=dict)
    pinned_bytes: int = 0
    pinned_by: Counter[Hashable] = field(default_factory=Counter)   # owner (tenant) -> its pinned bytes here
    stats: TierStats = field(default_factory=TierStats)
    _low_heap: list[tuple[int, int, Key]] = field(default_factory=list)
    _high_heap: list[tuple[int, int, Key]] = field(default_factory=list)
    _seq: int = 0

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    def free(self) -> int:
        return self.spec.capacity - self.used

    # --- lanes ---------------------------------------------------------------------------------------------
    def lane_add(self, key: Key, lane: int, priority: int = 0, session: Hashable = None,
                 owner: Hashable = None) -> None:
        """``key`` joins ``lane``; a normal key joins the policy's order as ``session``'s, a pinned one counts
        against ``owner``'s (its tenant's) share of the pin budget."""
        if lane == NORMAL:
            self.policy.insert(key, session)
        elif lane == EPHEMERAL:
            self.ephemeral[key] = None
        elif lane == PINNED:
            self.pinned_bytes += self.sizes[key]
            self.pinned_by[owner] += self.sizes[key]
        else:
            members, heap = (self.low, self._low_heap) if lane == LOW else (self.high, self._high_heap)
            members[key] = priority
            self._seq += 1
            heapq.heappush(heap, (priority, self._seq, key))

    def lane_remove(self, key: Key, lane: int, owner: Hashable = None) -> None:
        if lane == NORMAL:
            self.policy.remove(key)
        elif lane == EPHEMERAL:
            del self.ephemeral[key]
        elif lane == PINNED:
            self.pinned_bytes -= self.sizes[key]
            self.pinned_by[owner] -= self.sizes[key]
            if not self.pinned_by[owner]:
                del self.pinned_by[owner]
        elif lane == LOW:
            del self.low[key]
        else:
            del self.high[key]

    def _pop_priority(self, members: dict[Key, int], heap: list, n: int, busy: Collection[Key]) -> list[Key]:
        out: list[Key] = []
        held = []
        while heap and len(out) < n:
            item = heapq.heappop(heap)
            priority, _, key = item
            if members.get(key) != priority:
                continue  # stale
            if key in busy:
                held.append(item)
                continue
            del members[key]
            out.append(key)
        for item in held:
            heapq.heappush(heap, item)
        return out

    def choose_victims(self, deficit: int, unit: int, busy: Collection[Key]) -> list[Key]:
        """Forget keys, lane by lane, until ``deficit`` bytes are free; returns them in eviction order.
        The caller removes them from ``sizes``."""
        victims: list[Key] = []
        sizes = self.sizes

        def take(got: list[Key]) -> None:
            nonlocal deficit
            for key in got:
                deficit -= sizes[key]
            victims.extend(got)

        n = -(-deficit // unit)
        if self.ephemeral and deficit > 0:
            take(pop_front(self.ephemeral, n, busy))
        if self.low and deficit > 0:
            take(self._pop_priority(self.low, self._low_heap, -(-deficit // unit), busy))
        while deficit > 0:
            got = self.policy.evict(-(-deficit // unit), busy)
            if not got:
                break
            take(got)
        if self.high and deficit > 0:
            take(self._pop_priority(self.high, self._high_heap, -(-deficit // unit), busy))
        return victims

