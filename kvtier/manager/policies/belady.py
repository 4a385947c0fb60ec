"""Belady's MIN: evict the entry whose next use is furthest in the future. Offline, for the simulator only,
as the bound every online policy is measured against.

The future comes from a ``NextUseOracle`` built from the whole trace: for every access position, the position
of the next access to the same key. Positions are global block indices, so ties between blocks of the same
future request break toward the later (deeper) block, which is what the prefix rule wants.

With ``bypass`` (the default) a missed block competes with the cached ones: it is stored only if its next use
comes before that of the block it would displace, as in Belady's MIN proper. Without it every miss is stored
and the furthest cached block goes, the bound of a cache that must admit everything it computes.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Hashable, Sequence

import numpy as np

from kvtier.manager.policies.base import Key, Policy


class NextUseOracle:
    """``next_use[p]``: position of the next access to ``keys[p]``; ``len(keys) + p`` if there is none."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys)
        n = len(keys)
        if n >= 2**30:
            raise ValueError(f"trace too long for the oracle: {n} accesses")
        self.keys = keys
        self.n = n
        self.next_use = np.empty(n, dtype=np.int32)
        last_seen = np.full(int(keys.max()) + 1 if n else 1, -1, dtype=np.int64)
        # backward over requests: vector work per request, not per block
        for r in range(len(offsets) - 2, -1, -1):
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            if lo == hi:
                continue
            ks = keys[lo:hi]
            seen = last_seen[ks]
            pos = np.arange(lo, hi, dtype=np.int64)
            self.next_use[lo:hi] = np.where(seen >= 0, seen, n + pos)
            last_seen[ks] = pos

    def key_at(self, value: int) -> int:
        return int(self.keys[value if value < self.n else value - self.n])


class Belady(Policy):
    name = "belady"

    def __init__(self, capacity: int, oracle: NextUseOracle | None = None, bypass: bool = True) -> None:
        super().__init__(capacity)
        if oracle is None:
            raise ValueError("belady needs the trace's future (a NextUseOracle); it is a simulator-only bound")
        self.oracle = oracle
        self.bypass = bypass
        self._next: dict[Key, int] = {}     # member -> its next use
        self._heap: list[int] = []          # -next use (max-heap), lazily invalidated
        self._pending: dict[Key, int] = {}  # next uses of the request being processed

    def advance(self, lo: int, hi: int) -> None:
        """The request covering trace positions ``[lo, hi)`` runs next."""
        ks = self.oracle.keys[lo:hi].tolist()
        nu = self.oracle.next_use[lo:hi].tolist()
        self._pending = dict(zip(ks, nu))

    def _set(self, key: Key) -> None:
        value = self._pending.get(key)
        if value is None:
            raise KeyError(f"belady: key {key!r} is not part of the current trace position")
        self._next[key] = value
        heapq.heappush(self._heap, -value)

    def insert(self, key: Key, session: Hashable = None) -> None:
        self._set(key)

    def access(self, key: Key, session: Hashable = None) -> None:
        self._set(key)

    def touch_request(self, keys: Sequence[Key], new: Collection[Key], session: Hashable = None) -> None:
        pending, nxt, heap = self._pending, self._next, self._heap
        push = heapq.heappush
        for key in keys:
            value = pending[key]
            nxt[key] = value
            push(heap, -value)
        if len(heap) > 4 * len(nxt) + 1024:
            self._heap = [-v for v in nxt.values()]
            heapq.heapify(self._heap)

    def admit(self, keys: Sequence[Key], session: Hashable = None) -> Sequence[Key]:
        """The new keys worth storing: all that fit in free room, then each (nearest next use first) only while
        it is needed before the furthest cached key, which it will displace."""
        free = self.capacity - len(self._next)
        if not self.bypass or len(keys) <= free:
            return keys
        pending, nxt, heap, key_at = self._pending, self._next, self._heap, self.oracle.key_at
        by_need = sorted(set(keys), key=pending.__getitem__)
        admitted = set(by_need[:max(free, 0)])
        displaced: list[int] = []
        for key in by_need[max(free, 0):]:
            while heap and nxt.get(key_at(-heap[0])) != -heap[0]:
                heapq.heappop(heap)  # stale
            if not heap or -heap[0] < pending[key]:
                break
            displaced.append(heapq.heappop(heap))
            admitted.add(key)
        for value in displaced:  # eviction takes these very entries next
            heapq.heappush(heap, value)
        return [key for key in keys if key in admitted]

    def remove(self, key: Key) -> None:
        del self._next[key]

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        out: list[Key] = []
        held: list[int] = []
        heap, nxt, key_at = self._heap, self._next, self.oracle.key_at
        while len(out) < n and heap:
            value = -heapq.heappop(heap)
            key = key_at(value)
            if nxt.get(key) != value:
                continue  # stale
            if key in busy:
                held.append(value)
                continue
            del nxt[key]
            out.append(key)
        for value in held:
            heapq.heappush(heap, -value)
        return out

    def __len__(self) -> int:
        return len(self._next)

    def __contains__(self, key: Key) -> bool:
        return key in self._next
