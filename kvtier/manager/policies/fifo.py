"""First in, first out: LRU's bookkeeping, except that hits change nothing."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence

from kvtier.manager.policies.base import Key
from kvtier.manager.policies.lru import LRU


class FIFO(LRU):
    name = "fifo"

    def access(self, key: Key, session: Hashable = None) -> None:
        pass

    def touch_request(self, keys: Sequence[Key], new: Collection[Key], session: Hashable = None) -> None:
        order = self._order
        for key in keys:
            if key in new:
                order[key] = None
