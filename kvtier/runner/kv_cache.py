"""The G1 page pool: one KV tensor, a block allocator with refcounts, and a prefix index with LRU eviction.

``kv_cache`` has shape ``(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)``; layer ``l`` is the
classic vLLM ``(2, num_blocks, block_size, num_kv_heads, head_dim)`` page layout (K at 0, V at 1).

A block is *referenced* while a request uses it, *cached* when unreferenced but still indexed by the seq hash
of the prefix it holds (a later request with that prefix reuses it), and *free* otherwise. Allocation takes
free blocks first, then evicts cached blocks least recently released first. A pool larger than every
request's working set never evicts ("unlimited G1"); a small one forgets ("small G1"), which is where kvtier's
lower tiers earn their keep.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

import torch

from kvtier.runner.model import ModelConfig


class PoolExhaustedError(RuntimeError):
    """The pool cannot supply the blocks asked for, even after evicting every cached block."""


class PagedKVPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_cache = torch.zeros(config.num_layers, 2, num_blocks, block_size, config.num_kv_heads,
                                    config.head_dim, dtype=config.torch_dtype, device=device)
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._hash_of: dict[int, int] = {}                  # block id -> seq hash it holds
        self._block_of: dict[int, int] = {}                 # seq hash -> block id
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced indexed blocks, oldest first
        self.evictions = 0

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.kv_cache.device

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies across all layers, K and V."""
        return self.kv_cache[:, :, 0].numel() * self.kv_cache.element_size()

    def per_layer_views(self) -> list[torch.Tensor]:
        """Per-layer ``(2, num_blocks, block_size, num_kv_heads, head_dim)`` views of ``kv_cache`` (no copy)."""
        return list(self.kv_cache.unbind(0))

    def check_block_ids(self, block_ids: Sequence[int]) -> None:
        """Raise ``ValueError`` unless every id names a block of this pool."""
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids out of range [0, {self.num_blocks}): {bad[:8]}")

    # --- allocation -----------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_available(self) -> int:
        """Blocks an allocation could get now: free plus evictable."""
        return len(self._free) + len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with refcount 1, evicting cached blocks (LRU) only when no free block is left."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_available:
            raise PoolExhaustedError(
                f"need {n} KV blocks but only {self.num_available} of {self.num_blocks} are free or evictable "
                f"({self.num_blocks - self.num_available} are in use)")
        blocks = []
        for _ in range(n):
            block = self._free.popleft() if self._free else self._evict_oldest()
            self._refcount[block] = 1
            blocks.append(block)
        return blocks

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on blocks found through ``lookup`` (a cached block stops being evictable)."""
        for block in block_ids:
            if self._refcount[block] == 0:
                if block not in self._cached:
                    raise ValueError(f"block {block} is free; only indexed or referenced blocks can be acquired")
                del self._cached[block]
            self._refcount[block] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference each. Indexed blocks become cached, the rest free.

        Released in reverse so that a sequence's tail is evicted before its head: a prefix is only reusable
        from its start, so the head is worth more.
        """
        for block in reversed(block_ids):
            if self._refcount[block] <= 0:
                raise ValueError(f"block {block} released more often than referenced")
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def _evict_oldest(self) -> int:
        block, _ = self._cached.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        self.evictions += 1
        return block

    def reset_prefix_cache(self, poison: int | None = None) -> int:
        """Forget every cached (unreferenced) block, like vLLM's ``reset_prefix_cache``; optionally overwrite
        the whole pool with the byte ``poison`` so stale KV cannot pass for restored KV. Returns how many."""
        if any(self._refcount):
            raise ValueError("blocks are still referenced by running requests")
        dropped = len(self._cached)
        while self._cached:
            self._free.append(self._evict_oldest())
        if poison is not None:
            self.kv_cache.view(torch.uint8).fill_(poison)
        return dropped

    # --- prefix index ---------------------------------------------------------------------------------------
    def lookup(self, seq_hashes: Sequence[int]) -> list[int | None]:
        """The block holding each seq hash, or ``None`` where the pool does not hold it."""
        return [self._block_of.get(h) for h in seq_hashes]

    def register(self, seq_hashes: Sequence[int], block_ids: Sequence[int]) -> None:
        """Index referenced blocks as holding these prefixes, so they are cached instead of freed on release.

        A hash already held by another block keeps that block; the new one stays unindexed (freed on release).
        """
        if len(seq_hashes) != len(block_ids):
            raise ValueError(f"{len(seq_hashes)} hashes for {len(block_ids)} blocks")
        for h, block in zip(seq_hashes, block_ids):
            if self._refcount[block] <= 0:
                raise ValueError(f"block {block} must be referenced to be registered")
            if h in self._block_of or block in self._hash_of:
                continue
            self._block_of[h] = block
            self._hash_of[block] = h
