"""The determinism contract: wherever a chunk's KV came from, the logits are bitwise identical.

Chunks are 16 tokens (block size 4, 4 blocks per chunk). Turn 1 sends a 53-token prompt (3 full chunks and a
5-token tail) and generates 6 tokens; turn 2 sends turn 1's prompt, its answer and 20 new tokens (79 tokens).
Only turn 1's 3 full prompt chunks can be reused; everything else is recomputed.
"""

import pytest
import torch

from kvtier.runner import Generation, KVHooks, LlamaModel, ModelConfig, PagedKVPool, PoolExhaustedError, Runner

BLOCK, CHUNK_BLOCKS, CHUNK = 4, 4, 16
NEW_TOKENS = 6


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


P1 = prompt(53)


def make_runner(model: LlamaModel, num_blocks: int = 64, poison: bool = False, **kwargs) -> Runner:
    pool = PagedKVPool(model.config, num_blocks, BLOCK, model.device)
    if poison:
        pool.kv_cache.fill_(float("nan"))         # any read of a byte not restored shows up in the logits
    return Runner(model, pool, CHUNK_BLOCKS, **kwargs)


def assert_bitwise_equal(a: Generation, b: Generation) -> None:
    assert a.first_logits.dtype == torch.float32
    assert torch.equal(a.first_logits.view(torch.int32), b.first_logits.view(torch.int32))
    assert a.tokens == b.tokens


@pytest.fixture(params=["float32", "bfloat16"])
def model(request, device) -> LlamaModel:
    return LlamaModel(ModelConfig.tiny(dtype=request.param), device)


def turn2_prompt(model: LlamaModel) -> list[int]:
    """Turn 1's prompt and answer plus new user tokens, as an agent's next call would send."""
    answer = make_runner(model, prefix_caching=False).generate(P1, NEW_TOKENS).tokens
    return P1 + answer + prompt(20, seed=1)


def test_prefix_cache_hit_equals_recompute(model):
    p2 = turn2_prompt(model)
    scratch = make_runner(model, prefix_caching=False).generate(p2, NEW_TOKENS)
    runner = make_runner(model)
    runner.generate(P1, NEW_TOKENS)
    cached = runner.generate(p2, NEW_TOKENS)
    assert (cached.stats.g1_hit_tokens, cached.stats.computed_tokens) == (3 * CHUNK, len(p2) - 3 * CHUNK)
    assert scratch.stats.computed_tokens == len(p2)
    assert_bitwise_equal(cached, scratch)


def test_restore_into_other_blocks_of_a_poisoned_pool_equals_recompute(model, make_hooks):
    p2 = turn2_prompt(model)
    scratch = make_runner(model, prefix_caching=False).generate(p2, NEW_TOKENS)
    first = make_runner(model)
    hooks = make_hooks(first.pool, CHUNK_BLOCKS)
    first.generate(P1, NEW_TOKENS, hooks)
    stored = {call[2] for call in hooks.calls if call[0] == "store"}
    assert len(stored) == 3

    second = make_runner(model, poison=True)      # G1 forgot everything; its bytes are NaN
    second.pool.allocate(5)                       # and the restored chunks land in other block ids
    hooks.attach(second.pool)
    restored = second.generate(p2, NEW_TOKENS, hooks)
    loads = [call for call in hooks.calls if call[0] == "load"]
    assert [call[1] for call in loads] == [0, 1, 2]
    assert not stored & {call[2] for call in loads}
    assert (restored.stats.loaded_tokens, restored.stats.g1_hit_tokens) == (3 * CHUNK, 0)
    assert_bitwise_equal(restored, scratch)


@pytest.mark.parametrize("evicted_blocks", [2, 4])
def test_chunks_from_g1_and_from_hooks_mixed(model, make_hooks, evicted_blocks):
    """Small G1: chunk 2 (wholly or partly) was evicted, so it is loaded while chunks 0 and 1 hit G1."""
    p2 = turn2_prompt(model)
    scratch = make_runner(model, prefix_caching=False).generate(p2, NEW_TOKENS)
    runner = make_runner(model, num_blocks=24)
    hooks = make_hooks(runner.pool, CHUNK_BLOCKS)
    runner.generate(P1, NEW_TOKENS, hooks)        # 15 blocks used; chunks 0-2 (12 blocks) stay cached
    squatter = runner.pool.allocate(runner.pool.num_free + evicted_blocks)   # evicts chunk 2's tail first
    assert runner.pool.evictions == evicted_blocks
    runner.pool.release(squatter)
    mixed = runner.generate(p2, NEW_TOKENS, hooks)
    assert (mixed.stats.g1_hit_tokens, mixed.stats.loaded_tokens) == (2 * CHUNK, CHUNK)
    assert_bitwise_equal(mixed, scratch)


def test_failed_load_is_recomputed_and_still_equal(model, make_hooks):
    p2 = turn2_prompt(model)
    scratch = make_runner(model, prefix_caching=False).generate(p2, NEW_TOKENS)
    first = make_runner(model)
    hooks = make_hooks(first.pool, CHUNK_BLOCKS)
    first.generate(P1, NEW_TOKENS, hooks)
    hooks.fail_chunks = {1}                       # e.g. a checksum mismatch in a lower tier
    second = make_runner(model, poison=True)
    hooks.attach(second.pool)
    hooks.calls.clear()
    result = second.generate(p2, NEW_TOKENS, hooks)
    assert result.stats.failed_loads == 1
    assert (result.stats.loaded_tokens, result.stats.computed_tokens) == (2 * CHUNK, len(p2) - 2 * CHUNK)
    assert [c[1] for c in hooks.calls if c[0] == "store"] == [1, 3]   # the recomputed chunk is stored again
    assert_bitwise_equal(result, scratch)


