
import numpy as np
import pytest

from kvtier.manager import TierSpec
from kvtier.sim.manager import ReplayManager
from kvtier.manager.policies import POLICIES, NextUseOracle, make_policy


def run(policy, capacity, requests, sessions=None, times=None, **kwargs):
    m = ReplayManager([TierSpec("G1", capacity)], policy=policy,
                policy_kwargs={k: v for k, v in kwargs.items() if k in ("oracle", "bypass")})
    hits = []
    for i, keys in enumerate(requests):
        if policy == "belady":
            m.tiers[0].policy.advance(*kwargs["oracle_range"][i])
        hits.append(m.access(keys, session=None if sessions is None else sessions[i],
                             now=float(i) if times is None else times[i])[0])
        m.check_invariants()
    return hits, m


def held(m):
    return set(m.tiers[0].sizes)


def test_lru_evicts_least_recent():
    hits, m = run("lru", 2, [[1], [2], [1], [3], [1], [2]])
    assert hits == [0, 0, 1, 0, 1, 0]  # 3 evicts 2; 2 then evicts 3
    assert held(m) == {1, 2}


def test_fifo_ignores_hits():
    hits, m = run("fifo", 2, [[1], [2], [1], [3], [1]])
    assert hits == [0, 0, 1, 0, 0]  # 3 evicts 1 although 1 was just used


def test_lfu_keeps_frequent():
    hits, m = run("lfu", 2, [[1], [1], [2], [3], [1], [2]])
    assert hits == [0, 1, 0, 0, 1, 0]  # 3 evicts 2 (freq 1, older than 3)
    assert held(m) == {1, 2}


def test_lru_loses_the_leaf_and_root_first_lru_the_head():
    # capacity 3; a 3-block context, then one unrelated block, then the context again
    reqs = [[1, 2, 3], [9], [1, 2, 3]]
    assert run("lru", 3, reqs)[0] == [0, 0, 2]          # block 3 (the leaf) went: 2 prefix hits (vLLM's order)
    assert run("lru-root", 3, reqs)[0] == [0, 0, 0]     # block 1 (the head) went: nothing hits


def test_arc_keeps_frequently_used_over_a_scan():
    reqs = [[1], [1], [2], [2]] + [[k] for k in range(10, 14)] + [[1], [2]]
    hits, _ = run("arc", 3, reqs)
    assert hits[-2:] == [1, 1]
    assert run("lru", 3, reqs)[0][-2:] == [0, 0]


def test_s3fifo_drops_one_hit_wonders_first():
    reqs = [[1], [1]] + [[k] for k in range(10, 30)] + [[1]]
    assert run("s3fifo", 10, reqs)[0][-1] == 1
    assert run("fifo", 10, reqs)[0][-1] == 0


def test_lirs_keeps_part_of_a_loop_larger_than_the_cache():
    loop = [[k] for k in range(1, 8)] * 6           # 7 blocks cycling through a cache of 5
    assert sum(run("lru", 5, loop)[0]) == 0         # LRU evicts each block just before its reuse
    assert sum(run("lirs", 5, loop)[0]) >= 3 * 4   # LIRS keeps its LIR blocks resident across the loop


def test_tinylfu_rejects_rare_newcomers():
    reqs = [[1], [1], [1], [2], [2], [2], [7], [1], [2]]
    hits, m = run("tinylfu", 2, reqs)
    assert 7 not in held(m) and hits[-2:] == [1, 1]


def test_agent_evicts_stale_branch_then_furthest_session():
    # session A re-sends [1,2] and drops 3 (a stale branch); session B calls every second, A every 100 s
    reqs = [[1, 2, 3], [1, 2], [5, 6], [5, 6], [5, 6, 7]]
    sessions = ["A", "A", "B", "B", "B"]
    times = [0.0, 100.0, 101.0, 102.0, 103.0]
    hits, m = run("agent", 5, reqs, sessions, times)
    # 7 needs room: stale block 3 goes first, not B's blocks nor A's live prefix
    assert held(m) == {1, 2, 5, 6, 7}
    hits2 = m.access([5, 6, 7, 8], session="B", now=104.0)
    # A is predicted to return at ~200 s, B at ~105 s: A's leaf (2) goes, A keeps its head
    assert held(m) == {1, 5, 6, 7, 8} and hits2 == [3]


def test_agent_keeps_a_branch_left_out_a_moment_ago_over_a_long_idle_session():
    # A alternates between branches (3, then 4); B has been idle for 100 s; C's block needs one slot
    reqs = [[10, 11], [1, 2, 3], [1, 2, 4], [20]]
    sessions = ["B", "A", "A", "C"]
    times = [0.0, 100.0, 101.0, 101.5]
    _, m = run("agent", 6, reqs, sessions, times)
    assert held(m) == {1, 2, 3, 4, 10, 20}   # B's leaf went, not A's stale branch


