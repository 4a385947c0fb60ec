"""LIRS (Jiang and Zhang, SIGMETRICS 2002): recency of the *previous* reuse decides what stays.

A loop larger than the cache defeats LRU: every block is evicted just before it is used again. LIRS ranks a
block by its inter-reference recency (how many distinct blocks were touched between its last two uses):
blocks with a short one (LIR) hold most of the cache; the rest (HIR) share a small resident queue and are
evicted first, so a loop keeps a stable part resident instead of cycling through all of it. It is the
classic baseline for looping / thrashing access, which is what 32 sessions cycling through a cache that
holds fewer look like. A request's blocks are touched leaf first, as in ``lru``.

Structures: ``_stack`` (S) orders LIR blocks and recently seen HIR blocks, resident or not, oldest first, and
always has an LIR block at the bottom; ``_queue`` (Q) holds the resident HIR blocks in eviction order.
Non-resident HIR entries of S (ghosts) are bounded by the capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable, Sequence

from kvtier.manager.policies.base import Key, Policy

HIR_SHARE = 0.01   # the resident HIR queue's share of the cache (the paper's 1%)


class LIRS(Policy):
    name = "lirs"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._lir_limit = max(1, capacity - max(1, int(capacity * HIR_SHARE)))
        self._stack: OrderedDict[Key, None] = OrderedDict()
        self._queue: OrderedDict[Key, None] = OrderedDict()
        self._lir: set[Key] = set()
        self._ghosts: OrderedDict[Key, None] = OrderedDict()

    def _prune(self) -> None:
        """Drop HIR entries from the bottom of S until an LIR block is there."""
        stack = self._stack
        while stack:
            bottom = next(iter(stack))
            if bottom in self._lir:
                return
            del stack[bottom]
            self._ghosts.pop(bottom, None)

    def _demote_bottom_lir(self) -> None:
        bottom = next(iter(self._stack))
        self._lir.discard(bottom)
        del self._stack[bottom]
        self._queue[bottom] = None
        self._prune()

    def _to_top(self, key: Key) -> None:
        self._stack[key] = None
        self._stack.move_to_end(key)

    def insert(self, key: Key, session: Hashable = None) -> None:
        if key in self._ghosts:          # reused within the stack's reach: a short reuse distance
            del self._ghosts[key]
            self._lir.add(key)
            self._to_top(key)
            if len(self._lir) > self._lir_limit:
                self._demote_bottom_lir()
        elif len(self._lir) < self._lir_limit:
            self._lir.add(key)
            self._to_top(key)
        else:
            self._to_top(key)
            self._queue[key] = None

    def access(self, key: Key, session: Hashable = None) -> None:
        if key in self._lir:
            self._to_top(key)
            self._prune()
        elif key in self._stack:         # resident HIR seen again while in S: it becomes LIR
            del self._queue[key]
            self._lir.add(key)
            self._to_top(key)
            self._demote_bottom_lir()
        else:
            self._to_top(key)
            self._queue.move_to_end(key)

    def touch_request(self, keys: Sequence[Key], new: Collection[Key], session: Hashable = None) -> None:
        for key in reversed(keys):
            if key in new:
                self.insert(key)
            else:
                self.access(key)

    def remove(self, key: Key) -> None:
        if key in self._lir:
            self._lir.discard(key)
            del self._stack[key]
            self._prune()
        else:
            del self._queue[key]
            self._stack.pop(key, None)

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        out: list[Key] = []
        while len(out) < n:
            victim = next((k for k in self._queue if k not in busy), None)
            if victim is None:
                lir = next((k for k in self._stack if k in self._lir and k not in busy), None)
                if lir is None:
                    break
                self.remove(lir)
                out.append(lir)
                continue
            del self._queue[victim]
            if victim in self._stack:    # stays in S as a ghost: a quick return makes it LIR
                self._ghosts[victim] = None
                if len(self._ghosts) > self.capacity:
                    oldest, _ = self._ghosts.popitem(last=False)
                    del self._stack[oldest]
            out.append(victim)
        return out

    def __len__(self) -> int:
        return len(self._lir) + len(self._queue)

    def __contains__(self, key: Key) -> bool:
        return key in self._lir or key in self._queue
