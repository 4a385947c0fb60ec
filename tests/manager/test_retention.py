import pytest

from kvtier.hints import AgentHints, Pin, TokenRange
from kvtier.manager import ManagerError, TierSpec
from kvtier.sim.manager import ReplayManager


def three_tiers(**kw):
    return ReplayManager([TierSpec("G1", 4), TierSpec("G2", 4), TierSpec("G3", 8, admission_min_hits=2)], policy="lru",
                   **kw)


def test_pin_lease_expires_unless_renewed():
    m = ReplayManager([TierSpec("G1", 4)], policy="lru", pin_budget_frac=1.0)
    m.access([1], now=0.0)
    assert m.pin([1], lease_s=10, now=0.0).pinned == [1]
    for t in range(1, 6):
        m.access([10 + t], now=float(t))
    assert 1 in m and m.entry(1).lane == "pinned"
    m.pin([1], lease_s=10, now=8.0)          # renew: the first expiry (10) no longer applies
    m.tick(12.0)
    assert m.entry(1).lane == "pinned"
    m.tick(18.0)
    assert m.entry(1).lane == "normal" and m.entry(1).pin_expiry is None
    m.check_invariants()


def test_pin_budget_downgrades_and_reports():
    m = ReplayManager([TierSpec("G1", 4)], policy="lru", pin_budget_frac=0.5)
    m.access([1, 2, 3], now=0.0)
    report = m.pin([1, 2, 3, 99], lease_s=5, now=0.0)
    assert report.pinned == [1, 2] and report.downgraded == [3] and report.missing == [99]
    assert m.entry(3).lane == "high" and m.entry(3).priority == 100
    m.check_invariants()


def test_priority_decays_to_default():
    m = ReplayManager([TierSpec("G1", 3)], policy="lru")
    m.access([1], now=0.0)
    m.access([2], now=1.0)
    m.set_priority([1], 90, duration_s=5, now=1.0)
    m.access([3], now=2.0)
    m.access([4], now=3.0)                   # evicts 2, not the prioritised 1
    assert 1 in m and 2 not in m
    m.tick(7.0)
    assert m.entry(1).lane == "normal"
    # it rejoins the policy as if just used, then ages like any other entry
    m.access([5], now=8.0)
    m.access([6], now=9.0)
    assert 1 in m
    m.access([7], now=10.0)
    assert 1 not in m
    m.check_invariants()


def test_low_priority_goes_before_normal():
    m = ReplayManager([TierSpec("G1", 2)], policy="lru")
    m.access([1], now=0.0)
    m.access([2], now=1.0)
    m.set_priority([2], 10, duration_s=100, now=1.0)
    m.access([3], now=2.0)
    assert 2 not in m and 1 in m


def test_ephemeral_evicted_first_and_never_demoted():
    m = three_tiers()
    m.access([1, 2], now=0.0)
    m.mark_ephemeral([2])
    m.access([5, 6, 7], now=1.0)             # needs room: ephemeral 2 goes first
    assert m.locate(2) is None and m.locate(1) == 0
    m.check_invariants()
    for t in range(2, 30):
        m.access([100 + t, 200 + t], now=float(t))
        m.check_invariants()
    for tier in m.tiers[1:]:
        assert 2 not in tier.sizes


def test_demotion_cascade_admission_and_promotion():
    m = three_tiers()
    m.access([1], now=0.0)
    m.access([1], now=0.5)                    # seen twice: may enter G3 later
    m.access([2], now=0.6)                    # seen once
    for t in range(1, 9):
        m.access([10 + t], now=float(t))
    assert m.locate(1) == 2                   # G1 -> G2 -> G3
    assert m.locate(2) is None                # G2 -> G3 refused by admission (seen once)
    assert m.tiers[2].stats.refused >= 1
    hits = m.access([1], now=20.0)
    assert hits == [0, 0, 1] and m.locate(1) == 0   # promoted; G3 keeps its copy (write once)
    assert 1 in m.tiers[2].sizes
    m.check_invariants()


def test_write_through_and_dedup():
    m = ReplayManager([TierSpec("G1", 4), TierSpec("G2", 8)], policy="lru", write_through=True)
    m.access([1, 2], now=0.0)
    assert set(m.tiers[1].sizes) == {1, 2}
    writes = m.tiers[1].stats.writes
    m.access([1, 2], now=1.0)
    assert m.tiers[1].stats.writes == writes   # already there: not rewritten


