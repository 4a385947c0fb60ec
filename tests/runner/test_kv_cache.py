import pytest
import torch

from kvtier.runner import ModelConfig, PagedKVPool, PoolExhaustedError

CONFIG = ModelConfig.tiny()


def make_pool(num_blocks: int = 8) -> PagedKVPool:
    return PagedKVPool(CONFIG, num_blocks, block_size=4)


def test_one_tensor_with_per_layer_vllm_views():
    pool = make_pool()
    assert pool.kv_cache.shape == (CONFIG.num_layers, 2, 8, 4, CONFIG.num_kv_heads, CONFIG.head_dim)
    views = pool.per_layer_views()
    assert len(views) == CONFIG.num_layers
    assert views[1].shape == (2, 8, 4, CONFIG.num_kv_heads, CONFIG.head_dim)
    views[1][1, 3].fill_(7.0)                     # V of block 3 in layer 1, written through the view
    assert bool((pool.kv_cache[1, 1, 3] == 7.0).all()) and float(pool.kv_cache.sum()) == 7.0 * views[1][1, 3].numel()
    assert pool.bytes_per_block == CONFIG.num_layers * 2 * 4 * CONFIG.num_kv_heads * CONFIG.head_dim * 4


def test_allocate_release_and_exhaustion():
    pool = make_pool(4)
    blocks = pool.allocate(3)
    assert sorted(blocks) == [0, 1, 2] and pool.num_free == 1
    with pytest.raises(PoolExhaustedError, match="need 2 KV blocks but only 1"):
        pool.allocate(2)
    assert pool.num_free == 1                     # a failed allocation takes nothing
    pool.release(blocks)
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="released more often"):
        pool.release([blocks[0]])


def test_registered_blocks_are_cached_then_found_then_evicted_tail_first():
    pool = make_pool(4)
    blocks = pool.allocate(3)
    pool.register([101, 102, 103], blocks)
    pool.release(blocks)
    assert pool.num_cached == 3 and pool.num_free == 1
    assert pool.lookup([101, 102, 103, 104]) == blocks + [None]
    fresh = pool.allocate(2)                      # the free block, then the oldest cached: the tail (103)
    assert fresh[1] == blocks[2] and pool.evictions == 1
    assert pool.lookup([101, 102, 103]) == [blocks[0], blocks[1], None]


def test_acquired_blocks_are_not_evicted():
    pool = make_pool(2)
    blocks = pool.allocate(2)
    pool.register([1, 2], blocks)
    pool.release(blocks)
    pool.acquire([blocks[0]])
    assert pool.allocate(1) == [blocks[1]]
    with pytest.raises(PoolExhaustedError):
        pool.allocate(1)


def test_acquire_of_a_free_block_and_bad_registration_are_errors():
    pool = make_pool(2)
    with pytest.raises(ValueError, match="free"):
        pool.acquire([0])
    with pytest.raises(ValueError, match="referenced"):
        pool.register([5], [0])
    with pytest.raises(ValueError, match="2 hashes for 1 blocks"):
        pool.register([5, 6], pool.allocate(1))


def test_a_hash_already_held_keeps_its_block():
    pool = make_pool(4)
    first, second = pool.allocate(1), pool.allocate(1)
    pool.register([9], first)
    pool.register([9], second)
    assert pool.lookup([9]) == first
    pool.release(second)
    assert pool.num_free == 3                     # the duplicate was never indexed: freed, not cached


def test_validation():
    with pytest.raises(ValueError):
        PagedKVPool(CONFIG, 0)
    pool = make_pool(4)
    pool.check_block_ids([0, 3])
    with pytest.raises(ValueError, match="out of range"):
        pool.check_block_ids([0, 4])
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_dtype_follows_the_model_config():
    pool = PagedKVPool(CONFIG.with_(dtype="bfloat16"), 2, 4)
    assert pool.kv_cache.dtype == torch.bfloat16
