"""kvtier as a vLLM 0.33 ``OffloadingSpec``, loaded by vLLM's own ``OffloadingConnector``.

``--kv-transfer-config '{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":
{"spec_name":"KvtierOffloadingSpec","spec_module_path":"kvtier.integrations.vllm","host_capacity_bytes":"8GiB"}}'``

Scheduler process: ``KvtierOffloadingManager`` answers vLLM's lookups and plans stores with kvtier's block
``Manager`` (its eviction policy and agent-hint retention: pins, priorities, ephemeral blocks). G2 is a
slot array; the manager decides which chunk owns which slot and ships slot numbers in the job specs.
Worker processes: ``KvtierOffloadingWorker`` owns the slots (a ``HostPool``, pinned when CUDA exists) and
moves chunks between vLLM's canonical KV tensors and the slots with kvtier's transfer kernels.

Agent hints ride in a request's ``kv_transfer_params["agent_hints"]`` (vLLM passes them to the manager
verbatim); bad hints are logged and ignored, never raised into the serving loop. KV events carry medium
``CPU`` through vLLM's own event path. G3/G4 (disk, remote) are not reachable through this spec yet: vLLM
asserts on failed worker jobs, so a lower-tier read would have to be promoted before ``lookup`` answers HIT,
which needs a worker-to-scheduler channel this interface does not have; configuring them is an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    TransferResult,
)
from vllm.v1.kv_offload.config import OffloadingConfig

from kvtier import kernels
from kvtier.config import KvtierConfig
from kvtier.hashing import Namespace
from kvtier.hints import AgentHints, HintError, parse_hints
from kvtier.integrations.common import engine_key, kvtier_config, name_part
from kvtier.layout import VLLM_ORDERS, PageLayout, build_layout
from kvtier.manager import Manager, TierSpec
from kvtier.tiers.host import HostPool, round_up

log = logging.getLogger(__name__)

VLLM_KEYS = frozenset({"spec_name", "spec_module_path", "blocks_per_chunk", "block_size", "canonical_layout",
                       "sync_load_budget_bytes", "self_describing_kv_events", "offload_prompt_only",
                       "enable_telemetry"})
KVTIER_KEYS = frozenset({"host_capacity_bytes", "policy", "pin_budget_frac", "pin_lease_s", "transfer_impl",
                         "sm_budget", "model_name"})
HINTS_FIELD = "agent_hints"


class KvtierChunksSpec(BlockIDsLoadStoreSpec):
    """Where chunks live in G2: ``block_ids`` are host-pool slot numbers, one per chunk."""


def vllm_namespace(config: OffloadingConfig, model_name: str = "") -> Namespace:
    """What must match for two vLLM instances to share chunks: model, dtype, layout, chunking, parallelism.
    Tenants are kept apart by vLLM itself (``cache_salt`` is hashed into its block hashes)."""
    par = config.parallel
    layout = (f"vllm-{config.kv_cache_layout}-c{config.cache.blocks_per_chunk}x{config.groups[0].tokens_per_block}"
              f"-pp{par.pp_size}-pcp{par.pcp_size}-dcp{par.dcp_size}")
    return Namespace(model=name_part(model_name or config.model.name), dtype=name_part(config.model.dtype),
                     layout=layout, tp_rank=0, tp_size=par.tp_size)


def slot_bytes(config: OffloadingConfig) -> int:
    """One chunk of one worker, as the host pool rounds it (both sides must agree on slot numbering)."""
    return round_up(config.worker_kv_bytes_per_block * config.cache.blocks_per_chunk)


@dataclass
class _RequestState:
    hints: AgentHints
    chunks: dict[int, int] = field(default_factory=dict)   # chunk index -> kvtier key

    def ordered_keys(self) -> list[int]:
        """The request's chunk keys from chunk 0 up to the first one not seen."""
        out = []
        while len(out) in self.chunks:
            out.append(self.chunks[len(out)])
        return out