def test_agent_keeps_a_block_while_any_session_holding_it_may_return():
    """A resumed or forked session re-sends another's context: evicting the quiet one releases those blocks,
    but they stay for the session that still holds them, and its deepest private blocks go first."""
    from kvtier.manager.policies.agent import AgentAware
    policy = AgentAware(capacity=8)
    policy.begin_request("A", 0.0, next_call_delay_s=1000.0)   # A is not back for a long time
    policy.touch_request([1, 2, 3, 4, 5], (), "A")
    policy.begin_request("B", 1.0, next_call_delay_s=10.0)     # B continues A's context
    policy.touch_request([1, 2, 3, 6], (), "B")
    assert policy.evict(3, busy=()) == [5, 4, 6]   # A's own leaves, then B's leaf; the shared head stays
    assert all(k in policy for k in (1, 2, 3)) and len(policy) == 3


def test_agent_takes_stale_blocks_only_while_they_rank_ahead_of_other_sessions():
    """Stale blocks of one session were left out at different times: one eviction takes the long-unused
    ones, then another session's, and leaves the recently left-out ones (not a whole batch at once)."""
    from kvtier.manager.policies.agent import AgentAware
    policy = AgentAware(capacity=16)
    policy.begin_request("A", 0.0)
    policy.touch_request([1, 10, 11], (), "A")          # 10, 11: unused since 0 s -> back at ~180 s
    policy.begin_request("B", 20.0, next_call_delay_s=150.0)
    policy.touch_request([5, 6], (), "B")               # B: back at 170 s
    policy.begin_request("A", 50.0)
    policy.touch_request([1, 20, 21], (), "A")          # 20, 21: unused since 50 s -> back at ~130 s
    policy.begin_request("A", 90.0)
    policy.touch_request([1, 30], (), "A")
    assert policy.evict(4, busy=()) == [11, 10, 6, 5]   # leaf-first within a request
    assert all(k in policy for k in (1, 20, 21, 30))


def _scan_evict(policy, n, busy):
    """The agent policy's eviction written as the plain scan it ranks with a heap: every pick re-ranks every
    session holding blocks."""
    import math
    from kvtier.manager.policies.base import pop_front
    out, skip, now = [], set(), policy._now
    while len(out) < n:
        ranked = sorted(((policy._front_prediction(s, now), -rank, sid) for rank, (sid, s)
                         in enumerate(policy._holding.items()) if sid not in skip), reverse=True)
        if not ranked:
            break
        sid, runner_up = ranked[0][2], ranked[1][0] if len(ranked) > 1 else -math.inf
        s = policy._holding[sid]
        stale, want = len(s.order) - s.fresh, policy._to_take(s, n - len(out), runner_up, now)
        got = pop_front(s.order, want, busy)
        if len(got) < want:
            skip.add(sid)
        s.fresh = min(max(0, s.fresh - (len(got) - min(len(got), max(0, stale)))), len(s.order))
        out.extend(key for key in got if policy._let_go(sid, s, key))
        if not s.order:
            del policy._holding[sid]
    return out


def test_agent_eviction_ranks_like_a_scan_of_every_session():
    """Many sessions with stale branches, shared heads and busy blocks: the heap picks the same victims, in the
    same order, as re-ranking every session before each pick."""
    import copy
    from kvtier.manager.policies.agent import AgentAware
    rng = np.random.default_rng(7)
    policy = AgentAware(capacity=10_000)
    contexts = {s: [0, 1] for s in range(40)}
    for i in range(600):
        s = int(rng.integers(40))
        contexts[s] = contexts[s][:int(rng.integers(2, len(contexts[s]) + 1))] + \
            [100_000 * (s + 1) + 10 * i + j for j in range(int(rng.integers(1, 5)))]
        policy.begin_request(s, float(i) + float(rng.random()))
        policy.touch_request(contexts[s], (), s)
        if i % 50 == 49:
            busy = set(contexts[s])
            n = int(rng.integers(1, 60))
            expected = _scan_evict(copy.deepcopy(policy), n, busy)
            assert policy.evict(n, busy) == expected and len(expected) > 0


