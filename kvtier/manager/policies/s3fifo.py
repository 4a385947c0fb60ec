"""S3-FIFO (Yang et al., SOSP 2023): a small FIFO filters one-hit wonders, a main FIFO with reinsertion keeps
the rest, and a ghost FIFO remembers recent small-queue evictions so they go straight to main."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable

from kvtier.manager.policies.base import Key, Policy

SMALL_FRACTION = 0.1
MAX_FREQ = 3


class S3FIFO(Policy):
    name = "s3fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        # OrderedDict, not dict: popping a plain dict's front leaves holes that the next pop scans (quadratic)
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}

    def insert(self, key: Key, session: Hashable = None) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: Key, session: Hashable = None) -> None:
        f = self._freq[key]
        if f < MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key: Key) -> None:
        del self._freq[key]
        if key in self._small:
            del self._small[key]
        else:
            del self._main[key]

    def _evict_one(self, busy: Collection[Key]) -> Key | None:
        # bounded work: every entry is moved at most a few times per eviction (freq <= MAX_FREQ)
        budget = 4 * (len(self._small) + len(self._main)) + 4
        while budget > 0 and (self._small or self._main):
            budget -= 1
            if self._small and (len(self._small) >= SMALL_FRACTION * self.capacity or not self._main):
                key = self._small.popitem(last=False)[0]
                if key in busy or self._freq[key] > 0:
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                self._ghost[key] = None
                while len(self._ghost) > max(1, self.capacity - int(SMALL_FRACTION * self.capacity)):
                    self._ghost.popitem(last=False)
            else:
                key = self._main.popitem(last=False)[0]
                if key in busy or self._freq[key] > 0:
                    self._freq[key] = max(0, self._freq[key] - 1)
                    self._main[key] = None
                    continue
            del self._freq[key]
            return key
        return None

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        out: list[Key] = []
        while len(out) < n:
            key = self._evict_one(busy)
            if key is None:
                break
            out.append(key)
        return out

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: Key) -> bool:
        return key in self._freq