class KvtierOffloadingManager(OffloadingManager):
    """vLLM's scheduler-side view of G2, backed by kvtier's ``Manager`` (single tier, units of one slot)."""

    def __init__(self, namespace: Namespace, num_slots: int, chunk_tokens: int, cfg: KvtierConfig,
                 enable_events: bool) -> None:
        self.namespace = namespace
        self.num_slots = num_slots
        self.chunk_tokens = chunk_tokens
        self.policy = cfg.policy
        self.manager = Manager([TierSpec("G2", num_slots)], cfg.policy, pin_budget_frac=cfg.pin_budget_frac,
                               pin_lease_s=cfg.pin_lease_s, block_bytes=1)
        self._tier = self.manager.tiers[0]
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot: dict[int, int] = {}
        self._offload_key: dict[int, OffloadKey] = {}
        self._events: list[OffloadingEvent] | None = [] if enable_events else None

    @property
    def lock(self):
        return nullcontext()

    # --- keys and requests -----------------------------------------------------------------------------------
    def key(self, offload_key: OffloadKey) -> int:
        return engine_key(self.namespace, offload_key)

    def _keys(self, offload_keys: Iterable[OffloadKey], ctx: ReqContext | None) -> list[int]:
        state = ctx.get_state(_RequestState) if ctx is not None else None
        out = []
        for ok in offload_keys:
            k = self.key(ok)
            self._offload_key[k] = ok
            end = ctx.get_offload_key_position(ok) if state is not None else None
            if end is not None:
                state.chunks[(end - 1) // self.chunk_tokens] = k
            out.append(k)
        return out

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        params = req_context.kv_transfer_params or {}
        try:
            hints = parse_hints(params.get(HINTS_FIELD)) if isinstance(params, dict) else AgentHints()
        except HintError as exc:
            log.warning("kvtier: request %s: ignoring agent_hints: %s", req_context.req_id, exc)
            hints = AgentHints()
        req_context.set_state(_RequestState(hints))
        self.manager.begin_request(hints.session_id, hints=hints)
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._apply_hints(req_context)

    def _apply_hints(self, ctx: ReqContext) -> None:
        state = ctx.get_state(_RequestState)
        if state is None or state.hints == AgentHints():
            return
        report = self.manager.apply_hints(state.ordered_keys(), state.hints, self.chunk_tokens)
        if report.downgraded:
            log.info("kvtier: %d pinned chunks over the pin budget were given priority 100 instead",
                     len(report.downgraded))

    # --- loads ---------------------------------------------------------------------------------------------------
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        (k,) = self._keys([key], req_context)
        if k in self._tier.sizes:
            return LookupResult.HIT
        return LookupResult.HIT_PENDING if k in self._tier.pending else LookupResult.MISS

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        ks = self._keys(keys, req_context)
        self.manager.acquire(ks)
        self.manager.touch(ks)
        return KvtierChunksSpec([self._slot[k] for k in ks])

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.manager.touch(self._keys(keys, req_context))

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.manager.release(self._keys(keys, req_context))

    # --- stores --------------------------------------------------------------------------------------------------
    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        ks = self._keys(keys, req_context)
        state = req_context.get_state(_RequestState)
        held = [k for k in dict.fromkeys(ks) if k in self._tier.sizes]
        wanted = [k for k in dict.fromkeys(ks) if k not in self._tier.sizes and k not in self._tier.pending]
        self.manager.acquire(held)  # vLLM: keys passed in must not be evicted by this call
        try:
            plan = self.manager.prepare_store(ks, session=state.hints.session_id if state else None)
        finally:
            self.manager.release(held)
        evicted = []
        for key, _tier, _to in plan.evicted:
            self._free.append(self._slot.pop(key))
            evicted.append(self._offload_key.pop(key))
        self._publish(evicted, removed=True)
        if wanted and not plan.store:
            return None  # no room now (everything pinned or in use): vLLM retries next step
        slots = []
        for key in plan.store:
            self._slot[key] = slot = self._free.pop()
            slots.append(slot)
        return PrepareStoreOutput([self._offload_key[k] for k in plan.store], KvtierChunksSpec(slots), evicted)

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        ks = [k for k in self._keys(keys, req_context) if k in self._tier.pending]
        self.manager.complete_store(ks, ok=success)
        if success:
            self._publish([self._offload_key[k] for k in ks], removed=False)
            self._apply_hints(req_context)
        else:
            for k in ks:
                self._free.append(self._slot.pop(k))
                self._offload_key.pop(k, None)

    # --- housekeeping -------------------------------------------------------------------------------------------
    def _publish(self, keys: list[OffloadKey], removed: bool) -> None:
        if self._events is not None and keys:
            self._events.append(OffloadingEvent(keys=keys, medium=Medium.CPU, removed=removed))

    def take_events(self) -> Iterable[OffloadingEvent]:
        if not self._events:
            return ()
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> None:
        """Forget every chunk no job is using (vLLM's reset_prefix_cache with the connector)."""
        idle = [k for k in self._tier.sizes if self.manager.entry(k).readers == 0]
        self.manager.discard(idle, 0)
        for k in idle:
            self._free.append(self._slot.pop(k))
        self._publish([self._offload_key.pop(k) for k in idle], removed=True)

    def config_info(self) -> Sequence[dict[str, Any]]:
        return ({"kvtier_host_chunks": self.num_slots, "kvtier_policy": self.policy,
                 "kvtier_namespace": self.namespace.prefix},)

    def stats(self) -> dict[str, float]:
        """The G2 tier's counters (hits are counted by vLLM; writes, evictions, refusals here)."""
        return self.manager.stats()[0]


class KvtierOffloadingWorker(OffloadingWorker):
    """Moves chunks between vLLM's KV blocks and host-pool slots with kvtier's kernels.

    A chunk's slot holds ``blocks_per_chunk`` records of ``layout.block_bytes`` back to back (a record =
    every canonical tensor's page of that block, in tensor order). GPU copies run on a side stream and are
    reported finished when their event completes; CPU copies are synchronous.
    """

    def __init__(self, layout: PageLayout, pool: HostPool, blocks_per_chunk: int, cfg: KvtierConfig) -> None:
        self.layout = layout
        self.pool = pool
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


class KvtierOffloadingSpec(OffloadingSpec):
    """``spec_name: KvtierOffloadingSpec``, ``spec_module_path: kvtier.integrations.vllm``.

    Extra-config keys (besides vLLM's own): ``host_capacity_bytes`` (G2 per worker, e.g. ``"8GiB"``),
    ``policy``, ``pin_budget_frac``, ``pin_lease_s``, ``transfer_impl``, ``sm_budget``, ``model_name``
    (namespace override, for instances that load one model from different paths).
    """

    def __init__(self, config: OffloadingConfig):
        super().__init__(config)
        where = "KvtierOffloadingSpec"
        if "host_capacity_bytes" not in self.extra_config:
            raise ValueError(f"{where}: kv_connector_extra_config needs host_capacity_bytes (G2 per worker, "
                             f"e.g. \"8GiB\")")
        self.kvtier = kvtier_config(self.extra_config, VLLM_KEYS, KVTIER_KEYS, where)
        if len(config.groups) != 1:
            raise ValueError(f"{where}: {len(config.groups)} KV cache groups; kvtier handles one (no hybrid models)")
        if config.kv_cache_layout not in VLLM_ORDERS:
            raise ValueError(f"{where}: KV cache layout {config.kv_cache_layout!r} is not one of {VLLM_ORDERS}")
        self.slot_bytes = slot_bytes(config)
        self.num_slots = self.kvtier.host_capacity_bytes // self.slot_bytes
        if self.num_slots <= 0:
            raise ValueError(f"{where}: host_capacity_bytes={self.kvtier.host_capacity_bytes} holds no chunk of "
                             f"{self.slot_bytes} B; give at least one chunk")
        self.namespace = vllm_namespace(config, self.kvtier.model_name if "model_name" in self.extra_config else "")
        self._manager: KvtierOffloadingManager | None = None

    @classmethod
    def config_info_keys(cls, extra_config: dict[str, Any]) -> tuple[str, ...]:
        return ("kvtier_host_chunks", "kvtier_policy", "kvtier_namespace")

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            chunk_tokens = self.config.groups[0].tokens_per_block * self.blocks_per_chunk
            self._manager = KvtierOffloadingManager(self.namespace, self.num_slots, chunk_tokens, self.kvtier,
                                                    self.kv_events_config.enable_kv_cache_events)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        layout = canonical_layout(kv_caches, self.config.kv_cache_layout)
        if layout.block_bytes * self.blocks_per_chunk > self.slot_bytes:
            raise ValueError(f"KvtierOffloadingSpec: a chunk of this worker is {layout.block_bytes} B x "
                             f"{self.blocks_per_chunk} blocks, more than the planned slot of {self.slot_bytes} B")
        pool = HostPool(self.num_slots * self.slot_bytes, self.slot_bytes)
        return KvtierOffloadingWorker(layout, pool, self.blocks_per_chunk, self.kvtier)


def canonical_layout(kv_caches: CanonicalKVCaches, order: str) -> PageLayout:
    """vLLM's canonical block tensors as kvtier page descriptors: with LBHNC (what the connector asks for)
    one segment per layer and block, exactly ``vllm_layout`` of the ``[L, B, H, N, C]`` allocation."""
    if len(kv_caches.group_data_refs) != 1:
        raise ValueError(f"kvtier handles one KV cache group, got {len(kv_caches.group_data_refs)}")
    return build_layout(f"vllm-{order}", [[t.tensor[:, :t.page_size_bytes]] for t in kv_caches.tensors])
