"""kvtier as an SGLang 0.5.23 HiCache storage backend (``--hicache-storage-backend dynamic``).

``--hicache-storage-backend-extra-config '{"backend_name":"kvtier","module_path":"kvtier.integrations.sglang",
"class_name":"KvtierHiCacheStorage","interface_v1":1,"host_capacity_bytes":"16GiB","disk_path":"/nvme/kvtier"}'``

SGLang's own host pool is its L2; kvtier sits below it: a kvtier ``HostTier`` (its own slots, LRU) in front
of an optional ``DiskTier`` and ``RemoteTier``, all keyed under one ``Namespace`` (model, dtype, pool layout,
page size and bytes, TP/PP/CP rank; MLA pages are rank-independent). Pages are written to the host tier and
written through to disk / remote in the background; a page found only below is promoted into the host tier on
read. Each process has its own host tier and disk directory (``disk_path/dp<rank>``); with MLA and TP > 1 only
one rank per shard writes (SGLang's ``is_storage_writer``), so the other ranks read through the remote tier,
which such a deployment must have. Only the KV pool is stored: hybrid models' sidecar pools (SWA, Mamba, ...)
use SGLang's v2 calls, which are refused when the backend is attached.

Zero-copy (``interface_v1: 1``): ``batch_set_v1`` / ``batch_get_v1`` move pages between SGLang's host pool
buffer and kvtier's host slots with kvtier's transfer kernels over a descriptor of the pool's layout
(``layer_first``, ``page_first``, ``page_first_direct``; MHA and MLA), in ``get_page_buffer_meta`` byte order.
Without it SGLang uses the copying ``batch_set`` / ``batch_get`` on flat page tensors. Lower-tier failures are
misses; configuration errors are raised when SGLang attaches the backend (start-up).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
)
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

from kvtier import kernels
from kvtier.hashing import Namespace
from kvtier.integrations.common import engine_key, kvtier_config, name_part, open_disk_tier, per_dp_rank
from kvtier.layout import PageLayout, sglang_host_layout
from kvtier.tiers import open_remote_tier
from kvtier.tiers.base import Tier, guarded
from kvtier.tiers.host import HostPool, HostTier

T = TypeVar("T")
log = logging.getLogger(__name__)

# SGLang's own keys (file_storage_path: SGLang adds it to every backend's config with --file-storage-path)
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1", "extra_backend_tag",
                         "enable_metadata_cache", "metadata_ttl", "file_storage_path"})
WHERE = "KvtierHiCacheStorage"


def sglang_namespace(config: HiCacheStorageConfig, host_pool: Any, page_bytes: int, zero_copy: bool,
                     model_name: str = "") -> Namespace:
    """Everything that changes a page's bytes; page hashes already carry the tokens and the tenant salt. DP
    ranks share pages (same heads); MLA TP ranks too (SGLang's ``is_mla_model``: every rank holds the page)."""
    mla = isinstance(host_pool, MLATokenToKVPoolHost)
    layout = (f"sglang-{'mla' if mla else 'mha'}-{host_pool.layout}-p{host_pool.page_size}-b{page_bytes}-"
              f"{'v1' if zero_copy else 'flat'}-pp{config.pp_rank}of{config.pp_size}-"
              f"cp{config.attn_cp_rank}of{config.attn_cp_size}-dcp{config.dcp_rank}of{config.dcp_size}")
    tp_rank, tp_size = (0, 1) if config.is_mla_model else (config.tp_rank, config.tp_size)
    return Namespace(model=name_part(model_name or config.model_name or "model"),
                     dtype=name_part(str(host_pool.dtype).removeprefix("torch.")), layout=layout,
                     tp_rank=tp_rank, tp_size=tp_size)


class KvtierHiCacheStorage(HiCacheStorage):
    """kvtier tiers behind SGLang's HiCache storage interface (see the module docstring)."""

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
        self.host: HostTier | None = None
        self.lower: list[Tier] = []
        self._writes: set[Future] = set()
        self._writes_lock = threading.Lock()

    # --- attach ----------------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Build the tiers for this pool's page format (the namespace needs the pool's dtype and layout)."""
        config = self.storage_config
        if config.is_mla_model and config.tp_size > config.dcp_size and not self.cfg.remote_url:
            raise ValueError(f"{WHERE}: with MLA and TP > 1 only one rank per shard writes pages and the others "
                             "read them, so every rank needs a tier they all reach: set remote_url (host and "
                             "disk tiers are per process)")
        if not isinstance(mem_pool_host.kv_buffer, torch.Tensor):
            raise ValueError(f"{WHERE}: {type(mem_pool_host).__name__} keeps K and V in separate buffers; "
                             "kvtier stores pools with one kv_buffer")
        mla = isinstance(mem_pool_host, MLATokenToKVPoolHost)
        layout = sglang_host_layout(mem_pool_host.kv_buffer, mem_pool_host.layout, mem_pool_host.page_size, mla)
        check_layout_against_pool(layout, mem_pool_host)
        namespace = sglang_namespace(config, mem_pool_host, layout.block_bytes, self.zero_copy, self._model_name)
        if self.cfg.host_capacity_bytes < layout.block_bytes:
            raise ValueError(f"{WHERE}: host_capacity_bytes={self.cfg.host_capacity_bytes} holds no page of "
                             f"{layout.block_bytes} B")
        self.close()
        lower: list[Tier] = []
        try:
            if self.cfg.disk_path and config.is_storage_writer:  # a reader rank never writes its own disk
                lower.append(open_disk_tier(per_dp_rank(self.cfg, config.dp_rank), namespace, layout.block_bytes,
                                            WHERE))
            if self.cfg.remote_url:
                lower.append(open_remote_tier(self.cfg, namespace))
        except BaseException:
            for tier in lower:
                tier.close()
            raise
        super().register_mem_pool_host(mem_pool_host)
        self.layout, self.namespace, self.lower = layout, namespace, lower
        self.host = HostTier(namespace, HostPool(self.cfg.host_capacity_bytes, layout.block_bytes), own_pool=True)

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
        host = self._ready()
        self.flush()
        for tier in (host, *self.lower):
            self._guarded(tier, "clear", tier.clear, 0)

    def _key(self, key: str) -> int:
        return engine_key(self.namespace, key)

    def _ready(self) -> HostTier:
        if self.host is None:
            raise RuntimeError(f"{WHERE}: no host pool registered (SGLang calls register_mem_pool_host on attach)")
        return self.host

    # --- zero-copy interface ---------------------------------------------------------------------------------
    def _pages(self, host_indices: torch.Tensor, n: int) -> torch.Tensor:
        page_size = self.mem_pool_host.page_size
        if len(host_indices) != n * page_size:
            raise ValueError(f"{n} keys need {n * page_size} host indices, got {len(host_indices)}")
        return (host_indices[::page_size] // page_size).to(torch.int64).cpu()

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        host = self._ready()
        pages = self._pages(host_indices, len(keys))
        if not self.storage_config.is_storage_writer:
            return [True] * len(keys)  # MLA replica: the writer rank stores the same bytes
        ks = [self._key(k) for k in keys]
        results = host.contains(ks)
        rows: list[int] = []
        slots: list[torch.Tensor] = []
        for i, key in enumerate(ks):
            if results[i]:
                continue
            view = host.reserve(key, self.layout.block_bytes)
            if view is None and rows:  # the host tier is full of this batch: store what is reserved, go on
                self._store_reserved(pages, ks, rows, slots, results)
                view = host.reserve(key, self.layout.block_bytes)
            if view is None and self.lower:  # slots may be held by write-through in flight: wait for it
                self.flush()
                view = host.reserve(key, self.layout.block_bytes)
            if view is not None:
                rows.append(i)
                slots.append(view)
            else:  # stored meanwhile, or being promoted by a read on SGLang's prefetch thread
                results[i] = host.contains([key])[0] or host.writing(key)
        self._store_reserved(pages, ks, rows, slots, results)
        return results

    def _store_reserved(self, pages: torch.Tensor, ks: list[int], rows: list[int], slots: list[torch.Tensor],
                        results: list[bool]) -> None:
        """Gather the reserved pages into their host slots with one kernel call, publish them, write them
        through; empties ``rows`` / ``slots``."""
        host = self.host
        if not rows:
            return
        try:
            kernels.offload(self.layout, pages[rows], host.pool.buffer, [host.slot_offset(v) for v in slots],
                            impl=self.cfg.transfer_impl, sm_budget=self.cfg.sm_budget)
            self._wait_for_device()
        except Exception:
            for i in rows:
                host.abort(ks[i])
            raise
        for i in rows:
            host.commit(ks[i])
            results[i] = True
        self._write_through([ks[i] for i in rows])
        rows.clear()
        slots.clear()

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        host = self._ready()
        pages = self._pages(host_indices, len(keys))
        ks = [self._key(k) for k in keys]
        done = 0
        while done < len(ks):  # in rounds: a host tier smaller than the batch is refilled between them
            found: list[torch.Tensor] = []
            with contextlib.ExitStack() as held:
                for key in ks[done:]:
                    view = self._borrow(held, key)
                    if view is None or len(view) != self.layout.block_bytes:
                        break  # prefix rule: SGLang stops at the first miss
                    found.append(view)
                if found:
                    kernels.load(self.layout, pages[done:done + len(found)], host.pool.buffer,
                                 [host.slot_offset(v) for v in found], impl=self.cfg.transfer_impl,
                                 sm_budget=self.cfg.sm_budget)
                    self._wait_for_device()
            if not found:
                break
            done += len(found)
        return [True] * done + [False] * (len(ks) - done)

    # --- existence -------------------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading keys some tier holds."""
        host = self._ready()
        ks = [self._key(k) for k in keys]
        present = host.contains(ks)
        lead = present.index(False) if False in present else len(ks)
        rest = ks[lead:]
        for tier in self.lower:
            if not rest:
                break
            below = self._guarded(tier, "contains", lambda t=tier: t.contains(rest), [False] * len(rest))
            present[lead:] = [a or b for a, b in zip(present[lead:], below)]
        return present.index(False) if False in present else len(ks)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # --- copying interface (SGLang without interface_v1) -----------------------------------------------------
    def set(self, key: str, value: torch.Tensor | None = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        host = self._ready()
        if value is None:
            raise ValueError(f"{WHERE}.set needs a value tensor")
        if not self.storage_config.is_storage_writer:
            return True
        k = self._key(key)
        stored = host.put([k], [_flat_bytes(value.contiguous())])[0]
        if stored:
            self._write_through([k])
        return stored

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
            view = self._borrow(held, self._key(key))
            if view is None or len(view) != len(target):
                return None
            target.copy_(view)
        return target_location

    def batch_get(self, keys: list[str], target_locations: list[torch.Tensor] | None = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        if target_locations is None or len(target_locations) != len(keys):
            raise ValueError(f"{WHERE}.batch_get needs one target location per key")
        return [self.get(k, t) for k, t in zip(keys, target_locations)]

    # --- tiers -----------------------------------------------------------------------------------------------
    def _borrow(self, stack: contextlib.ExitStack, key: int) -> torch.Tensor | None:
        """The host slot of ``key``, held until ``stack`` closes; a page found only below is promoted first."""
        host = self.host
        view = stack.enter_context(host.borrow(key))
        if view is None and self._promote(key):
            view = stack.enter_context(host.borrow(key))
        return view

    def _promote(self, key: int) -> bool:
        """Read a page from disk / remote straight into a host slot (one I/O, no staging copy)."""
        for tier in self.lower:
            slot = self.host.reserve(key, self.layout.block_bytes)
            if slot is None:
                return False
            got = self._guarded(tier, "get", lambda t=tier, s=slot: t.get([key], [s]), [None])[0]
            if got == self.layout.block_bytes:
                self.host.commit(key)
                return True
            self.host.abort(key)
        return False

    def _write_through(self, keys: list[int]) -> None:
        """Copy freshly stored host pages down in the background; each slot is held until its write ends."""
        for tier in self.lower:
            holds = [self.host.borrow(k) for k in keys]
            views = [cm.__enter__() for cm in holds]
            kept_keys = [k for k, v in zip(keys, views) if v is not None]
            kept_views = [v for v in views if v is not None]
            future = self._guarded(tier, "put", lambda t=tier, k=kept_keys, v=kept_views: t.put_async(k, v), None)

            def release(_f: Future | None = None, holds: list = holds) -> None:
                for cm in holds:
                    cm.__exit__(None, None, None)

            if future is None:
                release()
                continue
            with self._writes_lock:
                self._writes.add(future)
            future.add_done_callback(lambda f, release=release: (release(), self._written(f)))

    def _written(self, future: Future) -> None:
        with self._writes_lock:
            self._writes.discard(future)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for the background write-through (tests, shutdown)."""
        with self._writes_lock:
            pending = list(self._writes)
        for future in pending:
            future.exception(timeout=timeout_s)

    @staticmethod
    def _guarded(tier: Tier, op: str, call: Callable[[], T], default: T) -> T:
        return guarded(f"{tier.name} {op}", call, default)

    def _wait_for_device(self) -> None:
        if self.layout.device.type == "cuda":
            torch.cuda.current_stream(self.layout.device).synchronize()

    def close(self) -> None:
        """Finish background writes and close the tiers (a later register_mem_pool_host builds new ones)."""
        if self.host is None:
            return
        try:
            self.flush()
        except TimeoutError:
            log.warning("kvtier: write-through still running at close; closing the tiers anyway")
        finally:
            for tier in (*self.lower, self.host):  # lower tiers drain their writes from host slots first
                tier.close()
            self.host, self.lower = None, []


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
