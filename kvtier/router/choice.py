"""Where a request goes: cost per worker, sampling, sticky sessions, and a queue when all are busy.

Cost of sending a request of ``n`` blocks to worker ``w`` (in blocks, as NVIDIA Dynamo counts them):
``n - credit(w) + pending_prefill(w) + decode_weight * active_blocks(w)``, where ``credit`` pays for the
cached prefix by where it lives: device blocks 1.0, host 0.75, disk 0.25 (loading is cheaper than
recomputing, but not free). ``temperature == 0`` picks the cheapest; ties go to the worker with fewer
requests in flight, then to a rendezvous hash of the request's first block, so equal requests agree.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from kvtier.router.indexer import Overlap


@dataclass(frozen=True)
class CostWeights:
    device_credit: float = 1.0
    host_credit: float = 0.75
    disk_credit: float = 0.25
    decode_weight: float = 1.0
    temperature: float = 0.0

    def __post_init__(self) -> None:
        for name in ("device_credit", "host_credit", "disk_credit"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.decode_weight < 0 or self.temperature < 0:
            raise ValueError("decode_weight and temperature must not be negative")

    def credit(self, overlap: Overlap) -> float:
        return (overlap.device * self.device_credit + (overlap.host - overlap.device) * self.host_credit
                + (overlap.any - overlap.host) * self.disk_credit)


@dataclass
class WorkerLoad:
    """What a worker is busy with, as the router sees it (requests it sent and has not seen finish)."""

    inflight: int = 0
    prefill_blocks: int = 0   # blocks still to prefill for requests that have not produced a token yet
    active_blocks: int = 0    # KV blocks held by in-flight requests (the decode load)


class Chooser:
    def __init__(self, weights: CostWeights = CostWeights(), seed: int = 0) -> None:
        self.weights = weights
        self._rng = random.Random(seed)

    def costs(self, n_blocks: int, overlaps: Mapping[str, Overlap], loads: Mapping[str, WorkerLoad],
              candidates: Sequence[str]) -> dict[str, float]:
        w = self.weights
        none = Overlap(0, 0, 0)
        return {c: n_blocks - w.credit(overlaps.get(c, none)) + loads[c].prefill_blocks
                + w.decode_weight * loads[c].active_blocks for c in candidates}

    def choose(self, n_blocks: int, overlaps: Mapping[str, Overlap], loads: Mapping[str, WorkerLoad],
               candidates: Sequence[str], tie_key: int = 0) -> str:
        if not candidates:
            raise ValueError("no candidate workers")
        costs = self.costs(n_blocks, overlaps, loads, candidates)
        if self.weights.temperature > 0:
            return self._sample(costs)
        best = min(costs.values())
        tied = [c for c in candidates if costs[c] - best <= 1e-9]
        return min(tied, key=lambda c: (loads[c].inflight, xxhash.xxh3_64_intdigest(c.encode(), seed=tie_key)))

    def _sample(self, costs: dict[str, float]) -> str:
        """Softmax over costs normalised to [0, 1]: temperature 1 favours the cheapest about e:1."""
        lo, hi = min(costs.values()), max(costs.values())
        span = hi - lo or 1.0
        names = list(costs)
        weights = [math.exp(-(costs[n] - lo) / span / self.weights.temperature) for n in names]
        return self._rng.choices(names, weights)[0]


class Home(NamedTuple):
    """Where a session's latest call went, and how many prompt blocks it left there."""

    worker: str
    blocks: int


class SessionTable:
    """session_id -> its :class:`Home`, least recently used first out, entries expiring after ``ttl_s``."""

    def __init__(self, max_sessions: int = 100_000, ttl_s: float = 1800.0) -> None:
        if max_sessions <= 0 or ttl_s <= 0:
            raise ValueError("max_sessions and ttl_s must be positive")
        self._max = max_sessions
        self._ttl = ttl_s
        self._table: OrderedDict[str, tuple[Home, float]] = OrderedDict()

    def get(self, session: str) -> Home | None:
        item = self._table.get(session)
        if item is None or item[1] < time.monotonic():
            self._table.pop(session, None)
            return None
        self._table.move_to_end(session)
        return item[0]

    def put(self, session: str, worker: str, blocks: int = 0) -> None:
        self._table[session] = (Home(worker, blocks), time.monotonic() + self._ttl)
        self._table.move_to_end(session)
        while len(self._table) > self._max:
            self._table.popitem(last=False)

    def forget_worker(self, worker: str) -> None:
        for session in [s for s, (home, _) in self._table.items() if home.worker == worker]:
            del self._table[session]

    def __len__(self) -> int:
        return len(self._table)


class QueueFull(Exception):
    """Every worker is saturated and the waiting queue is at its bound."""


class PriorityGate:
    """Bounded wait queue for when every worker is saturated: first come first served, where a request with
    ``latency_sensitivity`` (agent hints, as in Dynamo) counts as having come that many seconds earlier."""

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must not be negative, got {max_waiting}")
        self.max_waiting = max_waiting
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return sum(not f.done() for _, _, f in self._heap)

    async def wait(self, latency_sensitivity_s: float = 0.0) -> None:
        """Wait for a :meth:`release`; raises :class:`QueueFull` at once when the queue is full."""
        if len(self) >= self.max_waiting:
            raise QueueFull(f"all workers are saturated and {self.max_waiting} requests are already waiting")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (time.monotonic() - latency_sensitivity_s, next(self._order), future))
        await future

    def release(self) -> None:
        """A worker slot freed up: wake the most urgent waiter (it re-checks, and may wait again)."""
        while self._heap:
            _, _, future = heapq.heappop(self._heap)
            if not future.done():
                future.set_result(None)
                return
