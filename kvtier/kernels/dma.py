"""The copy engines: one DMA per segment instead of a kernel.

On a GPU, the whole batch goes to ``cudaMemcpyBatchAsync`` (CUDA >= 12.8; vLLM's and Dynamo's default) in one
call, or, on an older runtime, to a loop of ``cudaMemcpyAsync`` per segment (vLLM's fallback). No SM is used,
which matters when a forward pass runs beside the transfer. On the host the same segment list runs through
``memmove``, the CPU analogue of a per-page copy loop.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kvtier.kernels.batch import TransferBatch

_MEMCPY_DEFAULT = 4             # cudaMemcpyDefault: direction inferred from the (UVA) addresses
_SRC_ACCESS_ORDER_STREAM = 1    # cudaMemcpySrcAccessOrderStream


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _MemLocation), ("dstLocHint", _MemLocation),
                ("flags", ctypes.c_uint)]


def segment_addresses(batch: TransferBatch) -> tuple[list[int], list[int], int]:
    """(sources, destinations, bytes each) for every (block, segment) of the batch."""
    lay = batch.layout
    ids = batch.block_ids.tolist()
    hosts = batch.host_ptrs.tolist()
    cache, arena = [], []
    for block, host in zip(ids, hosts):
        for j in range(lay.num_segments):
            cache.append(lay.seg_ptrs[j] + block * lay.seg_block_strides[j])
            arena.append(host + j * lay.segment_bytes)
    return (cache, arena, lay.segment_bytes) if batch.to_host else (arena, cache, lay.segment_bytes)


@functools.lru_cache(maxsize=1)
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime torch already loaded (so both share one context), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.init()
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart" in line}
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    try:
        return ctypes.CDLL("libcudart.so")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def runtime_version() -> int:
    lib = _cudart()
    if lib is None:
        return 0
    version = ctypes.c_int(0)
    lib.cudaRuntimeGetVersion(ctypes.byref(version))
    return version.value


def has_batch_copy() -> bool:
    return runtime_version() >= 12080


def _check(err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"{what} failed with cudaError {err}")


@functools.lru_cache(maxsize=None)
def _batch_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(torch.device("cuda", device_index))


def _batch_copy_off_the_legacy_stream(srcs: list[int], dsts: list[int], nbytes: int, device: torch.device) -> None:
    """cudaMemcpyBatchAsync refuses the legacy default stream (torch's current stream unless a caller set one):
    run the batch on a stream of its own, ordered after the current stream's work and before its next."""
    current = torch.cuda.current_stream(device)
    side = _batch_stream(current.device_index)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        _gpu_copy(srcs, dsts, nbytes, device, batched=True)
    current.wait_stream(side)


def _gpu_copy(srcs: list[int], dsts: list[int], nbytes: int, device: torch.device, batched: bool) -> None:
    lib = _cudart()
    handle = torch.cuda.current_stream(device).cuda_stream
    if batched and handle == 0:
        _batch_copy_off_the_legacy_stream(srcs, dsts, nbytes, device)
        return
    stream = ctypes.c_void_p(handle)
    count = len(srcs)
    if batched:
        src_arr = (ctypes.c_void_p * count)(*srcs)
        dst_arr = (ctypes.c_void_p * count)(*dsts)
        sizes = (ctypes.c_size_t * count)(*([nbytes] * count))
        attrs = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM, _MemLocation(0, 0), _MemLocation(0, 0), 0)
        attr_idx = (ctypes.c_size_t * 1)(0)
        if runtime_version() >= 13000:
            err = lib.cudaMemcpyBatchAsync(dst_arr, src_arr, sizes, ctypes.c_size_t(count), ctypes.byref(attrs),
                                           attr_idx, ctypes.c_size_t(1), stream)
        else:
            fail_idx = ctypes.c_size_t(0)
            err = lib.cudaMemcpyBatchAsync(dst_arr, src_arr, sizes, ctypes.c_size_t(count), ctypes.byref(attrs),
                                           attr_idx, ctypes.c_size_t(1), ctypes.byref(fail_idx), stream)
        _check(err, "cudaMemcpyBatchAsync")
        return
    memcpy = lib.cudaMemcpyAsync
    size = ctypes.c_size_t(nbytes)
    for src, dst in zip(srcs, dsts):
        _check(memcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), size, _MEMCPY_DEFAULT, stream), "cudaMemcpyAsync")


def copy(batch: TransferBatch, batched: bool | None = None) -> None:
    """Move the batch with copy engines; ``batched=None`` uses cudaMemcpyBatchAsync when the runtime has it."""
    if batch.num_blocks == 0:
        return
    srcs, dsts, nbytes = segment_addresses(batch)
    on_gpu = batch.layout.device.type == "cuda" or batch.arena.device.type == "cuda"
    if on_gpu:
        _gpu_copy(srcs, dsts, nbytes, batch.layout.device, has_batch_copy() if batched is None else batched)
        return
    for src, dst in zip(srcs, dsts):
        ctypes.memmove(dst, src, nbytes)