def test_kv_written_by_decode_is_never_reused():
    """Turn 1's answer fills chunk 3 (positions 48-63) through decode steps: turn 2 must recompute it."""
    model = LlamaModel(ModelConfig.tiny())
    runner = make_runner(model)
    answer = runner.generate(P1, 20).tokens
    p2 = P1 + answer + prompt(20, seed=1)
    again = runner.generate(p2, NEW_TOKENS)
    assert again.stats.g1_hit_tokens == 3 * CHUNK
    assert_bitwise_equal(again, make_runner(model, prefix_caching=False).generate(p2, NEW_TOKENS))


def test_prompt_of_whole_chunks_recomputes_its_last_chunk(device):
    model = LlamaModel(ModelConfig.tiny(), device)
    runner = make_runner(model)
    exact = prompt(3 * CHUNK, seed=2)
    first = runner.generate(exact, NEW_TOKENS)
    again = runner.generate(exact, NEW_TOKENS)
    assert (again.stats.g1_hit_tokens, again.stats.computed_tokens) == (2 * CHUNK, CHUNK)
    assert_bitwise_equal(first, again)


def test_hook_call_order(make_hooks):
    runner = make_runner(LlamaModel(ModelConfig.tiny()))
    hooks = make_hooks(runner.pool, CHUNK_BLOCKS)
    runner.generate(P1, NEW_TOKENS, hooks)
    table = [c[2] for c in hooks.calls if c[0] == "store"]
    assert [c[:2] for c in hooks.calls] == [("lookup", 12), ("store", 0), ("store", 1), ("store", 2), ("release",)]
    assert all(len(blocks) == CHUNK_BLOCKS for blocks in table)
    hooks.calls.clear()
    runner.generate(P1 + prompt(30, seed=3), NEW_TOKENS, hooks)    # 83 tokens: chunks 0-2 hit G1
    assert [c[:2] for c in hooks.calls] == [("lookup", 20), ("store", 3), ("store", 4), ("release",)]


def test_a_pool_too_small_for_one_request_is_a_clear_error(make_hooks):
    runner = make_runner(LlamaModel(ModelConfig.tiny()), num_blocks=10)
    hooks = make_hooks(runner.pool, CHUNK_BLOCKS)
    with pytest.raises(PoolExhaustedError, match="needs 15 KV blocks of 4 tokens; the pool has only 10"):
        runner.generate(P1, NEW_TOKENS, hooks)
    assert hooks.calls == [("release",)] and runner.pool.num_free == 10  # release runs on every failure


def test_blocks_and_hooks_are_released_when_a_request_fails(make_hooks):
    runner = make_runner(LlamaModel(ModelConfig.tiny()))
    hooks = make_hooks(runner.pool, CHUNK_BLOCKS)
    runner.generate(P1, NEW_TOKENS, hooks)
    runner.pool.release(runner.pool.allocate(runner.pool.num_free + CHUNK_BLOCKS))  # G1 forgets chunk 2

    def broken_load(*args):
        raise RuntimeError("tier exploded")

    hooks.load = broken_load
    hooks.calls.clear()
    with pytest.raises(RuntimeError, match="tier exploded"):
        runner.generate(P1, NEW_TOKENS, hooks)    # chunks 0-1 acquired from G1, chunk 2's load raises
    assert hooks.calls[-1] == ("release",)
    assert runner.pool.num_available == 64 and runner.pool.num_cached == 2 * CHUNK_BLOCKS


def test_eviction_makes_room_and_recompute_matches():
    runner = make_runner(LlamaModel(ModelConfig.tiny()), num_blocks=15)
    first = runner.generate(P1, NEW_TOKENS)
    runner.generate(prompt(53, seed=4), NEW_TOKENS)     # needs all 15 blocks: evicts P1's cached chunks
    assert runner.pool.evictions == 12
    again = runner.generate(P1, NEW_TOKENS)
    assert again.stats.g1_hit_tokens == 0
    assert_bitwise_equal(first, again)


def test_salts_never_share_g1_blocks():
    model = LlamaModel(ModelConfig.tiny())
    pool = PagedKVPool(model.config, 64, BLOCK)
    alice, bob = Runner(model, pool, CHUNK_BLOCKS, salt="alice"), Runner(model, pool, CHUNK_BLOCKS, salt="bob")
    first = alice.generate(P1, NEW_TOKENS)
    other = bob.generate(P1, NEW_TOKENS)
    assert other.stats.g1_hit_tokens == 0 and alice.generate(P1, NEW_TOKENS).stats.g1_hit_tokens == 3 * CHUNK
    assert_bitwise_equal(first, other)


def test_without_prefix_caching_nothing_is_indexed():
    runner = make_runner(LlamaModel(ModelConfig.tiny()), prefix_caching=False)
    runner.generate(P1, NEW_TOKENS)
    assert runner.pool.num_cached == 0 and runner.pool.num_free == 64
    assert runner.generate(P1, NEW_TOKENS).stats.g1_hit_tokens == 0


def test_bad_requests_are_rejected():
    runner = make_runner(LlamaModel(ModelConfig.tiny()))
    for bad_prompt, new in (([], 1), ([1, -1], 1), ([1, 512], 1), ([1, 2], 0)):
        with pytest.raises(ValueError):
            runner.generate(bad_prompt, new)
    assert runner.pool.num_free == 64
    with pytest.raises(ValueError, match="another model config"):
        Runner(runner.model, PagedKVPool(ModelConfig.tiny(seed=1), 4, BLOCK))


def test_the_test_hooks_satisfy_the_protocol(make_hooks):
    assert isinstance(make_hooks(PagedKVPool(ModelConfig.tiny(), 2, BLOCK), CHUNK_BLOCKS), KVHooks)
