"""One chunk, one lower-tier entry per tensor-parallel rank: every rank holds different bytes of it.

vLLM's scheduler process places a chunk in the same slot of every rank's part of G2. ``RankedTier`` takes
the slot view in rank 0's part (the one the ``HostTier`` manages), finds the same bytes in every other part
by offset, and stores each under its rank's namespace (``tp_rank = rank``), so each rank's bytes carry their
own header and checksum. A read is all-or-nothing: it hits only when every rank's part came back whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import torch

from kvtier.tiers.base import Buffer, Tier, StoreStats, gather, then


class RankedTier(Tier):
    """``tiers[r]`` stores rank ``r``'s bytes, which live in ``parts[r]`` at the offset rank 0's view has in
    ``parts[0]``. Buffers passed in must be views of ``parts[0]``."""

    def __init__(self, tiers: Sequence[Tier], parts: Sequence[torch.Tensor]) -> None:
        if not tiers or len(tiers) != len(parts):
            raise ValueError(f"{len(tiers)} tiers for {len(parts)} rank parts")
        if len({p.numel() for p in parts}) != 1:
            raise ValueError("rank parts differ in size")
        super().__init__(tiers[0].namespace)
        self.name = tiers[0].name
        self.ranks = list(tiers)
        self.parts = list(parts)

    def held_keys(self) -> list[int]:
        """The chunks every rank holds whole (a local tier's index per rank); empty for tiers with none."""
        per_rank = [set(getattr(tier, "held_keys", list)()) for tier in self.ranks]
        return sorted(set.intersection(*per_rank))

    def _split(self, views: Sequence[Buffer]) -> list[list[torch.Tensor]]:
        """For each rank, the views at the same offsets in its part."""
        base, size = self.parts[0].data_ptr(), self.parts[0].numel()
        offsets = []
        for view in views:
            at = view.data_ptr() - base if isinstance(view, torch.Tensor) else -1
            if not (isinstance(view, torch.Tensor) and view.dtype == torch.uint8 and view.dim() == 1
                    and 0 <= at and at + view.numel() <= size):
                raise ValueError("RankedTier buffers must be 1-D uint8 views of rank 0's part")
            offsets.append((at, view.numel()))
        return [[part[at:at + n] for at, n in offsets] for part in self.parts]

    def put_async(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> Future[list[bool]]:
        per_rank = self._split(payloads)
        done = gather([tier.put_async(keys, views) for tier, views in zip(self.ranks, per_rank)])
        return then(done, lambda results: [all(r[i] for r in results) for i in range(len(keys))])

    def get_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> Future[list[int | None]]:
        per_rank = self._split(buffers)
        done = gather([tier.get_async(keys, views) for tier, views in zip(self.ranks, per_rank)])

        def whole(results: list[list[int | None]]) -> list[int | None]:
            sizes = [{r[i] for r in results} for i in range(len(keys))]
            return [s.pop() if len(s) == 1 else None for s in sizes]  # {None} stays a miss

        return then(done, whole)

    def contains(self, keys: Sequence[int]) -> list[bool]:
        found = [tier.contains(keys) for tier in self.ranks]
        return [all(f[i] for f in found) for i in range(len(keys))]

    def delete(self, keys: Sequence[int]) -> list[bool]:
        gone = [tier.delete(keys) for tier in self.ranks]
        return [any(g[i] for g in gone) for i in range(len(keys))]

    @property
    def capacity_bytes(self) -> int:
        return sum(tier.capacity_bytes for tier in self.ranks)

    @property
    def capacity_chunks(self) -> int:
        """Chunks every rank has room for (ranks of a disk tier)."""
        return min(tier.capacity_chunks for tier in self.ranks)

    def stats(self) -> StoreStats:
        """The ranks' counters summed."""
        total = StoreStats()
        for tier in self.ranks:
            for name, value in tier.stats().as_dict().items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def close(self) -> None:
        super().close()
        for tier in self.ranks:
            tier.close()
