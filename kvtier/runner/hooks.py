"""The protocol through which a KV offload engine (kvtier) plugs into the reference runner.

The runner owns G1 (its ``PagedKVPool``) and the prefix cache inside it; the hooks own everything below.
Reuse happens in whole chunks (``chunk_blocks`` blocks, ``Runner.chunk_tokens`` tokens) at fixed absolute
positions, which is what keeps logits bitwise identical whichever tier the KV came from. An implementation
is built with the pool (``PagedKVPool.per_layer_views()``) so it can read and write the pages it is given.

Call order for one request (one ``Runner.generate``):

1. ``lookup`` once, with the block hashes of the chunks that may be reused;
2. ``load`` for each chunk the hooks have and G1 does not, before any compute reads those blocks;
3. ``store`` after each full chunk the runner computed (never for chunks it reused or loaded);
4. ``release`` once at the end, also when the request failed.

On a GPU the runner enqueues compute on the current CUDA stream and does not wait for it: ``load`` must
order its copies before later work on that stream, and ``store`` must order its reads after the work
already enqueued (e.g. with events). On a CPU every call is synchronous.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class KVHooks(Protocol):
    def lookup(self, block_hashes: Sequence[int]) -> int:
        """How many leading chunks, from chunk 0, the hooks can load (``block_hashes``: seq hashes of their
        blocks, ``chunk_blocks`` per chunk, in order). Values beyond the chunks asked for are clipped."""
        ...

    def load(self, chunk_index: int, block_hashes: Sequence[int], block_ids: Sequence[int]) -> bool:
        """Fill G1 blocks ``block_ids`` with chunk ``chunk_index`` (whose blocks have ``block_hashes``).
        Return False on any failure (miss, checksum, timeout): the runner then computes the chunk instead."""
        ...

    def store(self, chunk_index: int, block_hashes: Sequence[int], block_ids: Sequence[int]) -> None:
        """Chunk ``chunk_index`` was just computed into ``block_ids``; copy it out if worth keeping."""
        ...

    def release(self) -> None:
        """The request is over: drop what was held for it (the G1 blocks may be reused from now on)."""
        ...
