"""Create a HiCache storage backend the way SGLang 0.5.23 does, over real host pools on CPU.

``make_backend`` goes through SGLang's own ``StorageBackendFactory.create_backend("dynamic", ...)``
with ``backend_name`` / ``module_path`` / ``class_name`` in the extra config, then registers the host
pool exactly as ``HiCacheController.attach_storage_backend`` does. Host pools are SGLang's real
``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost``, built from a real CPU device pool's
``get_device_pool_infos()`` (as ``hybrid_pool_assembler.build_kv_host_pool`` does), in any of the
layouts ``layer_first``, ``page_first``, ``page_first_direct``.

Page keys are SGLang's own: ``sglang.srt.mem_cache.utils.get_hash_str`` chained page by page.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch

LAYOUTS = ("layer_first", "page_first", "page_first_direct")


class _TorchvisionAbsent:
    """Any torchvision attribute: fine to name at import time, an error to use."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _TorchvisionAbsent:
        return _TorchvisionAbsent(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._name}: torchvision is not installed in this environment")


class _TorchvisionAbsentModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _TorchvisionAbsent:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _TorchvisionAbsent(f"{self.__name__}.{attr}")


class _TorchvisionAbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        return _TorchvisionAbsentModule(spec.name)

    def exec_module(self, module) -> None:  # noqa: ANN001
        module.__path__ = []
        # Old enough that transformers takes no torchvision-only code path.
        module.__version__ = "0.0"


def allow_sglang_without_torchvision() -> bool:
    """Let SGLang's mem_cache package import where torchvision cannot.

    ``sglang.srt.mem_cache.memory_pool`` imports ``sglang.srt.configs``, whose multimodal configs
    import torchvision at module level. PyPI's Linux torchvision wheels are CUDA builds that fail to
    load beside the CPU torch 2.13 build ("operator torchvision::nms does not exist"), so the CPU
    test environment cannot have a working torchvision. Those configs never run on the KV-storage
    path; this stands in modules whose attributes raise when used. Returns True if it did so.
    """
    if any(isinstance(f, _TorchvisionAbsentFinder) for f in sys.meta_path):
        return True
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:  # a broken CUDA wheel raises RuntimeError, not ImportError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _TorchvisionAbsentFinder())
    return True


allow_sglang_without_torchvision()

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402


@dataclass(frozen=True)
class PoolShape:
    """Geometry of the smallest pools worth testing: kilobytes, 2 layers, a few pages."""

    page_size: int = 4
    device_tokens: int = 64
    layer_num: int = 2
    dtype: torch.dtype = torch.bfloat16
    # MHA
    head_num: int = 2
    head_dim: int = 8
    # MLA
    kv_lora_rank: int = 16
    qk_rope_head_dim: int = 8


def make_host_pool(kind: str, layout: str, shape: PoolShape = PoolShape()):
    """A real SGLang host pool ("mha" or "mla") over a real CPU device pool, host = 2x device."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    common = dict(
        size=shape.device_tokens,
        page_size=shape.page_size,
        dtype=shape.dtype,
        layer_num=shape.layer_num,
        device="cpu",
        enable_memory_saver=False,
        start_layer=0,
        end_layer=shape.layer_num - 1,
    )
    if kind == "mha":
        device_pool = MHATokenToKVPool(
            head_num=shape.head_num, head_dim=shape.head_dim, enable_alt_stream=False, **common
        )
        host_cls, extra = MHATokenToKVPoolHost, {}
    elif kind == "mla":
        device_pool = MLATokenToKVPool(
            kv_lora_rank=shape.kv_lora_rank, qk_rope_head_dim=shape.qk_rope_head_dim, **common
        )
        host_cls = MLATokenToKVPoolHost
        extra = {
            "override_kv_cache_dim": device_pool.kv_cache_dim,
            "target_layer_num": device_pool.layer_num,
        }
    else:
        raise ValueError(f"kind must be 'mha' or 'mla', got {kind!r}")
    return host_cls(
        device_pool.get_device_pool_infos()[0].buffer_info,
        2.0,  # host_to_device_ratio
        0,  # host_size (GB); 0 = use the ratio
        shape.page_size,
        layout,
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=device_pool.size,
        start_layer=device_pool.start_layer,
        end_layer=device_pool.end_layer,
        **extra,
    )


def storage_config(host_pool, extra_config: dict[str, Any], *, model_name: str = "opt-test",
                   tp_rank: int = 0, tp_size: int = 1, dp_rank: int = 0) -> HiCacheStorageConfig:
    """The config HiCacheController._generate_storage_config builds for one TP (and DP) rank, no PP/CP."""
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=isinstance(host_pool, MLATokenToKVPoolHost),
        enable_storage_metrics=False,
        is_page_first_layout=host_pool.layout == "page_first",
        model_name=model_name,
        dp_rank=dp_rank,
        extra_config=extra_config,
    )


def make_backend(host_pool, extra_config: dict[str, Any], **config_kwargs: Any) -> HiCacheStorage:
    """``--hicache-storage-backend dynamic`` plus the controller's registration calls."""
    config = storage_config(host_pool, extra_config, **config_kwargs)
    backend = StorageBackendFactory.create_backend("dynamic", config, host_pool)
    backend.register_mem_pool_host(host_pool)
    backend.on_host_pools_registered()
    return backend


def page_keys(token_ids: list[int], page_size: int, prior_hash: str | None = None) -> list[str]:
    """SGLang's storage keys for the full pages of ``token_ids`` (hex strings, chained)."""
    keys = []
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        prior_hash = get_hash_str(token_ids[start : start + page_size], prior_hash)
        keys.append(prior_hash)
    return keys


def fill_pages(host_pool, host_indices: torch.Tensor, seed: int) -> None:
    """Random bytes in every page that ``host_indices`` (token slots, page-aligned) cover."""
    generator = torch.Generator().manual_seed(seed)
    for start in host_indices[:: host_pool.page_size].tolist():
        page = host_pool.get_data_page(start, flat=False)
        nbytes = page.numel() * page.element_size()
        noise = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
        host_pool.set_from_flat_data_page(start, noise.view(page.dtype))


def page_bytes(host_pool, host_indices: torch.Tensor) -> list[torch.Tensor]:
    """The bytes of each page, one tensor per page, in SGLang's flat page order."""
    return [
        host_pool.get_data_page(start).contiguous().view(torch.uint8).clone()
        for start in host_indices[:: host_pool.page_size].tolist()
    ]
