"""Random operation sequences against the manager's invariants (hypothesis stateful testing)."""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.manager import ManagerError, TierSpec
from kvtier.sim.manager import ReplayManager
from kvtier.manager.policies import ONLINE_POLICIES

KEYS = st.integers(0, 24)


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.readers: dict[int, int] = {}
        self.pending: dict[tuple[int, int], None] = {}
        self.m = None

    @rule(policy=st.sampled_from(ONLINE_POLICIES), write_through=st.booleans())
    @precondition(lambda self: self.m is None)
    def create(self, policy, write_through):
        self.m = ReplayManager([TierSpec("G1", 5), TierSpec("G2", 7), TierSpec("G3", 9, admission_min_hits=2)],
                         policy=policy, write_through=write_through, pin_budget_frac=0.4,
                         clock=lambda: self.now)

    def _held(self):
        return {k for k in self.readers if self.readers[k] > 0}

    @rule(keys=st.lists(KEYS, min_size=1, max_size=6, unique=True), session=st.integers(0, 3))
    @precondition(lambda self: self.m is not None)
    def access(self, keys, session):
        self.now += 1
        hits = self.m.access(keys, session=session)
        assert hits == sorted(hits) and hits[-1] <= len(keys)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=3, unique=True))
    @precondition(lambda self: self.m is not None)
    def acquire(self, keys):
        keys = [k for k in keys if k in self.m]
        self.m.acquire(keys)
        for k in keys:
            self.readers[k] = self.readers.get(k, 0) + 1

    @rule(data=st.data())
    @precondition(lambda self: self.m is not None and any(self.readers.values()))
    def release(self, data):
        key = data.draw(st.sampled_from(sorted(k for k, v in self.readers.items() if v)))
        self.m.release([key])
        self.readers[key] -= 1

    @rule(key=KEYS)
    @precondition(lambda self: self.m is not None)
    def release_unheld_fails(self, key):
        if self.readers.get(key, 0) == 0 and not any(k == key for k, _ in self.pending):
            try:
                self.m.release([key])
            except ManagerError:
                return
            raise AssertionError("release without acquire was accepted")

    @rule(keys=st.lists(KEYS, min_size=1, max_size=3, unique=True), tier=st.integers(0, 2))
    @precondition(lambda self: self.m is not None)
    def prepare_store(self, keys, tier):
        plan = self.m.prepare_store(keys, tier=tier)
        for k in plan.store:
            assert (k, tier) not in self.pending
            self.pending[(k, tier)] = None

    @rule(data=st.data(), ok=st.booleans())
    @precondition(lambda self: self.m is not None and self.pending)
    def complete_store(self, data, ok):
        key, tier = data.draw(st.sampled_from(sorted(self.pending)))
        del self.pending[(key, tier)]
        self.m.complete_store([key], tier=tier, ok=ok)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=3, unique=True), lease=st.floats(0.5, 5))
    @precondition(lambda self: self.m is not None)
    def pin(self, keys, lease):
        self.m.pin(keys, lease_s=lease)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=3, unique=True), prio=st.integers(0, 100),
          dur=st.floats(0.5, 5))
    @precondition(lambda self: self.m is not None)
    def priority(self, keys, prio, dur):
        self.m.set_priority(keys, prio, dur)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=3, unique=True))
    @precondition(lambda self: self.m is not None)
    def ephemeral(self, keys):
        self.m.mark_ephemeral(keys)

    @rule(dt=st.floats(0, 3))
    @precondition(lambda self: self.m is not None)
    def tick(self, dt):
        self.now += dt
        self.m.tick()

    @invariant()
    def consistent(self):
        if self.m is None:
            return
        self.m.check_invariants()
        for key in self._held():
            assert self.m.locate(key) is not None, f"key {key} evicted while being read"
        for key, tier in self.pending:
            assert key in self.m.tiers[tier].pending, f"pending write of {key} lost"
        for tier in self.m.tiers[2:]:
            assert not any(self.m.entry(k).lane == "ephemeral" for k in tier.sizes)


ManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestManagerLifecycle = ManagerMachine.TestCase
