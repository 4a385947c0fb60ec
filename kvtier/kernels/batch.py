"""A validated batch of block copies between a KV cache and a host (or staging) arena.

Every implementation takes a ``TransferBatch``; all checks happen here, on the host, before any kernel is
launched, so nothing is ever written out of bounds whichever implementation runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from kvtier.layout import PageLayout, alignment

IntsLike = Sequence[int] | torch.Tensor


def _as_index(values: IntsLike, what: str) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} must be integers, got {t.dtype}")
    return t.to(device="cpu", dtype=torch.int64).contiguous()


@dataclass(frozen=True)
class TransferBatch:
    """Blocks ``block_ids[i]`` of ``layout`` <-> ``arena[offsets[i] : offsets[i] + layout.block_bytes]``.

    ``to_host`` is the direction: True gathers cache -> arena (offload), False scatters arena -> cache (load).
    """

    layout: PageLayout
    block_ids: torch.Tensor   # int64, CPU
    arena: torch.Tensor       # uint8, 1-D, contiguous
    offsets: torch.Tensor     # int64, CPU, byte offsets into arena
    to_host: bool

    @classmethod
    def build(cls, layout: PageLayout, block_ids: IntsLike, arena: torch.Tensor, offsets: IntsLike,
              to_host: bool) -> TransferBatch:
        """Validate everything; raises ``ValueError`` naming the first problem."""
        ids = _as_index(block_ids, "block_ids")
        offs = _as_index(offsets, "offsets")
        if ids.numel() != offs.numel():
            raise ValueError(f"{ids.numel()} block ids but {offs.numel()} offsets")
        if not isinstance(arena, torch.Tensor) or arena.dtype != torch.uint8 or arena.dim() != 1:
            raise ValueError("arena must be a one-dimensional torch.uint8 tensor")
        if not arena.is_contiguous():
            raise ValueError("arena must be contiguous")
        if arena.device.type != "cpu" and arena.device != layout.device:
            raise ValueError(f"arena is on {arena.device}; it must be on the host or on the cache's {layout.device}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= layout.num_blocks:
                raise ValueError(f"block id out of range [0, {layout.num_blocks}): min {lo}, max {hi}")
            if int(offs.min()) < 0 or int(offs.max()) + layout.block_bytes > arena.numel():
                raise ValueError(f"arena of {arena.numel()} bytes cannot hold blocks of {layout.block_bytes} bytes "
                                 f"at offsets [{int(offs.min())}, {int(offs.max())}]")
            if not to_host and torch.unique(ids).numel() != ids.numel():
                raise ValueError("destination block ids must be unique")
            if to_host and offs.numel() > 1:
                ordered = torch.sort(offs).values
                if int((ordered[1:] - ordered[:-1]).min()) < layout.block_bytes:
                    raise ValueError("destination ranges in the arena overlap")
        return cls(layout, ids, arena, offs, to_host)

    @property
    def num_blocks(self) -> int:
        return self.block_ids.numel()

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.layout.block_bytes

    @cached_property
    def host_ptrs(self) -> torch.Tensor:
        return self.offsets + self.arena.data_ptr()

    @cached_property
    def crosses_devices(self) -> bool:
        return self.arena.device != self.layout.device

    @cached_property
    def alignment(self) -> int:
        """Largest power of two <= 16 dividing every address the copy touches."""
        lay = self.layout
        host = [self.arena.data_ptr(), *self.offsets.tolist()] if self.num_blocks else []
        seg_span = [lay.segment_bytes] if lay.num_segments > 1 else []
        return alignment(*lay.seg_ptrs, *lay.seg_block_strides, *host, *seg_span)

    def affine_runs(self) -> list[tuple[int, int, int, int]]:
        """Split the batch into runs ``(start, stop, first_offset, offset_step)`` with arena offsets in
        non-decreasing arithmetic progression, so whole runs move as one strided view."""
        offs = self.offsets.tolist()
        runs: list[tuple[int, int, int, int]] = []
        start = 0
        while start < len(offs):
            stop = start + 1
            step = offs[stop] - offs[start] if stop < len(offs) else self.layout.block_bytes
            while stop < len(offs) and step >= 0 and offs[stop] - offs[stop - 1] == step:
                stop += 1
            runs.append((start, stop, offs[start], step if stop - start > 1 else self.layout.block_bytes))
            start = stop
        return runs
