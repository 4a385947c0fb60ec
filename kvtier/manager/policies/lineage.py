"""Leaf-first lineage: LRU over prefix chains that evicts a request's deepest blocks first.

Under the prefix rule a block is useful only while every block before it is cached, so losing block 0 of a
context wastes the whole context while losing its last block wastes one block. Touching a request's blocks
from the last to the first makes the leaves of each chain older than their ancestors: LRU order then evicts
leaves before parents, and stale branches (blocks absent from the latest requests) before both.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from kvtier.manager.policies.base import Key
from kvtier.manager.policies.lru import LRU


class LeafFirst(LRU):
    name = "lineage"

    def touch_request(self, keys: Sequence[Key], new: Collection[Key]) -> None:
        order = self._order
        move = order.move_to_end
        for key in reversed(keys):
            if key in new:
                order[key] = None
            else:
                move(key)
