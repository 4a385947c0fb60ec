import pytest
import torch

from kvtier.runner import LlamaModel, ModelConfig, PagedKVPool, Runner
from kvtier.runner.attention import PagedAttention


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig.tiny(num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.tiny(dtype="float64")
    with pytest.raises(ValueError, match="positive"):
        ModelConfig.tiny(num_layers=0)
    with pytest.raises(ValueError, match="even"):
        ModelConfig.tiny(head_dim=15)
    with pytest.raises(ValueError, match="name"):
        ModelConfig.tiny(name="a/b")


def test_presets():
    small = ModelConfig.preset("small")
    assert small.name == "small" and small.dtype == "float32"
    llama = ModelConfig.preset("llama3-8b-l4")
    assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 32, 8, 128)
    assert llama.dtype == "bfloat16" and llama.model_id == "llama3-8b-l4-seed0"
    assert ModelConfig.preset("tiny", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")


def test_weights_are_a_function_of_the_seed():
    a, b, c = (LlamaModel(ModelConfig.tiny(seed=s)) for s in (1, 1, 2))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.layers[0].qkv_proj, c.layers[0].qkv_proj)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_and_gpu_weights_match():
    cpu, gpu = LlamaModel(ModelConfig.tiny()), LlamaModel(ModelConfig.tiny(), "cuda")
    for pc, pg in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(pc, pg.cpu())


@pytest.mark.parametrize("block_size,chunk_blocks", [(4, 4), (16, 1), (2, 3)])
def test_paged_attention_matches_dense_reference(device, block_size, chunk_blocks):
    """Chunked prefill and decode through shuffled pages compute the same function as dense attention."""
    runner = Runner.create(ModelConfig.tiny(), num_blocks=64, block_size=block_size, chunk_blocks=chunk_blocks,
                           device=device)
    held = runner.pool.allocate(7)                # the request gets scattered, non-zero block ids
    runner.pool.release(held[::2])
    prompt = torch.randint(0, 512, (45,), generator=torch.Generator().manual_seed(5)).tolist()
    tokens, first_logits, stats = runner.generate(prompt, 6)
    assert stats.computed_tokens == 45
    full = torch.tensor(prompt + tokens, device=device)
    reference = runner.model.reference_logits(full).cpu()
    torch.testing.assert_close(first_logits, reference[44], rtol=1e-4, atol=1e-4)
    assert reference[44:-1].argmax(-1).tolist() == tokens     # every decode step agrees with dense greedy


def test_paged_attention_rejects_a_short_block_table():
    pool = PagedKVPool(ModelConfig.tiny(), 8, block_size=4)
    with pytest.raises(ValueError, match="need 3"):
        PagedAttention(pool.per_layer_views(), 4, [0, 1], start=8, num_tokens=2, group_size=2)
    with pytest.raises(ValueError, match="bad chunk"):
        PagedAttention(pool.per_layer_views(), 4, [0, 1], start=0, num_tokens=0, group_size=2)