def test_store_lifecycle_and_errors():
    events = []

    class Listener:
        def on_demote(self, src, dst, keys):
            events.append(("demote", src, dst, list(keys)))

        def on_evict(self, tier, keys):
            events.append(("evict", tier, list(keys)))

    m = ReplayManager([TierSpec("G1", 2), TierSpec("G2", 4)], policy="lru", listener=Listener())
    plan = m.prepare_store([1, 2, 1])
    assert plan.store == [1, 2] and m.lookup([1]) == [0, 0]   # dedup; invisible until complete
    m.complete_store([1, 2])
    assert m.lookup([1, 2]) == [2, 2]
    with pytest.raises(ManagerError):
        m.complete_store([1])
    with pytest.raises(ManagerError):
        m.release([1])
    m.acquire([1, 2])
    plan = m.prepare_store([3])
    assert plan.store == [] and m.locate(1) == 0  # readers protect 1 and 2: no room
    m.release([1, 2])
    plan = m.prepare_store([3])
    assert plan.store == [3] and plan.evicted == [(1, 0, 1)]
    assert ("demote", 0, 1, [1]) in events and ("evict", 0, [1]) in events
    m.complete_store([3], ok=False)
    assert m.locate(3) is None
    m.discard([1], tier=1)
    assert m.locate(1) is None
    m.check_invariants()


def test_apply_hints_maps_blocks():
    m = ReplayManager([TierSpec("G1", 16)], policy="agent", pin_budget_frac=1.0)
    keys = list(range(100, 108))
    m.access(keys, session="s", now=0.0)
    hints = AgentHints(session_id="s", prefix_tokens=40, pins=[Pin(target="system_and_tools", lease_s=60)],
                       ephemeral=[TokenRange(112, 128)])
    report = m.apply_hints(keys, hints, block_size=16, now=0.0)
    assert report.pinned == [100, 101, 102]          # tokens 0..39 overlap blocks 0..2
    assert m.entry(107).lane == "ephemeral" and m.entry(103).lane == "normal"
    m.check_invariants()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError):
        ReplayManager([])
    with pytest.raises(ValueError):
        TierSpec("G1", -1)
    m = ReplayManager([TierSpec("G1", 4)])
    with pytest.raises(ValueError):
        m.set_priority([1], 101, 1.0)
    with pytest.raises(ValueError):
        m.prepare_store([1], tier=3)
    with pytest.raises(ManagerError):
        m.acquire([42])


def test_write_through_copies_a_stored_chunk_into_every_lower_tier():
    """G2 -> G3 and G4 at once: a chunk written through reaches the shared remote tier, not only the disk."""
    demoted = []

    class Listener:
        def on_demote(self, src, dst, keys):
            demoted.append((src, dst, sorted(keys)))

        def on_evict(self, tier, keys):
            pass

    m = ReplayManager([TierSpec("G1", 0), TierSpec("G2", 4), TierSpec("G3", 8), TierSpec("G4", 16)], policy="lru",
                write_through=True, listener=Listener())
    plan = m.prepare_store([1, 2], 1)
    m.complete_store(plan.store, 1)
    assert demoted == [(1, 2, [1, 2]), (1, 3, [1, 2])]
    assert all(k in m.tiers[t].sizes for t in (1, 2, 3) for k in (1, 2))
    m.check_invariants()


def test_a_tenant_pins_no_more_than_its_share_of_the_pin_budget():
    """Pins count against their tenant's share of a tier's pin budget: tenant A cannot take the budget B's pins
    need; what is over A's share gets priority 100 for the lease instead, like any pin over budget."""
    from kvtier.manager import Manager
    m = Manager([TierSpec("G1", 0), TierSpec("G2", 8)], policy="lru", pin_budget_frac=0.5, tenant_pin_budget_frac=0.5)
    m.complete_store(m.prepare_store(list(range(8)), tier=1).store, tier=1)
    a = m.pin([0, 1, 2], lease_s=60, owner="tenant-a")            # the pin budget is 4 keys, A's share 2
    assert a.pinned == [0, 1] and a.downgraded == [2]
    b = m.pin([4, 5, 6], lease_s=60, owner="tenant-b")
    assert b.pinned == [4, 5] and b.downgraded == [6]
    assert m.pin([3], lease_s=60).downgraded == [3]               # the whole budget is taken
    assert m.tiers[1].pinned_by == {"tenant-a": 2, "tenant-b": 2}
    m.check_invariants()
    m.tick(now=m._clock() + 120)                                    # leases end: the shares are free again
    assert not m.tiers[1].pinned_by and m.pin([2], lease_s=60, owner="tenant-a").pinned == [2]
    m.check_invariants()
