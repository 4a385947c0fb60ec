"""RankedTier: one entry per tensor-parallel rank for each chunk, read back all ranks or none."""

import pytest
import torch

from kvtier.hashing import Namespace
from kvtier.tiers.host import HostPool, HostTier
from kvtier.tiers.ranks import RankedTier

SLOT = 4096


def ranked(world: int = 2):
    parts = [torch.full((4 * SLOT,), 10 + r, dtype=torch.uint8) for r in range(world)]
    stores = [HostTier(Namespace("m", "fp16", "l", tp_rank=r, tp_size=world), HostPool(8 * SLOT, SLOT, pin=False),
                       own_pool=True) for r in range(world)]
    return RankedTier(stores, parts), parts, stores


def test_each_rank_stores_and_gets_back_its_own_bytes():
    tier, parts, stores = ranked()
    assert tier.put([5], [parts[0][SLOT:2 * SLOT]]) == [True]
    assert [s.contains([5]) for s in stores] == [[True], [True]]
    for p in parts:
        p[SLOT:2 * SLOT] = 0
    assert tier.get([5], [parts[0][SLOT:2 * SLOT]]) == [SLOT]
    assert parts[0][SLOT:2 * SLOT].unique().tolist() == [10]
    assert parts[1][SLOT:2 * SLOT].unique().tolist() == [11]
    assert tier.stats().puts == 2
    tier.close()


def test_a_chunk_missing_on_one_rank_is_a_miss():
    tier, parts, stores = ranked()
    tier.put([5, 6], [parts[0][:SLOT], parts[0][SLOT:2 * SLOT]])
    stores[1].delete([6])
    assert tier.contains([5, 6]) == [True, False]
    assert tier.get([5, 6], [parts[0][:SLOT], parts[0][SLOT:2 * SLOT]]) == [SLOT, None]
    assert tier.delete([6]) == [True]  # still held by rank 0: dropped there too
    assert stores[0].contains([6]) == [False]
    tier.close()


def test_buffers_must_be_views_of_rank_zeros_part():
    tier, parts, _ = ranked()
    with pytest.raises(ValueError, match="rank 0's part"):
        tier.put([1], [parts[1][:SLOT]])
    with pytest.raises(ValueError, match="rank 0's part"):
        tier.get([1], [bytearray(SLOT)])
    tier.close()
