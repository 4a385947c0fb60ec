"""Replay a trace through the real ``Manager`` and count prefix-rule hits.

Definitions (so numbers compare across tools): requests run in arrival order; every block of a request is
touched when it runs; a block hits only if every earlier block of the same request hits; capacity is in
blocks. The hit rate is hit blocks / all blocks. Only Belady sees the future (through its oracle).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from kvtier.config import KvtierConfig
from kvtier.manager import TierSpec
from kvtier.manager.policies import NextUseOracle
from kvtier.manager.tier import TIER_NAMES
from kvtier.sim.admission import ADMISSION_RULES
from kvtier.sim.manager import ReplayManager
from kvtier.sim.trace import STOP_REASONS, Trace


@dataclass
class ReplayResult:
    policy: str
    capacity_blocks: int
    hit_rate: float
    hit_blocks: int
    total_blocks: int
    requests: int
    wall_s: float
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def block_ops_per_s(self) -> float:
        return self.total_blocks / self.wall_s if self.wall_s > 0 else 0.0


def capacity_from_frac(trace: Trace, frac: float) -> int:
    if not 0 < frac:
        raise ValueError(f"capacity fraction must be positive, got {frac}")
    return max(1, int(round(frac * trace.unique_blocks())))


def replay(trace: Trace, policy: str, capacity_blocks: int, *, tier_multipliers: Sequence[float] = (),
           admission: str | None = None, oracle: NextUseOracle | None = None, block_bytes: int = 1,
           use_hints: bool = True, vllm_g1: bool = False, progress: bool = False) -> ReplayResult:
    """Replay ``trace`` with G1 = ``capacity_blocks`` and optional lower tiers of ``m * capacity`` blocks
    (G3 and G4 behind the ``admission`` rule, a name in ``ADMISSION_RULES``; default: the configuration's
    ``admission_min_hits``). ``vllm_g1``: G1 is vLLM's prefix cache (leaf-first LRU) and ``policy`` orders G2.
    Returns G1's prefix hit rate and per-tier statistics."""
    min_hits, rule = ADMISSION_RULES[admission] if admission else (KvtierConfig.admission_min_hits, None)
    if capacity_blocks <= 0:
        raise ValueError(f"capacity must be positive, got {capacity_blocks}")
    if len(tier_multipliers) > 3:
        raise ValueError("at most three lower tiers (G2, G3, G4)")
    specs = [TierSpec("G1", capacity_blocks * block_bytes)]
    for i, mult in enumerate(tier_multipliers, start=1):
        specs.append(TierSpec(TIER_NAMES[i], int(capacity_blocks * mult) * block_bytes, min_hits if i >= 2 else 0))
    kwargs = {}
    if policy == "belady":
        if len(specs) > 1:
            raise ValueError("belady is a single-tier bound")
        kwargs["oracle"] = oracle if oracle is not None else NextUseOracle(trace.keys, trace.offsets)
    lowest = int(capacity_blocks * tier_multipliers[-1]) if len(tier_multipliers) >= 2 else 0
    manager = ReplayManager(specs, policy=policy, policy_kwargs=kwargs, block_bytes=block_bytes,
                            admission=rule(lowest) if rule is not None and lowest else None, vllm_g1=vllm_g1)
    belady = manager.tiers[0].policy if policy == "belady" else None
    keys_all, offsets = trace.keys, trace.offsets.tolist()
    sessions, times = trace.sessions.tolist(), trace.times.tolist()
    access = manager.access
    # the one hint a client sends in these traces: its reasoning output will not be re-sent
    ephemeral = trace.ephemeral_tail.tolist() if use_hints and trace.ephemeral_tail is not None else None
    # responses end while later requests arrive: each end is told to the manager once the clock passes it
    ends = trace.ends.tolist() if trace.ends is not None else None
    stops = [STOP_REASONS[c] or None for c in trace.stop_reasons.tolist()] if trace.stop_reasons is not None \
        else [None] * trace.num_requests
    pending_ends: list[tuple[float, int]] = []
    hit_blocks = 0
    start = time.perf_counter()
    rows = range(trace.num_requests)
    for i in tqdm(rows, desc=f"{policy}@{capacity_blocks}", unit="req", disable=not progress, mininterval=1.0):
        lo, hi = offsets[i], offsets[i + 1]
        if belady is not None:
            belady.advance(lo, hi)
        while pending_ends and pending_ends[0][0] <= times[i]:
            at, j = heapq.heappop(pending_ends)
            manager.end_request(sessions[j], at, stops[j])
        keys = keys_all[lo:hi].tolist()
        hits = access(keys, sessions[i], times[i])
        if ends is not None:
            heapq.heappush(pending_ends, (ends[i], i))
        hit_blocks += hits[0]
        if ephemeral is not None and ephemeral[i]:
            manager.mark_ephemeral(keys[-ephemeral[i]:])
    wall = time.perf_counter() - start
    total = trace.num_accesses
    tiers = {}
    for stats in manager.stats():
        name = stats.pop("name")
        stats["hit_rate"] = stats["hit_blocks"] / total if total else 0.0
        stats["recomputed_tokens_saved"] = stats["hit_blocks"] * trace.block_tokens
        tiers[name] = stats
    return ReplayResult(policy, capacity_blocks, hit_blocks / total if total else 0.0, hit_blocks, total,
                        trace.num_requests, wall, tiers)
