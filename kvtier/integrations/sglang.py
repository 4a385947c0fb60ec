"""kvtier as an SGLang 0.5.23 HiCache storage backend (``--hicache-storage-backend dynamic``).

``--hicache-storage-backend-extra-config '{"backend_name":"kvtier","module_path":"kvtier.integrations.sglang",
"class_name":"KvtierHiCacheStorage","interface_v1":1,"host_capacity_bytes":"16GiB","disk_path":"/nvme/kvtier"}'``

SGLang's own host pool is its L2; kvtier sits below it with its whole block manager, as under the engine and
vLLM: one ``Cascade`` over a kvtier ``HostTier`` (G2) and an optional ``DiskTier`` (G3) and ``RemoteTier`` (G4),
all keyed under one ``Namespace`` (model, dtype, pool layout, page size and bytes, TP/PP/CP rank; MLA pages are
rank-independent). The manager decides what stays in G2 (the configured policy, pins with leases, priorities
with TTL, ephemeral pages evicted first and never written below G2) and what its evictions demote (G3/G4
admission); ``write_through`` copies every stored page down at once. A page found only below is promoted into
G2 on read, and one an earlier process or another machine wrote (the rebuilt disk index, Redis) is adopted
without a write. Each process has its own host tier and disk directory (``disk_path/dp<rank>``); with MLA and
TP > 1 only one rank per shard writes (SGLang's ``is_storage_writer``), writing through to the remote tier, which
such a deployment must have, so the other ranks read it there. Only the KV pool is stored: hybrid models'
sidecar pools (SWA, Mamba, ...) use SGLang's v2 calls, which are refused when the backend is attached.

Agent hints: SGLang passes no request id, session or hints with its storage calls (only
``HiCacheStorageExtraInfo.prefix_keys``, the page hashes before a batch), so hints cannot arrive per request;
``KvtierHiCacheStorage.apply_hints(page_keys, hints)`` applies them to a sequence's pages from the process that
holds the backend.

Zero-copy (``interface_v1: 1``): ``batch_set_v1`` / ``batch_get_v1`` move pages between SGLang's host pool
buffer and kvtier's host slots with kvtier's transfer kernels over a descriptor of the pool's layout
(``layer_first``, ``page_first``, ``page_first_direct``; MHA and MLA), in ``get_page_buffer_meta`` byte order.
Without it SGLang uses the copying ``batch_set`` / ``batch_get`` on flat page tensors. Lower-tier failures are
misses; configuration errors are raised when SGLang attaches the backend (start-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
)
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

from kvtier import kernels
from kvtier.cascade import G2, G3, G4, SPARE_SLOTS, TIER_NAMES, Cascade, spare_slots
from kvtier.errors import ConfigError
from kvtier.hashing import Namespace
from kvtier.hints import AgentHints
from kvtier.integrations.common import engine_key, kvtier_config, name_part, open_disk_tier, per_dp_rank
from kvtier.layout import PageLayout, sglang_host_layout
from kvtier.manager.core import PinReport
from kvtier.metrics import EngineMetrics
from kvtier.tiers import open_remote_tier
from kvtier.tiers.base import Tier
from kvtier.tiers.host import HostPool, HostTier, host_slots

log = logging.getLogger(__name__)

# SGLang's own keys (file_storage_path: SGLang adds it to every backend's config with --file-storage-path)
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "extra_backend_tag",
                         "enable_metadata_cache", "metadata_ttl", "file_storage_path"})
WHERE = "KvtierHiCacheStorage"


def sglang_namespace(config: HiCacheStorageConfig, host_pool: Any, page_bytes: int, zero_copy: bool,
                     model_name: str = "", salt: str = "") -> Namespace:
    """Everything that changes a page's bytes, and the deployment's ``cache_salt`` (pages of deployments with
    different salts are never shared, in Redis either); page hashes already carry the tokens. DP
    ranks share pages (same heads); MLA TP ranks too (SGLang's ``is_mla_model``: every rank holds the page)."""
    mla = isinstance(host_pool, MLATokenToKVPoolHost)
    layout = (f"sglang-{'mla' if mla else 'mha'}-{host_pool.layout}-p{host_pool.page_size}-b{page_bytes}-"
              f"{'v1' if zero_copy else 'flat'}-pp{config.pp_rank}of{config.pp_size}-"
              f"cp{config.attn_cp_rank}of{config.attn_cp_size}-dcp{config.dcp_rank}of{config.dcp_size}")
    tp_rank, tp_size = (0, 1) if config.is_mla_model else (config.tp_rank, config.tp_size)
    return Namespace(model=name_part(model_name or config.model_name or "model"),
                     dtype=name_part(str(host_pool.dtype).removeprefix("torch.")), layout=layout,
                     tp_rank=tp_rank, tp_size=tp_size, salt=salt)


class KvtierHiCacheStorage(HiCacheStorage):
    """kvtier's block manager and tiers behind SGLang's HiCache storage interface (see the module docstring)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        extra = dict(storage_config.extra_config or {})
        self.cfg = kvtier_config(extra, SGLANG_KEYS, WHERE)
        if self.cfg.host_capacity_bytes <= 0:
            raise ValueError(f"{WHERE}: host_capacity_bytes must be positive, got {self.cfg.host_capacity_bytes}")
        self.storage_config = storage_config
        self.zero_copy = bool(extra.get("interface_v1", 0))
        self._model_name = self.cfg.model_name if "model_name" in extra else ""
        self.namespace: Namespace | None = None
        self.layout: PageLayout | None = None
        self.cascade: Cascade | None = None
        self.lock = threading.RLock()  # SGLang's backup and prefetch threads call in at once
        self.metrics = EngineMetrics()

    # --- attach ----------------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Build the manager and tiers for this pool's page format (the namespace needs its dtype and layout)."""
        config = self.storage_config
        shared_by_ranks = config.is_mla_model and config.tp_size > config.dcp_size
        if shared_by_ranks and not self.cfg.remote_url:
            raise ValueError(f"{WHERE}: with MLA and TP > 1 only one rank per shard writes pages and the others "
                             "read them, so every rank needs a tier they all reach: set remote_url (host and "
                             "disk tiers are per process)")
        if not isinstance(mem_pool_host.kv_buffer, torch.Tensor):
            raise ValueError(f"{WHERE}: {type(mem_pool_host).__name__} keeps K and V in separate buffers; "
                             "kvtier stores pools with one kv_buffer")
        mla = isinstance(mem_pool_host, MLATokenToKVPoolHost)
        layout = sglang_host_layout(mem_pool_host.kv_buffer, mem_pool_host.layout, mem_pool_host.page_size, mla)
        check_layout_against_pool(layout, mem_pool_host)
        namespace = sglang_namespace(config, mem_pool_host, layout.block_bytes, self.zero_copy, self._model_name,
                                     self.cfg.cache_salt)
        below = self.cfg.remote_url or (self.cfg.disk_path and config.is_storage_writer)
        try:
            host_slots(self.cfg.host_capacity_bytes, layout.block_bytes, SPARE_SLOTS if below else 0, unit="page")
        except ConfigError as exc:
            raise ConfigError(f"{WHERE}: {exc}") from None
        pool = HostPool(self.cfg.host_capacity_bytes, layout.block_bytes)
        self.close()
        lower: dict[int, Tier] = {}
        try:
            if self.cfg.disk_path and config.is_storage_writer:  # a reader rank never writes its own disk
                lower[G3] = open_disk_tier(per_dp_rank(self.cfg, config.dp_rank), namespace, layout.block_bytes,
                                           WHERE)
            if self.cfg.remote_url:
                lower[G4] = open_remote_tier(self.cfg, namespace)
            spare = spare_slots(pool.num_slots) if lower else 0
        except BaseException:
            for tier in lower.values():
                tier.close()
            pool.close()
            raise
        super().register_mem_pool_host(mem_pool_host)
        # the other ranks read what the writer stores: every page reaches the shared tier at once, not on eviction
        cfg = dataclasses.replace(self.cfg, write_through=True, admission_min_hits=0) if shared_by_ranks else self.cfg
        self.layout, self.namespace = layout, namespace
        self.cascade = Cascade(cfg, self.metrics, HostTier(namespace, pool, own_pool=True), lower,
                               unit=pool.slot_bytes, chunk_bytes=layout.block_bytes, spare_host_slots=spare,
                               lock=self.lock, events=_NO_EVENTS)

    def on_host_pools_registered(self) -> None:
        """Refuse hybrid models' sidecar pools: SGLang would store them through the v2 calls, which kvtier does
        not implement (every request would log a failure and hit nothing). Raising here fails the attach."""
        sidecars = sorted(str(getattr(name, "value", name)) for name in getattr(self, "registered_pools", {})
                          if name != PoolName.KV)
        if sidecars:
            raise ValueError(f"{WHERE}: stores the KV pool only; this model also has host pools {sidecars} "
                             "(SGLang's v2 storage interface), which kvtier does not support")

    def clear(self) -> None:
        """Forget every stored page in every tier, the shared remote namespace included (SGLang's
        /clear_hicache_storage_backend and PD role switches: stale pages there would be wrong KV)."""
        cascade = self._ready()
        cascade.drain()
        with self.lock:
            for g in cascade.tiers:
                cascade.discard(list(cascade.held(g)), g)
        cascade.drain()
        for g, tier in cascade.tiers.items():
            cascade.guarded(g, "clear", tier.clear, 0)

    def _key(self, key: str) -> int:
        return engine_key(self.namespace, key)

    def _ready(self) -> Cascade:
        if self.cascade is None:
            raise RuntimeError(f"{WHERE}: no host pool registered (SGLang calls register_mem_pool_host on attach)")
        return self.cascade

    # --- agent hints -----------------------------------------------------------------------------------------
    def apply_hints(self, page_keys: list[str], hints: AgentHints) -> PinReport:
        """Retention for one sequence's pages, ``page_keys`` from its first page (SGLang's page hashes, as in
        ``HiCacheStorageExtraInfo.prefix_keys`` + keys): pins with leases, priorities with their duration,
        ephemeral spans (evicted first, never written below G2), token positions counted in pages of
        ``page_size`` tokens. SGLang passes no request or session with its storage calls, so this is the
        session-level way in: call it from the process that holds the backend (e.g. a server hook that knows
        each session's system prompt and tools). With ``prefetch`` (or ``next_call_delay_s``) the pages held only
        below G2 come up into G2 in the background, in order, while it has room."""
        cascade = self._ready()
        ks = [self._key(k) for k in page_keys]
        with self.lock:
            report = cascade.manager.apply_hints(ks, hints, self.mem_pool_host.page_size)
        if hints.prefetch or hints.next_call_delay_s:
            cascade.submit(self._prefetch, ks, hints.session_id)
        return report

    def _prefetch(self, ks: list[int], session: str | None) -> int:
        """Mover: promote the pages held only below G2; how many came up by the deadline."""
        promotions = self.cascade.promote(ks, wait=False, session=session)
        return sum(self.cascade.await_promotion(p) for p in promotions.values())

    # --- zero-copy interface ---------------------------------------------------------------------------------
    def _pages(self, host_indices: torch.Tensor, n: int) -> torch.Tensor:
        page_size = self.mem_pool_host.page_size
        if len(host_indices) != n * page_size:
            raise ValueError(f"{n} keys need {n * page_size} host indices, got {len(host_indices)}")
        return (host_indices[::page_size] // page_size).to(torch.int64).cpu()

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        self._ready()
        pages = self._pages(host_indices, len(keys))

        def gather(rows: list[int], slots: list[torch.Tensor]) -> None:
            kernels.offload(self.layout, pages[rows], self.cascade.host.pool.buffer,
                            [self.cascade.host.slot_offset(v) for v in slots], impl=self.cfg.transfer_impl,
                            sm_budget=self.cfg.sm_budget)
            self._wait_for_device()

        return self._store([self._key(k) for k in keys], gather)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        cascade = self._ready()
        pages = self._pages(host_indices, len(keys))
        ks = [self._key(k) for k in keys]
        done = 0
        while done < len(ks):  # in rounds: a host tier smaller than the batch is refilled between them
            with contextlib.ExitStack() as held:
                found = self._borrow_prefix(held, ks[done:])
                if found:
                    kernels.load(self.layout, pages[done:done + len(found)], cascade.host.pool.buffer,
                                 [cascade.host.slot_offset(v) for v in found], impl=self.cfg.transfer_impl,
                                 sm_budget=self.cfg.sm_budget)
                    self._wait_for_device()
            if not found:
                break
            done += len(found)
        return [True] * done + [False] * (len(ks) - done)

    # --- existence -------------------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading keys some tier holds (or is writing)."""
        cascade = self._ready()
        count = 0
        for key in (self._key(k) for k in keys):
            with self.lock:
                known = cascade.where(key) is not None or key in cascade.writing(G2)
            if not known and self._find_below(key) is None:
                break
            count += 1
        return count

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # --- copying interface (SGLang without interface_v1) -----------------------------------------------------
    def set(self, key: str, value: torch.Tensor | None = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        self._ready()
        if value is None:
            raise ValueError(f"{WHERE}.set needs a value tensor")
        page = _flat_bytes(value.contiguous())
        if len(page) != self.layout.block_bytes:
            raise ValueError(f"{WHERE}.set: a page is {self.layout.block_bytes} B, got {len(page)}")
        return self._store([self._key(key)], lambda _rows, slots: slots[0].copy_(page))[0]

    def batch_set(self, keys: list[str], values: list[torch.Tensor] | None = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if values is None or len(values) != len(keys):
            raise ValueError(f"{WHERE}.batch_set needs one value per key")
        stored = [self.set(k, v) for k, v in zip(keys, values)]  # every page, not up to the first failure
        return all(stored)

    def get(self, key: str, target_location: torch.Tensor | None = None, target_sizes: Any = None) -> torch.Tensor | None:
        self._ready()
        if target_location is None:
            raise ValueError(f"{WHERE}.get needs a target_location tensor")
        target = _flat_bytes(target_location)
        with contextlib.ExitStack() as held:
            found = self._borrow_prefix(held, [self._key(key)])
            if not found or len(found[0]) != len(target):
                return None
            target.copy_(found[0])
        return target_location

    def batch_get(self, keys: list[str], target_locations: list[torch.Tensor] | None = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        if target_locations is None or len(target_locations) != len(keys):
            raise ValueError(f"{WHERE}.batch_get needs one target location per key")
        return [self.get(k, t) for k, t in zip(keys, target_locations)]

    # --- through the manager ---------------------------------------------------------------------------------
    def _store(self, ks: list[int], fill: Callable[[list[int], list[torch.Tensor]], None]) -> list[bool]:
        """Store the pages the manager admits into reserved host slots (``fill(rows, slots)`` writes rows of
        ``ks`` into them), in rounds when the host tier is smaller than the batch; what it evicts is demoted by
        the cascade. Per key: True when some tier holds it (or a write of it is in flight)."""
        cascade = self.cascade
        if not self.storage_config.is_storage_writer:
            return [True] * len(ks)  # MLA replica: the writer rank stores the same bytes
        row_of = {k: row for row, k in reversed(list(enumerate(ks)))}  # a key's first row, as list.index gives
        while True:
            with self.lock:
                writing = cascade.writing(G2)
                todo = [k for k in dict.fromkeys(ks) if cascade.where(k) is None and k not in writing]
                plan = cascade.prepare_store(todo) if todo else None
                reserved = {k: cascade.reserve_slot(k) for k in (plan.store if plan else ())}
            for key in [k for k, slot in reserved.items() if slot is None]:
                cascade.complete_store(key, ok=False)
                del reserved[key]
            if not reserved:
                break
            rows = [row_of[k] for k in reserved]
            try:
                fill(rows, list(reserved.values()))
            except Exception:
                for key in reserved:
                    cascade.host.abort(key)
                    cascade.complete_store(key, ok=False)
                raise
            for key in reserved:
                cascade.host.commit(key)
                cascade.complete_store(key, ok=True)
            if len(reserved) == len(todo):
                break
        with self.lock:
            writing = cascade.writing(G2)
            return [cascade.where(k) is not None or k in writing for k in ks]

    def _borrow_prefix(self, stack: contextlib.ExitStack, ks: list[int]) -> list[torch.Tensor]:
        """The host slots of the leading keys some tier holds, each held until ``stack`` closes; pages found only
        below are promoted into G2 first. Stops at the first miss, or where G2 has no slot left for a promotion
        (the caller goes on in another round)."""
        cascade = self.cascade
        found: list[torch.Tensor] = []
        for key in ks:
            view = stack.enter_context(cascade.host.borrow(key))
            if view is None and self._promote(key):
                view = stack.enter_context(cascade.host.borrow(key))
            if view is None or len(view) != self.layout.block_bytes:
                break
            found.append(view)
        if found:
            with self.lock:
                cascade.touch(ks[:len(found)])
        return found

    def _promote(self, key: int) -> bool:
        """Bring a page held only in G3/G4 up into a host slot (one I/O, no staging copy), waiting for it up to
        ``lower_tier_deadline_ms``; True when it is in G2."""
        cascade = self.cascade
        with self.lock:
            g = cascade.where(key)
            promotion = cascade.promotion(key)
        if g is None and promotion is None:
            g = self._find_below(key)
        if g == G2:
            return True
        promotion = promotion or cascade.promote([key]).get(key)
        return promotion is not None and cascade.await_promotion(promotion)

    def _find_below(self, key: int) -> int | None:
        """A page this process never placed may still be in Redis, written by another rank or machine (what an
        earlier process left on disk the cascade adopted at start). Found, it is recorded in the manager without
        a write; the tier's G-number, or None."""
        cascade = self.cascade
        remote = cascade.tiers.get(G4)
        if remote is None or not cascade.guarded(G4, "contains", lambda: remote.contains([key])[0], False):
            return None
        with self.lock:
            if cascade.where(key) is not None or cascade.adopt([key], G4):
                return cascade.where(key)
        return None

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until queued demotions and write-through have run (tests, shutdown)."""
        self._ready().drain(timeout_s)

    def stats(self, tier: str = "G2") -> dict[str, float]:
        """One tier's counters in the manager's view, plus the pages it holds."""
        with self.lock:
            return self._ready().stats(TIER_NAMES.index(tier))

    def _wait_for_device(self) -> None:
        if self.layout.device.type == "cuda":
            torch.cuda.current_stream(self.layout.device).synchronize()

    def close(self) -> None:
        """Finish queued demotions and close the tiers (a later register_mem_pool_host builds new ones)."""
        if self.cascade is None:
            return
        try:
            self.cascade.drain()
        except TimeoutError:
            log.warning("kvtier: demotions still running at close; closing the tiers anyway")
        finally:
            self.cascade.close()
            self.cascade = None


class _NoEvents:
    """SGLang has no KV event stream for storage backends: tier changes are not published."""

    def stored(self, keys: list[int], medium: str) -> None:
        pass

    def removed(self, keys: list[int], medium: str) -> None:
        pass

    def forgotten(self, keys: list[int]) -> None:
        pass

    def promoted(self, key: int, g: int, ok: bool) -> None:
        pass


_NO_EVENTS = _NoEvents()


def check_layout_against_pool(layout: PageLayout, pool: Any) -> None:
    """kvtier's descriptor must cover exactly the bytes SGLang's own storage path moves for a page
    (``get_page_buffer_meta``), in the same order: a pool with bytes elsewhere (e.g. MXFP8 scales) is refused."""
    page_size = pool.page_size
    try:
        ptrs, sizes = pool.get_page_buffer_meta(torch.arange(2 * page_size))
    except NotImplementedError as exc:
        raise ValueError(f"{WHERE}: {type(pool).__name__} has no storage page format: {exc}") from exc
    ours = [(layout.seg_ptrs[j] + page * layout.seg_block_strides[j], layout.segment_bytes)
            for page in (0, 1) for j in range(layout.num_segments)]
    if _runs(ours) != _runs(list(zip(ptrs, sizes))):
        raise ValueError(f"{WHERE}: the pages of {type(pool).__name__} ({pool.layout}) are not where kvtier's "
                         "descriptor of its kv_buffer puts them")


def _runs(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges with touching neighbours merged: the same memory however it is cut into pieces."""
    out: list[tuple[int, int]] = []
    for ptr, size in pieces:
        if out and out[-1][0] + out[-1][1] == ptr:
            out[-1] = (out[-1][0], out[-1][1] + size)
        else:
            out.append((ptr, size))
    return out


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError("page tensors must be contiguous")
    return tensor.view(-1).view(torch.uint8)
