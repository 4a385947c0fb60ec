"""G3/G4 admission rules to compare in replays: which blocks G2 evicts are worth an SSD write.

``min-hits-N`` is the manager's own rule (``admission_min_hits``: a block must have been accessed N times);
``ghost`` and ``tinylfu`` are the two classic alternatives, here to be measured against it:
- ghost: a block is refused the first time G2 evicts it and remembered in a ghost list as large as the tier;
  evicted again while remembered, it is admitted (admit on the second eviction);
- tinylfu: a count-min sketch of accesses, halved every ten tier-capacities of samples (Einziger et al.); a
  block is admitted if it has been seen at least as often as the oldest block the tier holds (which a full
  tier would give up for it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvtier.manager.policies import Key
from kvtier.manager.policies.tinylfu import CountMinSketch
from kvtier.manager.tier import TierState


class Admission:
    """A filter in front of G3 and below; ``record`` sees every access."""

    def record(self, keys: Sequence[Key]) -> None:
        """Accesses of one request (rules that count them override this)."""

    def admit(self, keys: Sequence[Key], tier: TierState) -> list[Key]:
        raise NotImplementedError


class Ghost(Admission):
    def __init__(self) -> None:
        self._ghosts: OrderedDict[Key, None] = OrderedDict()

    def admit(self, keys: Sequence[Key], tier: TierState) -> list[Key]:
        admitted = []
        for key in keys:
            if self._ghosts.pop(key, 0) is None:
                admitted.append(key)
            else:
                self._ghosts[key] = None
        while len(self._ghosts) > max(1, tier.capacity):
            self._ghosts.popitem(last=False)
        return admitted


class TinyLFUAdmission(Admission):
    def __init__(self, width: int) -> None:
        self._sketch = CountMinSketch(width)
        self._period = 10 * width
        self._samples = 0

    def record(self, keys: Sequence[Key]) -> None:
        for key in keys:
            self._sketch.add(key)
        self._samples += len(keys)
        if self._samples >= self._period:
            self._sketch.halve()
            self._samples = 0

    def admit(self, keys: Sequence[Key], tier: TierState) -> list[Key]:
        if tier.used + len(keys) <= tier.capacity:
            return list(keys)
        oldest = next(iter(tier.sizes), None)
        floor = self._sketch.estimate(oldest) if oldest is not None else 0
        return [key for key in keys if self._sketch.estimate(key) >= floor]


# name -> (admission_min_hits for the tier spec, rule factory given the G3 capacity in blocks, or None)
ADMISSION_RULES = {
    "min-hits-1": (1, None),
    "min-hits-2": (2, None),
    "min-hits-3": (3, None),
    "ghost": (0, lambda capacity: Ghost()),
    "tinylfu": (0, lambda capacity: TinyLFUAdmission(max(16, capacity))),
}
