"""Paged attention: one chunk of one sequence attends to its context through a block table.

Determinism is the point of this module. The result for a chunk depends only on the chunk's q/k/v and the
KV *bytes* of the positions before it, never on which block ids hold them or what else is in the pool:

* the context's K and V are gathered (``index_select``) from the pages into fresh contiguous buffers of
  exactly ``start + num_tokens`` positions, so every mode (computed, reused from G1, restored into other
  blocks by kvtier) feeds the same shapes, strides and bytes to the same kernels;
* stale bytes in a partly filled last block are never gathered, so a poisoned (e.g. NaN) pool cannot leak in;
* the causal mask compares absolute positions, so a chunk at position ``start`` sees positions ``< start`` in
  full and its own tokens causally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F


class PagedAttention:
    """Prepared once per chunk (the slot indices and mask are shared by all layers), called once per layer."""

    def __init__(self, kv_layers: Sequence[torch.Tensor], block_size: int, block_table: Sequence[int],
                 start: int, num_tokens: int, group_size: int,
                 before_layer: Callable[[int], None] | None = None) -> None:
        end = start + num_tokens
        if start < 0 or num_tokens <= 0:
            raise ValueError(f"bad chunk: start {start}, {num_tokens} tokens")
        needed = -(-end // block_size)
        if len(block_table) < needed:
            raise ValueError(f"block table has {len(block_table)} blocks, positions up to {end} need {needed}")
        self.kv_layers = kv_layers
        self.before_layer = before_layer  # e.g. wait until a layer-by-layer load of this layer has landed
        device = kv_layers[0].device
        table = torch.as_tensor(list(block_table[:needed]), dtype=torch.long, device=device)
        context = torch.arange(end, device=device)
        slots = table[context // block_size] * block_size + context % block_size
        self.positions = context[start:]
        self.write_slots = slots[start:]
        self.read_slots = slots
        # Grouped-query attention as multi-head attention over the KV heads: the ``group_size`` query heads
        # that share a KV head become ``group_size * num_tokens`` query rows, so K and V are never repeated.
        self.group_size = group_size
        # An additive float mask (0 or -inf), (G * T, end): with 4-D inputs it lets torch pick its fused
        # kernels (flash attention on CPUs, memory-efficient attention on GPUs) instead of the math path.
        visible = (context[None, :] <= self.positions[:, None]).repeat(group_size, 1)
        dtype = kv_layers[0].dtype
        self.mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this chunk's ``k``/``v`` ``(T, Hkv, D)`` in the layer's pages, then attend ``q`` ``(T, Hq, D)``
        to the whole context; returns ``(T, Hq, D)``."""
        if self.before_layer is not None:
            self.before_layer(layer)
        pages = self.kv_layers[layer].flatten(1, 2)                      # (2, num_blocks * block_size, Hkv, D)
        pages[0].index_copy_(0, self.write_slots, k)
        pages[1].index_copy_(0, self.write_slots, v)
        keys = pages[0].index_select(0, self.read_slots)                 # (end, Hkv, D), contiguous
        values = pages[1].index_select(0, self.read_slots)
        tokens, num_kv_heads, head_dim = k.shape
        rows = q.view(tokens, num_kv_heads, self.group_size, head_dim).permute(1, 2, 0, 3)
        rows = rows.reshape(1, num_kv_heads, self.group_size * tokens, head_dim)
        out = F.scaled_dot_product_attention(rows, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                             attn_mask=self.mask)
        return out.view(num_kv_heads, self.group_size, tokens, head_dim).permute(2, 0, 1, 3).flatten(1, 2)