def test_agent_bookkeeping_of_shared_blocks_stays_consistent():
    """Random sessions re-sending overlapping contexts through a small cache: every cached block is held by
    the sessions whose order lists it, and each session's count of blocks it alone holds is right."""
    rng = np.random.default_rng(3)
    m = ReplayManager([TierSpec("G1", 40)], policy="agent")
    contexts = {s: list(range(5)) for s in range(6)}   # a common head, then each session's own blocks
    for i in range(400):
        s = int(rng.integers(6))
        if rng.random() < 0.1:   # fork: continue another session's context
            contexts[s] = list(contexts[int(rng.integers(6))])
        contexts[s] = contexts[s][:int(rng.integers(3, len(contexts[s]) + 1))] + \
            [1000 * (s + 1) + i * 10 + j for j in range(int(rng.integers(1, 4)))]
        m.access(contexts[s], session=s, now=float(i))
        m.check_invariants()
        policy = m.tiers[0].policy
        listed: dict = {}
        for sid, session in policy._holding.items():
            for key in session.order:
                listed.setdefault(key, set()).add(sid)
        assert set(listed) == set(m.tiers[0].sizes)
        for sid, session in policy._holding.items():
            assert session.alone == sum(1 for key in session.order if listed[key] == {sid})


def test_agent_prefers_hinted_delay():
    from kvtier.hints import AgentHints
    m = ReplayManager([TierSpec("G1", 4)], policy="agent")
    m.access([1, 2], session="A", now=0.0, hints=AgentHints(next_call_delay_s=1.0))
    m.access([3, 4], session="B", now=0.5, hints=AgentHints(next_call_delay_s=500.0))
    m.access([9], session="C", now=0.9)
    assert {1, 2} <= held(m) and 4 not in held(m)


def test_agent_learns_how_soon_sessions_return_after_each_stop_reason():
    # history: after a tool call sessions came back within 2 s, after an ended turn only after 60 s
    m = ReplayManager([TierSpec("G1", 4)], policy="agent")
    for i, (stop, gap) in enumerate([("tool_use", 2.0), ("end_turn", 60.0)] * 3):
        sid = f"past{i}"
        m.access([100 + i], session=sid, now=0.0)
        m.end_request(sid, 1.0, stop)
        m.access([100 + i], session=sid, now=1.0 + gap)
        m.end_request(sid, 2.0 + gap, stop)
    # A and B each hold a context; A's turn ended, B is running a tool; a newcomer needs room now
    m.access([1, 2], session="A", now=200.0)
    m.end_request("A", 201.0, "end_turn")
    m.access([3, 4], session="B", now=200.5)
    m.end_request("B", 201.5, "tool_use")
    m.access([9], session="C", now=202.0)
    assert {3, 4} <= held(m) and 2 not in held(m)   # A is predicted back last: its leaf goes


def test_agent_learns_how_many_sessions_come_back_after_each_stop_reason():
    # ten sessions ended a turn and never came back, one came back after 60 s; tool calls return in 2 s
    from kvtier.manager.policies.agent import AgentAware
    policy = AgentAware(capacity=100)
    for i in range(10):
        policy.begin_request(f"gone{i}", float(i), None)
        policy.end_request(f"gone{i}", i + 0.5, "end_turn")
    for sid, stop, gap in (("back", "end_turn", 60.0), ("tool", "tool_use", 2.0)):
        policy.begin_request(sid, 20.0, None)
        policy.end_request(sid, 21.0, stop)
        policy.begin_request(sid, 21.0 + gap, None)
        policy.end_request(sid, 22.0 + gap, stop)
    policy.begin_request("B", 100.0, None)   # running a tool for 100 s already: long overdue
    policy.touch_request([3, 4], (), "B")
    policy.end_request("B", 101.0, "tool_use")
    policy.begin_request("A", 200.0, None)   # its turn just ended: most such sessions never return
    policy.touch_request([1, 2], (), "A")
    policy.end_request("A", 201.0, "end_turn")
    policy.begin_request("C", 202.0, None)
    assert policy.evict(1, busy=()) == [2]


def test_agent_keeps_resident_session_instead_of_thrashing():
    # capacity fits one context: B (predicted back later than A) must not push A out; LRU swaps them every call
    # (root-first LRU keeps nothing; leaf-first LRU keeps one block of each)
    reqs = [[1, 2, 3], [5, 6, 7], [1, 2, 3], [5, 6, 7], [1, 2, 3]]
    sessions = ["A", "B", "A", "B", "A"]
    times = [0.0, 1.0, 10.0, 11.0, 20.0]
    agent, m = run("agent", 4, reqs, sessions, times)
    lru, _ = run("lru", 4, reqs, sessions, times)
    assert agent == [0, 0, 3, 1, 3] and {1, 2, 3} <= held(m)
    assert lru == [0, 0, 1, 1, 1] and sum(agent) > sum(lru)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope", 4)
    with pytest.raises(ValueError, match="simulator-only"):
        make_policy("belady", 4)


