"""The block manager as the simulator drives it: one whole request at a time, synchronously.

A server stores and loads chunk by chunk through ``Manager.prepare_store`` / ``acquire`` (the engine and the
plug-ins); a trace replay has no bytes to move, so it runs each request in one call that counts the prefix
hits per tier, promotes lower-tier hits into G1 and stores the misses. That path lives here, not in the
production manager.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from kvtier.hints import AgentHints
from kvtier.manager import Manager
from kvtier.manager.core import FIRST_COLD_TIER
from kvtier.manager.policies import Key, make_policy
from kvtier.manager.tier import EPHEMERAL
from kvtier.sim.admission import Admission


class ReplayManager(Manager):
    """``Manager`` plus ``access``: a whole request at once (trace replay, policy tests and benchmarks), and
    an optional ``admission`` rule in front of G3 and below, to measure rules the manager does not have."""

    def __init__(self, *args, admission: Admission | None = None, vllm_g1: bool = False, **kwargs) -> None:
        """``vllm_g1``: the shape under the vLLM plug-in, where G1 is vLLM's own prefix cache (leaf-first LRU),
        every block vLLM computes is offered to G2 as it is computed (write-through), and the configured policy
        orders G2, the first tier kvtier manages."""
        if vllm_g1:
            kwargs["write_through"] = True
        super().__init__(*args, **kwargs)
        self.admission = admission
        if vllm_g1:
            if len(self.tiers) < 2:
                raise ValueError("vllm_g1 needs a G2 below G1")
            g1, g2 = self.tiers[0], self.tiers[1]
            g2.policy = make_policy(kwargs.get("policy", "agent"), g2.spec.capacity // self.block_bytes)
            g1.policy = make_policy("lru", g1.spec.capacity // self.block_bytes)

    def _store(self, ti: int, keys: Sequence[Key], *args, **kwargs) -> Sequence[Key]:
        if self.admission is not None and ti >= FIRST_COLD_TIER and not kwargs.get("adopted"):
            state, lane = self.tiers[ti], self._lane
            keys = self.admission.admit([k for k in keys if k not in state.sizes and k not in state.pending
                                         and lane.get(k) != EPHEMERAL], state)
        return super()._store(ti, keys, *args, **kwargs)

    def access(self, keys: Sequence[Key], session: Hashable = None, now: float | None = None,
               hints: AgentHints | None = None) -> list[int]:
        """Run one request synchronously: count prefix hits per tier, promote hits from lower tiers into G1,
        store the misses into G1 and touch every block. Returns ``lookup``'s per-tier prefix hits."""
        self.begin_request(session, now, hints)
        if self.admission is not None:
            self.admission.record(keys)
        t0 = self.tiers[0]
        members = t0.sizes
        unit = self.block_bytes
        if len(self.tiers) == 1:
            h = 0
            for key in keys:
                if key not in members:
                    break
                h += 1
            hits = [h]
            missing = [key for key in keys[h:] if key not in members]
            t0.stats.hit_blocks += h
            t0.stats.hit_bytes += h * unit
            t0.stats.reads += h
            t0.stats.read_bytes += h * unit
        else:
            hits = self.lookup(keys)
            prev = 0
            for tier, h in zip(self.tiers, hits):
                tier.stats.hit_blocks += h - prev
                tier.stats.hit_bytes += (h - prev) * unit
                prev = h
            missing = [key for key in keys if key not in members]
            self.credit(keys, session)
            for key in keys[:hits[-1]]:
                stats = self.tiers[self.locate(key)].stats
                stats.reads += 1
                stats.read_bytes += unit
        if t0.pending and missing:
            missing = [key for key in missing if key not in t0.pending]
        if self._track_freq:
            freq = self._freq
            for key in keys:
                freq[key] = freq.get(key, 0) + 1
        new: Sequence[Key] = ()
        if missing:
            protect = set(keys)
            if self._busy:
                protect.update(self._busy)
            new = self._store(0, missing, protect, session=session)
        lane = self._lane
        if len(new) == len(missing) and not lane and not t0.pending:
            touched = keys
        else:
            touched = [k for k in keys if k in members and k not in lane]
        t0.policy.touch_request(touched, set(new) if new else (), session)
        if self.write_through and len(self.tiers) > 1 and new:
            self._store(1, [k for k in new if k not in lane], self._busy, session=session)
        elif len(new) < len(missing) and len(self.tiers) > 1:
            # what G1's policy declined was computed all the same: it goes to G2, as an engine would store it
            kept = set(new)
            self._store(1, [k for k in missing if k not in kept and k not in lane], self._busy,
                        session=session)
        return hits
