"""Staged transfers: gather scattered pages inside device memory first, then cross PCIe in a few large DMA
copies (one per contiguous run of arena offsets). Wins where many small pages would make zero-copy or
per-page DMA inefficient and device-memory bandwidth is spare."""

from __future__ import annotations

import torch

from kvtier.kernels import triton_copy
from kvtier.kernels.batch import TransferBatch


def available() -> bool:
    return torch.cuda.is_available() and triton_copy.available()


def copy(batch: TransferBatch, sm_budget: int = 0) -> None:
    lay = batch.layout
    if batch.num_blocks == 0:
        return
    if lay.device.type != "cuda" or batch.arena.device.type != "cpu":
        raise ValueError("staged transfers move between a CUDA cache and a host arena")
    staging = torch.empty(batch.nbytes, dtype=torch.uint8, device=lay.device)
    staging_offsets = torch.arange(batch.num_blocks, dtype=torch.int64) * lay.block_bytes
    inner = TransferBatch(lay, batch.block_ids, staging, staging_offsets, batch.to_host)
    if not batch.to_host:
        _cross(batch, staging, to_host=False)
    triton_copy.copy(inner, sm_budget)
    if batch.to_host:
        _cross(batch, staging, to_host=True)


def _cross(batch: TransferBatch, staging: torch.Tensor, to_host: bool) -> None:
    """One DMA per affine run whose blocks sit back to back in the arena."""
    bb = batch.layout.block_bytes
    for start, stop, first, step in batch.affine_runs():
        if step == bb:
            pieces = [(start, stop, first)]
        else:
            pieces = [(i, i + 1, first + (i - start) * step) for i in range(start, stop)]
        for lo, hi, offset in pieces:
            host = batch.arena[offset: offset + (hi - lo) * bb]
            dev = staging[lo * bb: hi * bb]
            if to_host:
                host.copy_(dev, non_blocking=True)
            else:
                dev.copy_(host, non_blocking=True)