def _belady_hits(seq, capacity, bypass):
    keys = np.asarray(seq, np.int64)
    offsets = np.arange(len(seq) + 1)
    oracle = NextUseOracle(keys, offsets)
    ranges = [(i, i + 1) for i in range(len(seq))]
    hits, _ = run("belady", capacity, [[k] for k in seq], oracle=oracle, oracle_range=ranges, bypass=bypass)
    return sum(hits)


def _brute_force(seq, capacity, bypass):
    best = {frozenset(): 0}
    for key in seq:
        nxt = {}
        for cache, h in best.items():
            if key in cache:
                options = [(cache, h + 1)]
            elif len(cache) < capacity:
                options = [(cache | {key}, h)]
            else:
                options = [((cache - {v}) | {key}, h) for v in cache] + ([(cache, h)] if bypass else [])
            for c, v in options:
                nxt[c] = max(nxt.get(c, -1), v)
        best = nxt
    return max(best.values())


@pytest.mark.parametrize("bypass", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_belady_matches_brute_force(seed, bypass):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, 6, size=12).tolist()
    capacity = int(rng.integers(1, 4))
    assert _belady_hits(seq, capacity, bypass) == _brute_force(seq, capacity, bypass)


def test_belady_bypass_can_beat_forced_admission():
    seq = [1, 2, 3, 1, 2, 3, 1, 2, 3]  # a loop one larger than the cache: bypassing keeps part of it
    assert _belady_hits(seq, 2, bypass=True) > _belady_hits(seq, 2, bypass=False)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_respects_capacity_and_busy(name):
    rng = np.random.default_rng(1)
    reqs = [list(range(int(s), int(s) + 4)) for s in rng.integers(0, 12, 40)]
    flat = np.asarray([k for r in reqs for k in r], np.int64)
    offsets = np.r_[0, np.cumsum([len(r) for r in reqs])]
    kwargs = {}
    if name == "belady":
        kwargs = dict(oracle=NextUseOracle(flat, offsets), oracle_range=list(zip(offsets[:-1], offsets[1:])))
    m = ReplayManager([TierSpec("G1", 6)], policy=name,
                policy_kwargs={k: v for k, v in kwargs.items() if k == "oracle"})
    for i, r in enumerate(reqs):
        if name == "belady":
            m.tiers[0].policy.advance(*kwargs["oracle_range"][i])
        m.access(r, session=i % 3, now=float(i))
        m.check_invariants()
        assert m.tiers[0].used <= 6


def test_policy_batch_matches_single_calls():
    for name in ("lru", "fifo", "lfu", "arc", "s3fifo", "lirs", "agent"):
        a, b = make_policy(name, 8), make_policy(name, 8)
        for key in range(5):
            a.insert(key)
        a.access(2)
        b.touch_request(list(range(5)), set(range(5)))
        b.touch_request([2], ())
        assert len(a) == len(b) == 5
        assert sorted(a.evict(5, ())) == sorted(b.evict(5, ())) == list(range(5))


def test_interleaved_requests_credit_each_chunk_to_its_own_session():
    """Under a server requests interleave: B begins, A begins (the last to call in), then each stores and
    reads its own chunks. Every chunk is A's or B's as its request said, not whichever request called last:
    A says it is not back for a long time, so A's chunks go first and B's stay."""
    from kvtier.hints import AgentHints
    from kvtier.manager import Manager
    m = Manager([TierSpec("G1", 0), TierSpec("G2", 4)], policy="agent")
    m.begin_request("B", now=0.0, hints=AgentHints(next_call_delay_s=5.0))
    m.begin_request("A", now=0.1, hints=AgentHints(next_call_delay_s=1000.0))
    b = m.prepare_store([10, 11], tier=1, session="B").store
    a = m.prepare_store([20, 21], tier=1, session="A").store
    m.complete_store(b, tier=1)      # completes after A's prepare: the last caller was A
    m.complete_store(a, tier=1)
    m.touch([10, 11], tier=1, session="B")
    m.begin_request("C", now=0.2, hints=AgentHints(next_call_delay_s=1.0))
    evicted = m.prepare_store([30, 31], tier=1, session="C").evicted
    assert sorted(key for key, _, _ in evicted) == [20, 21]
    assert 10 in m and 11 in m


