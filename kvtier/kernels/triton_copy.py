"""Triton gather/scatter over a descriptor table of int64 addresses.

One launch moves a whole batch, all layers: work item = (block, segment, tile). The grid is persistent and
capped by ``sm_budget`` so a transfer leaves SMs to a concurrent forward pass. Host memory is addressed
directly (zero-copy over UVA: pinned host memory is mapped into the device's address space). Elements are
as wide as the addresses' common alignment allows (16-byte vector accesses when everything is 16-aligned);
a segment whose size is not a multiple of that width ends in a byte-wise tail.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional extra; the dispatcher reports it unavailable
    triton = None

from kvtier.kernels.batch import TransferBatch

TILE_BYTES = 8192
CTAS_PER_SM = 2
_ELEM_DTYPES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64", 16: "int32"}


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _copy_segments(seg_ptrs, seg_strides, block_ids, host_ptrs, num_items, num_segs, tiles_per_seg,
                       SEG_BYTES: tl.constexpr, BODY_ELEMS: tl.constexpr, TAIL_BYTES: tl.constexpr,
                       ELEM: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, TO_HOST: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        for item in range(pid, num_items, nprog):
            tile = item % tiles_per_seg
            rest = item // tiles_per_seg
            seg = rest % num_segs
            blk = rest // num_segs
            cache_addr = tl.load(seg_ptrs + seg) + tl.load(block_ids + blk) * tl.load(seg_strides + seg)
            host_addr = tl.load(host_ptrs + blk) + seg * SEG_BYTES
            if TO_HOST:
                src_addr = cache_addr
                dst_addr = host_addr
            else:
                src_addr = host_addr
                dst_addr = cache_addr
            offs = tile * BLOCK + tl.arange(0, BLOCK)
            mask = offs < BODY_ELEMS
            src = src_addr.to(tl.pointer_type(ELEM)) + offs
            dst = dst_addr.to(tl.pointer_type(ELEM)) + offs
            src = tl.max_contiguous(tl.multiple_of(src, ALIGN), BLOCK)
            dst = tl.max_contiguous(tl.multiple_of(dst, ALIGN), BLOCK)
            tl.store(dst, tl.load(src, mask=mask), mask=mask)
            if TAIL_BYTES > 0:
                if tile == 0:
                    tail = tl.arange(0, 16)
                    tmask = tail < TAIL_BYTES
                    body = SEG_BYTES - TAIL_BYTES
                    tsrc = src_addr.to(tl.pointer_type(tl.uint8)) + body + tail
                    tdst = dst_addr.to(tl.pointer_type(tl.uint8)) + body + tail
                    tl.store(tdst, tl.load(tsrc, mask=tmask), mask=tmask)


def grid_size(num_items: int, device: torch.device, sm_budget: int) -> int:
    """Persistent grid: at most ``CTAS_PER_SM`` CTAs on each of ``sm_budget`` SMs (0 = every SM)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        budget = sms if sm_budget <= 0 else min(sm_budget, sms)
        return max(1, min(num_items, budget * CTAS_PER_SM))
    return max(1, min(num_items, 4))  # interpreter: a few programs exercise the persistent loop


def copy(batch: TransferBatch, sm_budget: int = 0) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'kvtier[triton]')")
    lay = batch.layout
    if batch.num_blocks == 0:
        return
    width = batch.alignment
    elem = getattr(tl, _ELEM_DTYPES[width])
    elem_bytes = 4 if width == 16 else width
    body_elems = lay.segment_bytes // width * (width // elem_bytes)  # whole vectors; masks stay aligned
    tail = lay.segment_bytes % width
    block = max(16, TILE_BYTES // elem_bytes)
    tiles = max(1, triton.cdiv(body_elems, block))
    dev = lay.device
    seg_ptrs, seg_strides = lay.descriptor_tensors(dev)
    block_ids = batch.block_ids.to(dev)
    host_ptrs = batch.host_ptrs.to(dev)
    items = batch.num_blocks * lay.num_segments * tiles
    grid = (grid_size(items, dev, sm_budget),)
    _copy_segments[grid](seg_ptrs, seg_strides, block_ids, host_ptrs, items, lay.num_segments, tiles,
                         SEG_BYTES=lay.segment_bytes, BODY_ELEMS=body_elems, TAIL_BYTES=tail, ELEM=elem,
                         ALIGN=width, BLOCK=block, TO_HOST=batch.to_host, num_warps=4)
