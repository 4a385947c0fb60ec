"""Least frequently used, ties broken by recency (O(1) frequency buckets)."""

from __future__ import annotations

from collections.abc import Collection, Hashable

from kvtier.manager.policies.base import Key, Policy, pop_front


class LFU(Policy):
    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._freq: dict[Key, int] = {}
        self._buckets: dict[int, dict[Key, None]] = {}

    def insert(self, key: Key, session: Hashable = None) -> None:
        self._freq[key] = 1
        self._buckets.setdefault(1, {})[key] = None

    def access(self, key: Key, session: Hashable = None) -> None:
        f = self._freq[key]
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
        self._freq[key] = f + 1
        self._buckets.setdefault(f + 1, {})[key] = None

    def remove(self, key: Key) -> None:
        f = self._freq.pop(key)
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        out: list[Key] = []
        for f in sorted(self._buckets):
            if len(out) >= n:
                break
            bucket = self._buckets[f]
            got = pop_front(bucket, n - len(out), busy)
            for key in got:
                del self._freq[key]
            if not bucket:
                del self._buckets[f]
            out.extend(got)
        return out

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: Key) -> bool:
        return key in self._freq