def test_admission_weighs_the_storing_requests_session_not_the_last_caller():
    """The agent policy admits a store only if its session is back before the one it would evict from: the
    session asked about is the storing request's, even when another request called in since."""
    from kvtier.hints import AgentHints
    from kvtier.manager import Manager
    m = Manager([TierSpec("G1", 0), TierSpec("G2", 2)], policy="agent")
    m.begin_request("soon", now=0.0, hints=AgentHints(next_call_delay_s=5.0))
    m.complete_store(m.prepare_store([1, 2], tier=1, session="soon").store, tier=1)
    m.begin_request("late", now=1.0, hints=AgentHints(next_call_delay_s=1000.0))
    m.begin_request("sooner", now=1.5, hints=AgentHints(next_call_delay_s=1.0))
    assert m.prepare_store([3, 4], tier=1, session="late").store == []      # would push out a sooner session
    assert m.prepare_store([5, 6], tier=1, session="sooner").store == [5, 6]


def test_a_store_with_a_tier_below_is_never_declined_and_a_prefetch_is_weighed():
    """With nothing below G2 the agent policy declines a store that would push out a session due sooner (that
    session would be recomputed); with G3 below, what G2 evicts is demoted, not lost, so the store gets room and
    the victims go down. A prefetch (the chunks are safe below) still needs the policy's consent."""
    from kvtier.hints import AgentHints
    from kvtier.manager import Manager

    def filled(specs):
        m = Manager(specs, policy="agent")
        m.begin_request("soon", now=0.0, hints=AgentHints(next_call_delay_s=5.0))
        m.complete_store(m.prepare_store([1, 2], tier=1, session="soon").store, tier=1)
        m.begin_request("late", now=1.0, hints=AgentHints(next_call_delay_s=1000.0))
        return m

    alone = filled([TierSpec("G1", 0), TierSpec("G2", 2)])
    assert alone.prepare_store([3, 4], tier=1, session="late").store == []
    tiered = filled([TierSpec("G1", 0), TierSpec("G2", 2), TierSpec("G3", 8)])
    plan = tiered.prepare_store([3, 4], tier=1, session="late")
    assert plan.store == [3, 4] and sorted((k, dst) for k, _, dst in plan.evicted) == [(1, 2), (2, 2)]
    tiered.complete_store(plan.store, tier=1)
    tiered.adopt([5, 6], tier=2)     # another session's chunks, on disk
    tiered.begin_request("never", now=2.0, hints=AgentHints(next_call_delay_s=5000.0))
    assert tiered.prepare_store([5, 6], tier=1, session="never", prefetch=True).store == []  # due after "late"
    assert tiered.prepare_store([1, 2], tier=1, session="soon", prefetch=True).store == [1, 2]


def test_agent_policy_memory_stays_bounded_however_many_sessions_come(monkeypatch):
    """Every conversation is a session: sessions that hold no block are forgotten beyond a bound, least recently
    active first; the ones holding blocks are all kept."""
    from kvtier.manager.policies import agent
    monkeypatch.setattr(agent, "MAX_IDLE_SESSIONS", 8)
    policy = agent.AgentAware(capacity=4)
    policy.begin_request("holder", 0.0)
    policy.touch_request([1, 2], (), "holder")
    for i in range(100):
        policy.begin_request(f"s{i}", float(i + 1))
        policy.end_request(f"s{i}", float(i + 1.5), "end_turn")
    assert len(policy._sessions) == 9 and "holder" in policy._sessions and "s99" in policy._sessions
    assert policy.evict(2, busy=()) == [2, 1]      # the holder let go of its blocks: now it is idle too
    for i in range(8):
        policy.begin_request(f"t{i}", 200.0 + i)
    assert "holder" not in policy._sessions and len(policy._sessions) == 8


def test_agent_policy_keeps_the_context_of_a_request_waiting_in_the_queue():
    """A request that has arrived and not read its context yet (queued in vLLM behind longer prefills) needs it as
    soon as the scheduler reaches it: its context is kept over one whose next call is still to come, and is not
    taken for a stale branch of its previous request (before, arrival reset it to stale: evicted just before the
    read, at a served capacity cliff the policy did no better than LRU)."""
    from kvtier.manager.policies.agent import AgentAware
    policy = AgentAware(capacity=4)
    for session, keys, t in (("a", [1, 2], 0.0), ("b", [3, 4], 10.0)):
        policy.begin_request(session, t)
        policy.touch_request(keys, set(keys), session)
        policy.end_request(session, t + 1.0, "tool_use")
    policy.begin_request("a", 100.0)                      # a's next call waits; b's is still to come
    assert policy.evict(2, busy=()) == [4, 3]
    policy.touch_request([1, 2], (), "a")                  # read: a is generating, needed after its response
    policy.begin_request("b", 101.0)
    assert policy.evict(1, busy=()) == [2]
