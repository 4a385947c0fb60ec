"""A test-only HiCacheStorage kept in a dict, loaded by SGLang's factory as a ``dynamic`` backend.

It proves the SGLang harness (factory loading, host-pool registration, zero-copy v1 calls through
``get_page_buffer_meta``); it is not kvtier. Each page is stored as the bytes behind the pointers the
host pool reports for it, so any layout round-trips bitwise.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)


class DictHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any]):
        # SGLang calls a dynamic backend as backend_class(storage_config, kwargs).
        self.storage_config = storage_config
        self.factory_kwargs = kwargs
        self.pages: dict[str, list[bytes]] = {}

    def _page_pointers(self, host_indices: torch.Tensor, num_keys: int):
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        per_page = len(ptrs) // num_keys
        for i in range(num_keys):
            yield list(zip(ptrs[i * per_page : (i + 1) * per_page],
                           sizes[i * per_page : (i + 1) * per_page]))

    def batch_set_v1(self, keys, host_indices, extra_info: HiCacheStorageExtraInfo | None = None):
        for key, parts in zip(keys, self._page_pointers(host_indices, len(keys))):
            self.pages[key] = [ctypes.string_at(ptr, size) for ptr, size in parts]
        return [True] * len(keys)

    def batch_get_v1(self, keys, host_indices, extra_info: HiCacheStorageExtraInfo | None = None):
        results = []
        for key, parts in zip(keys, self._page_pointers(host_indices, len(keys))):
            stored = self.pages.get(key)
            if stored is None or [len(b) for b in stored] != [size for _, size in parts]:
                results.append(False)
                continue
            for (ptr, size), data in zip(parts, stored):
                ctypes.memmove(ptr, data, size)
            results.append(True)
        return results

    def exists(self, key: str) -> bool:
        return key in self.pages

    # The generic (copying) interface, used when extra config lacks "interface_v1": 1.
    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        self.pages[key] = [value.contiguous().view(torch.uint8).numpy().tobytes()]
        return True

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values))

    def get(self, key, target_location=None, target_sizes=None):
        stored = self.pages.get(key)
        if stored is None or target_location is None:
            return None
        flat = target_location.view(torch.uint8)
        flat.copy_(torch.frombuffer(bytearray(stored[0]), dtype=torch.uint8))
        return target_location

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        return [self.get(k, t) for k, t in zip(keys, target_locations)]
