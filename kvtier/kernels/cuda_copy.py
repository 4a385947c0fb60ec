"""The CUDA C kernel of ``csrc/kvtier_copy.cu``: loaded from the fatbin ``setup.py`` built, or compiled at
first use through NVRTC by cupy (which caches the binary on disk), and launched on torch's current stream."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kvtier.kernels.batch import TransferBatch

KERNEL_NAME = "kvtier_copy_segments"
THREADS = 256
CTAS_PER_SM = 2
_HERE = Path(__file__).resolve().parent
SOURCE_CANDIDATES = (_HERE.parent.parent / "csrc" / "kvtier_copy.cu", _HERE / "_csrc" / "kvtier_copy.cu")
FATBIN = _HERE / "kvtier_copy.fatbin"


def source_path() -> Path:
    for path in SOURCE_CANDIDATES:
        if path.exists():
            return path
    raise FileNotFoundError("kvtier_copy.cu not found next to the package (csrc/ or kvtier/kernels/_csrc/)")


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        if FATBIN.exists():
            try:  # a fatbin from a newer toolkit than the driver supports fails to load: compile instead
                return cupy.RawModule(path=str(FATBIN)).get_function(KERNEL_NAME)
            except cupy.cuda.driver.CUDADriverError:
                pass
        module = cupy.RawModule(code=source_path().read_text(), options=("-std=c++17",))
        return module.get_function(KERNEL_NAME)


def copy(batch: TransferBatch, sm_budget: int = 0) -> None:
    import cupy
    import numpy as np

    lay = batch.layout
    if batch.num_blocks == 0:
        return
    if lay.device.type != "cuda":
        raise ValueError("the CUDA kernel needs a KV cache on a CUDA device")
    dev = lay.device
    seg_ptrs, seg_strides = lay.descriptor_tensors(dev)
    block_ids = batch.block_ids.to(dev)
    host_ptrs = batch.host_ptrs.to(dev)
    items = batch.num_blocks * lay.num_segments
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    budget = sms if sm_budget <= 0 else min(sm_budget, sms)
    grid = max(1, min(items, budget * CTAS_PER_SM))
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream, dev.index)
    with cupy.cuda.Device(dev.index), stream:
        _kernel(dev.index)((grid,), (THREADS,), (
            np.uint64(seg_ptrs.data_ptr()), np.uint64(seg_strides.data_ptr()), np.uint64(block_ids.data_ptr()),
            np.uint64(host_ptrs.data_ptr()),
            np.int64(batch.num_blocks), np.int32(lay.num_segments), np.int64(lay.segment_bytes),
            np.int32(batch.to_host), np.int32(batch.alignment == 16)))
