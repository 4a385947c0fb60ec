"""Adaptive Replacement Cache (Megiddo & Modha, 2003): recency list T1 and frequency list T2, with ghost
lists B1/B2 that move the target size ``p`` of T1 toward whichever list would have hit."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable

from kvtier.manager.policies.base import Key, Policy, pop_front


class ARC(Policy):
    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._t1: OrderedDict[Key, None] = OrderedDict()
        self._t2: OrderedDict[Key, None] = OrderedDict()
        self._b1: OrderedDict[Key, None] = OrderedDict()
        self._b2: OrderedDict[Key, None] = OrderedDict()
        self._p = 0.0

    def insert(self, key: Key, session: Hashable = None) -> None:
        c = max(1, self.capacity)
        if key in self._b1:
            self._p = min(float(c), self._p + max(1.0, len(self._b2) / max(1, len(self._b1))))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._p = max(0.0, self._p - max(1.0, len(self._b1) / max(1, len(self._b2))))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        for ghost in (self._b1, self._b2):
            while len(ghost) > c:
                ghost.popitem(last=False)

    def access(self, key: Key, session: Hashable = None) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def remove(self, key: Key) -> None:
        if key in self._t1:
            del self._t1[key]
        else:
            del self._t2[key]

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        out: list[Key] = []
        while len(out) < n and (self._t1 or self._t2):
            from_t1 = bool(self._t1) and (len(self._t1) > self._p or not self._t2)
            source, ghost = (self._t1, self._b1) if from_t1 else (self._t2, self._b2)
            got = pop_front(source, 1, busy)
            if not got:
                source, ghost = (self._t2, self._b2) if from_t1 else (self._t1, self._b1)
                got = pop_front(source, 1, busy)
                if not got:
                    break
            ghost[got[0]] = None
            out.append(got[0])
        return out

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: Key) -> bool:
        return key in self._t1 or key in self._t2
