"""Least recently used: the baseline every other policy is compared against.

A request touches its blocks in request order, so block 0 of a context becomes the least recent of that
request; that is what plain LRU does and what the reference replays measure.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

from kvtier.manager.policies.base import Key, Policy, pop_front


class LRU(Policy):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: Key) -> None:
        self._order.move_to_end(key)

    def touch_request(self, keys: Sequence[Key], new: Collection[Key]) -> None:
        order = self._order
        move = order.move_to_end
        for key in keys:
            if key in new:
                order[key] = None
            else:
                move(key)

    def remove(self, key: Key) -> None:
        del self._order[key]

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        return pop_front(self._order, n, busy)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Key) -> bool:
        return key in self._order
