"""Which worker holds which prefix: the block index fed by workers' KV events or by routing decisions.

Engines name blocks with their own hashes (vLLM: sha256 bytes or 64-bit ints; kvtier: the Dynamo chain).
The router keys blocks by kvtier's chain over the token ids (:mod:`kvtier.hashing`), so a BlockStored
event is re-hashed from its ``token_ids``, continuing the chain from its parent, and each worker keeps a
map engine hash -> router hash to resolve later parents and removals. Workers that publish no events run
in *approximate* mode: the blocks of every request routed to them are assumed cached for ``approx_ttl_s``,
at most ``max_approx_blocks`` per worker (the oldest go first), so clients cannot grow the router's memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvtier.events import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_STORAGE, AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvtier.hashing import chain_hashes, local_block_hashes
from kvtier.router.block_index import MAX_WORKERS, BlockIndex

MEDIUM_INDEX = {MEDIUM_GPU: 0, None: 0, MEDIUM_CPU: 1, MEDIUM_STORAGE: 2}


@dataclass(frozen=True)
class Overlap:
    """A worker's cached prefix of a request, in blocks: on its device, on device-or-host, anywhere."""

    device: int
    host: int
    any: int


@dataclass
class _Worker:
    slot: int
    approximate: bool
    engine_to_router: dict[int | bytes, int] = field(default_factory=dict)
    routed: OrderedDict[int, float] = field(default_factory=OrderedDict)  # approximate: hash -> expiry


@dataclass
class IndexerStats:
    block_ops: int = 0
    orphan_blocks: int = 0        # stored under a parent the router never saw: unusable for matching
    skipped_events: int = 0       # block size differs from the router's, or token ids missing
    resets: int = 0


class KvIndexer:
    """Block hash -> workers per medium; ``find_matches`` gives each worker's cached prefix of a request."""

    def __init__(self, block_size: int, *, approx_ttl_s: float = 120.0, max_approx_blocks: int = 1_000_000,
                 index_factory: Callable[[], object] = BlockIndex, clock: Callable[[], float] = time.monotonic) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if approx_ttl_s <= 0 or max_approx_blocks <= 0:
            raise ValueError(f"approx_ttl_s and max_approx_blocks must be positive, got {approx_ttl_s}, {max_approx_blocks}")
        self.block_size = block_size
        self.approx_ttl_s = approx_ttl_s
        self.max_approx_blocks = max_approx_blocks
        self._index = index_factory()
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._slot_owner: dict[int, str] = {}
        self.stats = IndexerStats()

    # --- membership -------------------------------------------------------------------------------------
    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def add_worker(self, worker: str, *, approximate: bool = False) -> None:
        """Join. ``approximate``: the worker publishes no KV events; learn from routing decisions."""
        if worker in self._workers:
            raise ValueError(f"worker {worker!r} is already known")
        free = next((s for s in range(MAX_WORKERS) if s not in self._slot_owner), None)
        if free is None:
            raise ValueError(f"at most {MAX_WORKERS} workers per router")
        self._workers[worker] = _Worker(free, approximate)
        self._slot_owner[free] = worker

    def remove_worker(self, worker: str) -> None:
        """Leave: forget the worker and everything it held."""
        state = self._workers.pop(worker)
        self._index.clear_worker(state.slot)
        del self._slot_owner[state.slot]

    def clear_worker(self, worker: str) -> None:
        """Death, restart or lost events: keep the worker, forget what it held."""
        state = self._workers[worker]
        self._index.clear_worker(state.slot)
        state.engine_to_router.clear()
        state.routed.clear()
        self.stats.resets += 1

    # --- events -----------------------------------------------------------------------------------------
    def apply_batch(self, worker: str, batch: KVEventBatch) -> None:
        state = self._workers.get(worker)
        if state is None:
            return  # events of a worker that already left
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._stored(state, event)
            elif isinstance(event, BlockRemoved):
                self._removed(state, event)
            elif isinstance(event, AllBlocksCleared):
                self.clear_worker(worker)

    def _stored(self, state: _Worker, event: BlockStored) -> None:
        n = len(event.block_hashes)
        if event.block_size != self.block_size or len(event.token_ids) != n * self.block_size:
            self.stats.skipped_events += 1
            return
        parent = None
        if event.parent_block_hash is not None:
            parent = state.engine_to_router.get(event.parent_block_hash)
            if parent is None:
                self.stats.orphan_blocks += n
                return
        keys = chain_hashes(local_block_hashes(event.token_ids, self.block_size), parent=parent)
        self._index.store(state.slot, MEDIUM_INDEX.get(event.medium, 0), keys)
        state.engine_to_router.update(zip(event.block_hashes, keys))
        self.stats.block_ops += n

    def _removed(self, state: _Worker, event: BlockRemoved) -> None:
        mapping = state.engine_to_router
        pairs = [(engine_hash, mapping.get(engine_hash)) for engine_hash in event.block_hashes]
        self._index.remove(state.slot, MEDIUM_INDEX.get(event.medium, 0), [k for _, k in pairs if k is not None])
        for engine_hash, key in pairs:
            if key is not None and not self._index.media(state.slot, key):
                mapping.pop(engine_hash, None)
        self.stats.block_ops += len(event.block_hashes)

    # --- approximate mode -------------------------------------------------------------------------------
    def record_routing(self, worker: str, hashes: Sequence[int]) -> None:
        """The request with ``hashes`` went to ``worker``; assume its device caches them for a while."""
        state = self._workers.get(worker)
        if state is None or not state.approximate:
            return
        expiry = self._clock() + self.approx_ttl_s
        routed = state.routed
        for key in hashes:
            routed[key] = expiry
            routed.move_to_end(key)
        self._index.store(state.slot, 0, hashes)
        excess = len(routed) - self.max_approx_blocks
        if excess > 0:
            self._index.remove(state.slot, 0, [routed.popitem(last=False)[0] for _ in range(excess)])

    @property
    def approx_blocks(self) -> int:
        """Blocks held in approximate mode, all workers together."""
        return sum(len(state.routed) for state in self._workers.values())

    def _expire(self) -> None:
        now = self._clock()
        for state in self._workers.values():
            routed = state.routed
            if not routed or next(iter(routed.values())) > now:
                continue
            gone = []
            while routed:
                key, expiry = next(iter(routed.items()))
                if expiry > now:
                    break
                routed.popitem(last=False)
                gone.append(key)
            self._index.remove(state.slot, 0, gone)

    # --- queries ----------------------------------------------------------------------------------------
    def find_matches(self, hashes: Sequence[int]) -> dict[str, Overlap]:
        """Each worker's cached prefix of ``hashes`` (workers without any are left out)."""
        self._expire()
        owner = self._slot_owner
        return {owner[slot]: Overlap(d, h, a) for slot, d, h, a in self._index.find(hashes) if slot in owner}

    def __len__(self) -> int:
        return len(self._index)
