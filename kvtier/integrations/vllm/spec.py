"""``KvtierOffloadingSpec``: what vLLM loads by ``spec_module_path`` in the scheduler and in every worker; it
checks the configuration, names the namespace and the shared G2 regions, and builds each side.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
)
from vllm.v1.kv_offload.config import OffloadingConfig

from kvtier.cascade import SPARE_SLOTS
from kvtier.errors import ConfigError
from kvtier.hashing import Namespace
from kvtier.integrations.common import kvtier_config, name_part, per_dp_rank
from kvtier.integrations.vllm.scheduler import METRIC_DEFINITIONS, KvtierOffloadingManager
from kvtier.integrations.vllm.worker import KvtierOffloadingWorker, canonical_layout
from kvtier.layout import VLLM_ORDERS
from kvtier.tiers.host import HostPool, host_slots, round_up
from kvtier.tiers.shared_region import SharedRegion

VLLM_KEYS = frozenset({"spec_name", "spec_module_path", "blocks_per_chunk", "block_size", "canonical_layout",
                       "sync_load_budget_bytes", "self_describing_kv_events", "offload_prompt_only",
                       "enable_telemetry"})


def vllm_namespace(config: OffloadingConfig, model_name: str = "", salt: str = "") -> Namespace:
    """What must match for two vLLM instances to share chunks: model, dtype, layout, chunking, parallelism, and
    the deployment's ``cache_salt``. Tenants within one deployment are kept apart by vLLM itself (a request's
    ``cache_salt`` is hashed into its block hashes)."""
    par = config.parallel
    layout = (f"vllm-{config.kv_cache_layout}-c{config.cache.blocks_per_chunk}x{config.groups[0].tokens_per_block}"
              f"-pp{par.pp_size}-pcp{par.pcp_size}-dcp{par.dcp_size}")
    return Namespace(model=name_part(model_name or config.model.name), dtype=name_part(config.model.dtype),
                     layout=layout, tp_rank=0, tp_size=par.world_size, salt=salt)


def slot_bytes(config: OffloadingConfig) -> int:
    """One chunk of one worker, as the host pool rounds it (both sides must agree on slot numbering and on
    the size of each rank's part)."""
    return round_up(config.worker_kv_bytes_per_block * config.cache.blocks_per_chunk)


class KvtierOffloadingSpec(OffloadingSpec):
    """``spec_name: KvtierOffloadingSpec``, ``spec_module_path: kvtier.integrations.vllm``.

    Extra-config keys (besides vLLM's own): ``host_capacity_bytes`` (G2 per worker, e.g. ``"8GiB"``),
    ``policy``, ``pin_budget_frac``, ``pin_lease_s``, ``transfer_impl``, ``sm_budget``, ``model_name``
    (namespace override, for instances that load one model from different paths), the G3 keys
    (``disk_path``, ``disk_capacity_bytes`` for all ranks together, ``disk_io_threads``, ...), the G4 keys
    (``remote_url``, ``remote_ttl_s``, ...), ``admission_min_hits``, ``write_through`` and
    ``lower_tier_deadline_ms`` (how long ``lookup`` may answer HIT_PENDING before a promotion is a miss).
    """

    def __init__(self, config: OffloadingConfig):
        super().__init__(config)
        where = "KvtierOffloadingSpec"
        self.kvtier = kvtier_config(self.extra_config, VLLM_KEYS, where)
        self.kvtier = per_dp_rank(self.kvtier, config.parallel.data_parallel_index)
        if len(config.groups) != 1:
            raise ValueError(f"{where}: {len(config.groups)} KV cache groups; kvtier handles one (no hybrid models)")
        if config.kv_cache_layout not in VLLM_ORDERS:
            raise ValueError(f"{where}: KV cache layout {config.kv_cache_layout!r} is not one of {VLLM_ORDERS}")
        self.chunk_bytes = config.worker_kv_bytes_per_block * config.cache.blocks_per_chunk
        self.slot_bytes = slot_bytes(config)
        spare = SPARE_SLOTS if self.kvtier.disk_path or self.kvtier.remote_url else 0
        try:
            self.num_slots = host_slots(self.kvtier.host_capacity_bytes, self.slot_bytes, spare)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        self.world_size = config.parallel.world_size
        self.namespace = vllm_namespace(config, self.kvtier.model_name if "model_name" in self.extra_config else "",
                                        self.kvtier.cache_salt)
        self._manager: KvtierOffloadingManager | None = None

    @classmethod
    def build_metric_definitions(cls, extra_config: dict[str, Any]) -> dict[str, Any]:
        return dict(METRIC_DEFINITIONS)

    @classmethod
    def config_info_keys(cls, extra_config: dict[str, Any]) -> tuple[str, ...]:
        return ("kvtier_host_chunks", "kvtier_policy", "kvtier_namespace", "kvtier_tiers")

    def _region(self, rank: int) -> SharedRegion:
        """Rank ``rank``'s part of G2: the scheduler maps every part, a worker its own."""
        name = f"kvtier-{name_part(self.config.engine_id)}-rank{rank}"
        return SharedRegion(name, self.num_slots * self.slot_bytes)

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            regions: list[SharedRegion] = []
            try:
                regions = [self._region(r) for r in range(self.world_size)]
                chunk_tokens = self.config.groups[0].tokens_per_block * self.blocks_per_chunk
                self._manager = KvtierOffloadingManager(
                    self.namespace, regions, self.slot_bytes, self.num_slots, self.chunk_bytes, chunk_tokens,
                    self.kvtier, self.kv_events_config.enable_kv_cache_events)
            except BaseException:
                for region in regions:
                    region.close()
                raise
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        layout = canonical_layout(kv_caches, self.config.kv_cache_layout)
        if layout.block_bytes * self.blocks_per_chunk > self.slot_bytes:
            raise ValueError(f"KvtierOffloadingSpec: a chunk of this worker is {layout.block_bytes} B x "
                             f"{self.blocks_per_chunk} blocks, more than the planned slot of {self.slot_bytes} B")
        region = self._region(self.config.parallel.rank)
        try:
            pool = HostPool(self.num_slots * self.slot_bytes, self.slot_bytes, buffer=region.buffer)
        except BaseException:
            region.close()
            raise
        return KvtierOffloadingWorker(layout, pool, self.blocks_per_chunk, self.kvtier, region)
