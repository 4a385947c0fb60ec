"""Least recently used, leaf-first: the baseline every other policy is compared against.

A request touches its blocks from the last to the first, so within a context the deepest block (the leaf)
is the least recent and goes first. That is what vLLM's prefix cache does (a finished request frees its
blocks tail first), so it is the LRU its users run, and the stronger one under the prefix rule: losing a
leaf costs one block, losing block 0 costs the whole context. ``lru-root`` touches in request order (block 0
least recent), the textbook variant the older reference figures in ``shared/README.md`` were measured with.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable, Sequence

from kvtier.manager.policies.base import Key, Policy, pop_front


class LRU(Policy):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key, session: Hashable = None) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: Key, session: Hashable = None) -> None:
        self._order.move_to_end(key)

    def _touch(self, keys: Sequence[Key], new: Collection[Key]) -> None:
        order = self._order
        move = order.move_to_end
        for key in keys:
            if key in new:
                order[key] = None
            else:
                move(key)

    def touch_request(self, keys: Sequence[Key], new: Collection[Key], session: Hashable = None) -> None:
        self._touch(keys[::-1], new)

    def remove(self, key: Key) -> None:
        del self._order[key]

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        return pop_front(self._order, n, busy)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Key) -> bool:
        return key in self._order


class RootFirstLRU(LRU):
    """Request order: block 0 of a context becomes its least recent block (textbook LRU over blocks)."""

    name = "lru-root"

    def touch_request(self, keys: Sequence[Key], new: Collection[Key], session: Hashable = None) -> None:
        self._touch(keys, new)
