"""Shared fixtures: a host-memory stand-in for kvtier behind the runner's ``KVHooks``."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from kvtier.runner import PagedKVPool

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class HostDictHooks:
    """Keeps whole chunks in a dict of CPU tensors keyed by their last block's seq hash; records every call.

    It outlives pools: ``attach`` points it at a new (e.g. poisoned) pool, as an offload tier outlives G1.
    """

    def __init__(self, pool: PagedKVPool, chunk_blocks: int, fail_chunks: Sequence[int] = ()) -> None:
        self.pool = pool
        self.chunk_blocks = chunk_blocks
        self.chunks: dict[int, torch.Tensor] = {}
        self.fail_chunks = set(fail_chunks)
        self.calls: list[tuple] = []

    def attach(self, pool: PagedKVPool) -> None:
        self.pool = pool

    def lookup(self, block_hashes: Sequence[int]) -> int:
        self.calls.append(("lookup", len(block_hashes)))
        count = 0
        while (count + 1) * self.chunk_blocks <= len(block_hashes) and \
                block_hashes[(count + 1) * self.chunk_blocks - 1] in self.chunks:
            count += 1
        return count

    def load(self, chunk_index: int, block_hashes: Sequence[int], block_ids: Sequence[int]) -> bool:
        self.calls.append(("load", chunk_index, tuple(block_ids)))
        if chunk_index in self.fail_chunks:
            return False
        ids = torch.tensor(list(block_ids), device=self.pool.device)
        self.pool.kv_cache.index_copy_(2, ids, self.chunks[block_hashes[-1]].to(self.pool.device))
        return True

    def store(self, chunk_index: int, block_hashes: Sequence[int], block_ids: Sequence[int]) -> None:
        self.calls.append(("store", chunk_index, tuple(block_ids)))
        ids = torch.tensor(list(block_ids), device=self.pool.device)
        self.chunks[block_hashes[-1]] = self.pool.kv_cache.index_select(2, ids).cpu()

    def release(self) -> None:
        self.calls.append(("release",))


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Every device this machine has: the CPU, and a GPU where there is one."""
    return request.param


@pytest.fixture
def make_hooks() -> type[HostDictHooks]:
    return HostDictHooks
