"""First in, first out: insertion order only; hits change nothing."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from kvtier.manager.policies.base import Key, Policy, pop_front


class FIFO(Policy):
    name = "fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: dict[Key, None] = {}

    def insert(self, key: Key) -> None:
        self._order[key] = None

    def access(self, key: Key) -> None:
        pass

    def touch_request(self, keys: Sequence[Key], new: Collection[Key]) -> None:
        order = self._order
        for key in keys:
            if key in new:
                order[key] = None

    def remove(self, key: Key) -> None:
        del self._order[key]

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        return pop_front(self._order, n, busy)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Key) -> bool:
        return key in self._order
