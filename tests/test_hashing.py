import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvtier.hashing import DEFAULT_SEED, Namespace, block_hashes, chain_hashes, local_block_hashes, seed_for_salt

LOCAL = [14643705804678351452, 16777012769546811212, 483935686894639516]
SEQ = [14643705804678351452, 4945711292740353085, 12583592247330656132]


def test_design_test_vector():
    tokens = list(range(1, 13))
    assert local_block_hashes(tokens, 4) == LOCAL
    assert block_hashes(tokens, 4) == SEQ
    assert block_hashes(np.arange(1, 13, dtype=np.int64), 4) == SEQ


def test_partial_block_is_not_hashed():
    assert block_hashes(list(range(1, 15)), 4) == SEQ
    assert block_hashes([1, 2, 3], 4) == []


def test_salt_changes_every_key_and_no_salt_is_1337():
    assert seed_for_salt(None) == seed_for_salt("") == DEFAULT_SEED
    tokens = list(range(1, 13))
    a, b = block_hashes(tokens, 4, salt="tenant-a"), block_hashes(tokens, 4, salt="tenant-b")
    assert not set(a) & set(b) and not set(a) & set(SEQ)
    assert a == block_hashes(tokens, 4, salt="tenant-a")


@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.integers(1, 17))
def test_chain_is_prefix_stable(tokens, block_size):
    full = block_hashes(tokens, block_size)
    n = len(tokens) // block_size
    assert len(full) == n
    for cut in range(n + 1):
        assert block_hashes(tokens[: cut * block_size], block_size) == full[:cut]
    # continuing a chain from a parent gives the same hashes as hashing the whole prefix
    local = local_block_hashes(tokens, block_size)
    if n >= 2:
        assert chain_hashes(local[1:], parent=full[0]) == full[1:]


def test_bad_tokens_and_block_size():
    with pytest.raises(ValueError):
        block_hashes([1, 2, -1, 4], 4)
    with pytest.raises(ValueError):
        block_hashes([1, 2, 2**32, 4], 4)
    with pytest.raises(ValueError):
        block_hashes([1, 2, 3, 4], 0)
    with pytest.raises(ValueError):
        block_hashes([[1, 2], [3, 4]], 2)


def test_namespace_keys_differ_by_every_field():
    base = Namespace("llama", "bf16", "LBHNC", 0, 2, "")
    variants = [Namespace("qwen", "bf16", "LBHNC", 0, 2), Namespace("llama", "fp8", "LBHNC", 0, 2),
                Namespace("llama", "bf16", "LBNHC", 0, 2), Namespace("llama", "bf16", "LBHNC", 1, 2),
                Namespace("llama", "bf16", "LBHNC", 0, 2, "s")]
    keys = {base.key(42)} | {v.key(42) for v in variants}
    assert len(keys) == 6
    assert len({base.id} | {v.id for v in variants}) == 6
    with pytest.raises(ValueError):
        Namespace("a/b", "bf16", "x")
    with pytest.raises(ValueError):
        Namespace("m", "bf16", "x", tp_rank=2, tp_size=2)
