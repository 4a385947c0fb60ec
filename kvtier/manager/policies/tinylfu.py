"""TinyLFU admission (Einziger et al., 2017) in front of LRU: a new key is admitted only if a count-min
sketch says it has been seen at least as often as the entry it would evict. Counters halve every
``10 * capacity`` samples so the sketch follows a changing workload."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence

from kvtier.manager.policies.base import Key
from kvtier.manager.policies.lru import LRU

_ROWS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)


class CountMinSketch:
    def __init__(self, width: int) -> None:
        self.width = 1 << max(4, (max(1, width) - 1).bit_length())
        self._mask = self.width - 1
        self._rows = [[0] * self.width for _ in _ROWS]

    def _slots(self, key: Hashable) -> list[int]:
        h = hash(key)
        return [((h * mult) >> 17) & self._mask for mult in _ROWS]

    def add(self, key: Hashable) -> None:
        for row, slot in zip(self._rows, self._slots(key)):
            row[slot] += 1

    def estimate(self, key: Hashable) -> int:
        return min(row[slot] for row, slot in zip(self._rows, self._slots(key)))

    def halve(self) -> None:
        for row in self._rows:
            row[:] = [v >> 1 for v in row]


class TinyLFU(LRU):
    name = "tinylfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._sketch = CountMinSketch(4 * max(1, capacity))
        self._samples = 0
        self._sample_period = 10 * max(1, capacity)

    def _record(self, key: Key) -> None:
        self._sketch.add(key)
        self._samples += 1
        if self._samples >= self._sample_period:
            self._sketch.halve()
            self._samples = 0

    def access(self, key: Key, session: Hashable = None) -> None:
        self._record(key)
        super().access(key)

    def touch_request(self, keys: Sequence[Key], new: Collection[Key], session: Hashable = None) -> None:
        for key in keys:
            self._record(key)
        super().touch_request(keys, new)

    def admit(self, keys: Sequence[Key], session: Hashable = None) -> Sequence[Key]:
        free = self.capacity - len(self._order)
        if len(keys) <= free:
            return keys
        victims = iter(self._order)
        admitted: list[Key] = []
        for i, key in enumerate(keys):
            if i < free:
                admitted.append(key)
                continue
            victim = next(victims, None)
            if victim is None or self._sketch.estimate(key) + 1 >= self._sketch.estimate(victim):
                admitted.append(key)
            else:
                break  # prefix rule: a later block is useless without this one
        return admitted
