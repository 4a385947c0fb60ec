"""A test-only OffloadingSpec whose worker runs on CPU tensors.

vLLM's own CPUOffloadingSpec refuses a CPU platform in get_worker() and its handler asserts CUDA
tensors, so the worker side cannot be shown with it here. This spec keeps vLLM's real scheduler-side
CPUOffloadingManager and pairs it with a worker that copies pages between the canonical KV tensors
vLLM hands over and a host tensor, synchronously with torch. It exists to prove the harness drives
the real worker path (register_kv_caches -> CanonicalKVCaches -> get_worker -> submit_store /
submit_load -> get_finished); it is not kvtier.
"""

from __future__ import annotations

import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.config import OffloadingConfig
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager


class HostCopyWorker(OffloadingWorker):
    """One host row per offloaded chunk and canonical tensor; blocks_per_chunk must be 1."""

    def __init__(self, kv_caches: CanonicalKVCaches, num_chunks: int):
        if len(kv_caches.group_data_refs) != 1:
            raise ValueError("HostCopyWorker handles one KV cache group")
        self.device_tensors = [t.tensor for t in kv_caches.tensors]
        self.page_bytes = [t.page_size_bytes for t in kv_caches.tensors]
        self.host_tensors = [
            torch.zeros((num_chunks, page), dtype=torch.int8) for page in self.page_bytes
        ]
        self._finished: list[TransferResult] = []

    def _copy(self, job_id: int, gpu_blocks, host_chunks, to_host: bool) -> bool:
        if len(gpu_blocks) != len(host_chunks):
            raise ValueError(f"job {job_id}: {len(gpu_blocks)} blocks for {len(host_chunks)} chunks")
        nbytes = 0
        for device, host, page in zip(self.device_tensors, self.host_tensors, self.page_bytes):
            rows = torch.as_tensor(gpu_blocks, dtype=torch.long)
            slots = torch.as_tensor(host_chunks, dtype=torch.long)
            if to_host:
                host[slots] = device[rows, :page]
            else:
                device[rows, :page] = host[slots]
            nbytes += page * len(rows)
        self._finished.append(TransferResult(job_id, True, nbytes, 0.0))
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        assert isinstance(dst_spec, BlockIDsLoadStoreSpec)
        return self._copy(job_id, src_spec.block_ids, dst_spec.block_ids, to_host=True)

    def submit_load(
        self,
        job_id: int,
        src_spec: LoadStoreSpec,
        dst_spec: GPULoadStoreSpec,
        expedited: bool = False,
    ) -> bool:
        assert isinstance(src_spec, BlockIDsLoadStoreSpec)
        return self._copy(job_id, dst_spec.block_ids, src_spec.block_ids, to_host=False)

    def get_finished(self) -> list[TransferResult]:
        finished, self._finished = self._finished, []
        return finished

    def wait(self, job_ids: set[int]) -> None:
        return  # copies are synchronous


class HostCopyOffloadingSpec(OffloadingSpec):
    """extra config: ``num_chunks`` (host capacity in chunks, > 0)."""

    def __init__(self, config: OffloadingConfig):
        super().__init__(config)
        self.num_chunks = int(self.extra_config.get("num_chunks", 0))
        if self.num_chunks <= 0:
            raise ValueError("HostCopyOffloadingSpec needs num_chunks > 0 in kv_connector_extra_config")
        if self.blocks_per_chunk != 1:
            raise ValueError("HostCopyOffloadingSpec supports blocks_per_chunk == 1 only")
        self._manager: OffloadingManager | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            self._manager = CPUOffloadingManager(
                num_chunks=self.num_chunks,
                enable_events=self.kv_events_config.enable_kv_cache_events,
            )
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        return HostCopyWorker(kv_caches, self.num_chunks)
