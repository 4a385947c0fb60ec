"""Worker processes: ``KvtierOffloadingWorker`` moves chunks between vLLM's canonical KV tensors and its rank's
part of G2 with kvtier's transfer kernels.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

from kvtier import kernels
from kvtier.config import KvtierConfig
from kvtier.layout import PageLayout, build_layout
from kvtier.tiers.host import HostPool
from kvtier.tiers.shared_region import SharedRegion

class KvtierOffloadingWorker(OffloadingWorker):
    """Moves chunks between vLLM's KV blocks and this rank's part of G2 with kvtier's kernels.

    A chunk's slot holds ``blocks_per_chunk`` records of ``layout.block_bytes`` back to back (a record =
    every canonical tensor's page of that block, in tensor order). GPU copies run on a side stream and are
    reported finished when their event completes; CPU copies are synchronous. Slot numbers come from the
    scheduler, which owns the slots and every move below G2.
    """

    def __init__(self, layout: PageLayout, pool: HostPool, blocks_per_chunk: int, cfg: KvtierConfig,
                 region: SharedRegion | None = None) -> None:
        self.layout = layout
        self.pool = pool
        self.region = region
        self.blocks_per_chunk = blocks_per_chunk
        self.impl = cfg.transfer_impl
        self.sm_budget = cfg.sm_budget
        self._stream = torch.cuda.Stream(layout.device) if layout.device.type == "cuda" else None
        self._in_flight: dict[int, tuple[Any, int, float]] = {}
        self._done: list[TransferResult] = []

    def _offsets(self, gpu: GPULoadStoreSpec, chunks: BlockIDsLoadStoreSpec) -> list[int]:
        """Byte offsets in the pool of each GPU block; the first chunk may be entered part-way."""
        first = int(gpu.block_indices[0]) % self.blocks_per_chunk if len(gpu.block_indices) else 0
        n, slots = len(gpu.block_ids), chunks.block_ids
        if len(gpu.group_sizes) > 1 or -(-(first + n) // self.blocks_per_chunk) != len(slots):
            raise ValueError(f"{n} blocks starting at sub-block {first} do not fill {len(slots)} chunks of "
                             f"{self.blocks_per_chunk} blocks (one KV group only)")
        bb, sb = self.layout.block_bytes, self.pool.slot_bytes
        return [int(slots[(first + i) // self.blocks_per_chunk]) * sb + ((first + i) % self.blocks_per_chunk) * bb
                for i in range(n)]

    def _run(self, job_id: int, gpu: GPULoadStoreSpec, chunks: LoadStoreSpec, to_host: bool) -> bool:
        if not isinstance(chunks, BlockIDsLoadStoreSpec):
            raise TypeError(f"kvtier worker got a {type(chunks).__name__}, expected KvtierChunksSpec")
        offsets = self._offsets(gpu, chunks)
        ids = np.asarray(gpu.block_ids, dtype=np.int64)
        start = time.perf_counter()
        move = kernels.offload if to_host else kernels.load
        if self._stream is None:
            move(self.layout, ids, self.pool.buffer, offsets, impl=self.impl, sm_budget=self.sm_budget)
            self._done.append(TransferResult(job_id, True, len(ids) * self.layout.block_bytes,
                                             time.perf_counter() - start))
            return True
        self._stream.wait_stream(torch.cuda.current_stream(self.layout.device))
        with torch.cuda.stream(self._stream):
            move(self.layout, ids, self.pool.buffer, offsets, impl=self.impl, sm_budget=self.sm_budget)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._in_flight[job_id] = (event, len(ids) * self.layout.block_bytes, start)
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        return self._run(job_id, src_spec, dst_spec, to_host=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec,
                    expedited: bool = False) -> bool:
        return self._run(job_id, dst_spec, src_spec, to_host=False)

    def get_finished(self) -> list[TransferResult]:
        for job_id, (event, nbytes, start) in list(self._in_flight.items()):
            if event.query():
                del self._in_flight[job_id]
                self._done.append(TransferResult(job_id, True, nbytes, time.perf_counter() - start))
        done, self._done = self._done, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        for job_id in job_ids:
            if job_id in self._in_flight:
                self._in_flight[job_id][0].synchronize()

    def shutdown(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self.pool.close()
        if self.region is not None:
            self.region.close()


def canonical_layout(kv_caches: CanonicalKVCaches, order: str) -> PageLayout:
    """vLLM's canonical block tensors as kvtier page descriptors: with LBHNC (what the connector asks for)
    one segment per layer and block, exactly ``vllm_layout`` of the ``[L, B, H, N, C]`` allocation."""
    if len(kv_caches.group_data_refs) != 1:
        raise ValueError(f"kvtier handles one KV cache group, got {len(kv_caches.group_data_refs)}")
    return build_layout(f"vllm-{order}", [[t.tensor[:, :t.page_size_bytes]] for t in kv_caches.tensors])
