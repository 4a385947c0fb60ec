"""Prove the SGLang harness with a dict-backed HiCacheStorage (kvtier's backend plugs in the same way)."""

import pytest

from engines_env import ENGINES_MISSING

pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory", reason=ENGINES_MISSING)

import torch  # noqa: E402

from sglang_harness import (  # noqa: E402
    LAYOUTS,
    fill_pages,
    make_backend,
    make_host_pool,
    page_bytes,
    page_keys,
)

DYNAMIC = {
    "backend_name": "dict",
    "module_path": "dict_hicache_storage",
    "class_name": "DictHiCacheStorage",
    "interface_v1": 1,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_v1_round_trip_is_bitwise(kind, layout):
    pool = make_host_pool(kind, layout)
    backend = make_backend(pool, DYNAMIC)
    assert type(backend).__name__ == "DictHiCacheStorage" and backend.mem_pool_host is pool

    tokens = list(range(100, 100 + 4 * pool.page_size))
    keys = page_keys(tokens, pool.page_size)
    assert len(keys) == 4 and len(set(keys)) == 4 and all(isinstance(k, str) for k in keys)
    assert backend.batch_exists(keys) == 0

    src = pool.alloc(len(tokens))
    fill_pages(pool, src, seed=1)
    expected = page_bytes(pool, src)
    assert backend.batch_set_v1(keys, src) == [True] * 4
    assert backend.batch_exists(keys) == 4
    assert backend.batch_exists(keys[:2] + ["0" * 16] + keys[3:]) == 2  # longest existing prefix

    dst = pool.alloc(len(tokens))
    fill_pages(pool, dst, seed=2)
    assert not any(torch.equal(a, b) for a, b in zip(page_bytes(pool, dst), expected))
    assert backend.batch_get_v1(keys, dst) == [True] * 4
    for got, want in zip(page_bytes(pool, dst), expected):
        assert torch.equal(got, want)
    assert backend.batch_get_v1(["f" * 16], dst[: pool.page_size]) == [False]


def test_factory_reports_missing_dynamic_keys():
    pool = make_host_pool("mha", "page_first")
    with pytest.raises(ValueError, match="module_path"):
        make_backend(pool, {"backend_name": "x", "class_name": "DictHiCacheStorage"})
