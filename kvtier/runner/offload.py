"""``KVHooks`` backed by kvtier's engine: how the reference runner offloads to G2/G3/G4 and restores."""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.engine import EngineRequest, KvtierEngine


class EngineHooks:
    """One request's hooks. Built per ``Runner.generate`` call; ``hit_tokens`` is filled at ``release``."""

    def __init__(self, engine: KvtierEngine, request: EngineRequest) -> None:
        self.engine = engine
        self.request_id = request.request_id
        self.hit_tokens: dict[str, int] = {}
        engine.begin(request)

    def lookup(self, block_hashes: Sequence[int]) -> int:
        hits = self.engine.lookup(self.request_id, max_chunks=len(block_hashes) // self.engine.chunk_blocks)
        return sum(hits.values()) // self.engine.chunk_tokens

    def load(self, chunk_index: int, block_hashes: Sequence[int], block_ids: Sequence[int]) -> bool:
        self._check_same_chunk(chunk_index, block_hashes)
        return self.engine.load(self.request_id, chunk_index, block_ids)

    def store(self, chunk_index: int, block_hashes: Sequence[int], block_ids: Sequence[int]) -> None:
        self._check_same_chunk(chunk_index, block_hashes)
        self.engine.store(self.request_id, chunk_index, block_ids)

    def wait_layer(self, layer: int) -> None:
        self.engine.wait_layer(self.request_id, layer)

    def _check_same_chunk(self, chunk_index: int, block_hashes: Sequence[int]) -> None:
        """The runner and the engine must name a chunk alike (same block size and tenant salt); otherwise KV
        would be stored under, or loaded from, another prompt's key."""
        if not block_hashes or block_hashes[-1] != self.engine.chunk_key(self.request_id, chunk_index):
            raise ValueError(f"chunk {chunk_index}: the runner's block hashes differ from the engine's key "
                             "(different salt or block size?)")

    def release(self) -> None:
        self.hit_tokens = self.engine.release(self.request_id)
