"""One entry point for every transfer implementation, and the choice between them.

``offload`` gathers blocks from a KV cache into an arena (host memory for G2); ``load`` scatters them back.
``impl="auto"`` picks per device, direction and segment size from a findings table that
``kvtier bench transfer --write-dispatch`` produces on a GPU; until one exists the zero-copy Triton
kernel is used on GPUs (no launch per page, one launch per batch); on CPU the rule in ``choose``. GPU transfers
are asynchronous on torch's current stream: record an event (or synchronise) before reading the arena.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from kvtier.config import TRANSFER_IMPLS
from kvtier.kernels import cuda_copy, dma, reference, staged, triton_copy
from kvtier.kernels.batch import IntsLike, TransferBatch
from kvtier.layout import PageLayout

DISPATCH_TABLE_ENV = "KVTIER_DISPATCH_TABLE"
DEFAULT_TABLE = Path(__file__).with_name("dispatch_table.json")
CPU_TORCH_OFFLOAD_MAX_BYTES = 16 * 1024


def _triton_usable_on(device: torch.device) -> bool:
    if not triton_copy.available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def available_impls(device: torch.device) -> list[str]:
    """Implementations that can run for a cache on ``device`` in this process."""
    impls = ["torch", "dma"]
    if _triton_usable_on(device):
        impls.append("triton")
    if device.type == "cuda":
        if cuda_copy.available():
            impls.append("cuda")
        if staged.available():
            impls.append("staged")
    return impls


def _load_table() -> dict[str, list[list]]:
    return _read_table(os.environ.get(DISPATCH_TABLE_ENV, str(DEFAULT_TABLE)))


@functools.lru_cache(maxsize=4)
def _read_table(location: str) -> dict[str, list[list]]:
    """Parsed once per path: ``choose`` runs for every transfer batch."""
    path = Path(location)
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    for direction in ("offload", "load"):
        for row in table.get(direction, []):
            if len(row) != 2 or row[1] not in TRANSFER_IMPLS:
                raise ValueError(f"{path}: malformed dispatch row {row!r}")
    return table


def choose(layout: PageLayout, to_host: bool) -> str:
    """The implementation for this cache and direction: the table's pick for the first row whose
    ``max segment bytes`` bound covers the layout's segments, if it can run here; else the default."""
    usable = available_impls(layout.device)
    if layout.device.type != "cuda":
        # measured on CPU (benchmarks/RESULTS.md): torch's strided gather wins for small pages on the way out;
        # a memmove per segment wins otherwise, and by 3-6x on the way in (index_copy_ is slow)
        return "torch" if to_host and layout.segment_bytes <= CPU_TORCH_OFFLOAD_MAX_BYTES else "dma"
    for max_bytes, impl in _load_table().get("offload" if to_host else "load", []):
        if layout.segment_bytes <= max_bytes and impl in usable:
            return impl
    return "triton" if "triton" in usable else "dma"


_RUNNERS: dict[str, Callable[[TransferBatch, int], None]] = {
    "torch": lambda batch, _budget: reference.copy(batch),
    "triton": triton_copy.copy,
    "cuda": cuda_copy.copy,
    "staged": staged.copy,
    "dma": lambda batch, _budget: dma.copy(batch),
}


def transfer(layout: PageLayout, block_ids: IntsLike, arena: torch.Tensor, offsets: IntsLike, *, to_host: bool,
             impl: str = "auto", sm_budget: int = 0) -> str:
    """Validate, choose and run one batch; returns the implementation used."""
    if impl not in TRANSFER_IMPLS:
        raise ValueError(f"unknown transfer implementation {impl!r}; expected one of {TRANSFER_IMPLS}")
    if sm_budget < 0:
        raise ValueError(f"sm_budget must not be negative, got {sm_budget}")
    batch = TransferBatch.build(layout, block_ids, arena, offsets, to_host)
    chosen = choose(layout, to_host) if impl == "auto" else impl
    if chosen not in available_impls(layout.device):
        raise ValueError(f"transfer implementation {chosen!r} is not available for a cache on {layout.device}; "
                         f"available: {available_impls(layout.device)}")
    if batch.crosses_devices and chosen != "torch" and not arena.is_pinned():
        raise ValueError(f"{chosen} transfers between {layout.device} and the host need a pinned arena")
    _RUNNERS[chosen](batch, sm_budget)
    return chosen


def offload(layout: PageLayout, block_ids: IntsLike, arena: torch.Tensor, offsets: IntsLike, *,
            impl: str = "auto", sm_budget: int = 0) -> str:
    """Gather ``block_ids`` of the cache into ``arena[offsets[i]:offsets[i] + layout.block_bytes]``."""
    return transfer(layout, block_ids, arena, offsets, to_host=True, impl=impl, sm_budget=sm_budget)


def load(layout: PageLayout, block_ids: IntsLike, arena: torch.Tensor, offsets: IntsLike, *,
         impl: str = "auto", sm_budget: int = 0) -> str:
    """Scatter ``arena[offsets[i]:...]`` back into cache blocks ``block_ids`` (which must be unique)."""
    return transfer(layout, block_ids, arena, offsets, to_host=False, impl=impl, sm_budget=sm_budget)
