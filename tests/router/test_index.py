"""The block index (native against the pure-Python oracle), the indexer fed by events, and worker choice."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvtier.hashing import block_hashes
from kvtier.router.block_index import NativeBlockIndex, PyBlockIndex
from kvtier.router.choice import Chooser, CostWeights, PriorityGate, QueueFull, SessionTable, WorkerLoad
from kvtier.router.indexer import KvIndexer, Overlap

BS = 4
IMPLS = [PyBlockIndex] + ([NativeBlockIndex] if NativeBlockIndex else [])


# --- block index --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_per_medium(impl) -> None:
    index = impl()
    index.store(0, 0, [1, 2, 3])
    index.store(0, 1, [4])
    index.store(1, 2, [1, 2, 3, 4, 5])
    index.store(2, 0, [2, 3])  # holds no first block: no prefix at all
    assert index.find([1, 2, 3, 4, 5, 6]) == [(0, 3, 4, 4), (1, 0, 0, 5)]
    assert index.find([9, 1]) == []
    assert index.media(0, 4) == 0b010 and index.media(1, 4) == 0b100 and index.media(3, 4) == 0
    index.remove(1, 2, [3])
    assert index.find([1, 2, 3, 4, 5]) == [(0, 3, 4, 4), (1, 0, 0, 2)]
    index.clear_worker(0)
    assert index.find([1, 2, 3]) == [(1, 0, 0, 2)]
    assert len(index) == 5  # 1, 2, 4, 5 held by slot 1; 2, 3 by slot 2
    with pytest.raises(ValueError):
        index.store(64, 0, [1])
    with pytest.raises(ValueError):
        index.remove(0, 3, [1])


ops = st.lists(st.tuples(st.sampled_from(["store", "remove", "clear"]), st.integers(0, 63), st.integers(0, 2),
                         st.lists(st.integers(0, 40), max_size=12)), max_size=60)


@pytest.mark.skipif(NativeBlockIndex is None, reason="native extension not built")
@settings(max_examples=150, deadline=None)
@given(ops, st.lists(st.lists(st.integers(0, 40), max_size=20), min_size=1, max_size=5))
def test_native_index_agrees_with_the_oracle(operations, queries) -> None:
    native, oracle = NativeBlockIndex(), PyBlockIndex()
    for op, slot, medium, keys in operations:
        for index in (native, oracle):
            if op == "clear":
                index.clear_worker(slot)
            else:
                getattr(index, op)(slot, medium, keys)
    assert len(native) == len(oracle)
    for query in queries:
        assert native.find(query) == oracle.find(query)
    for key in range(41):
        assert native.media(5, key) == oracle.media(5, key)


@pytest.mark.skipif(NativeBlockIndex is None, reason="native extension not built")
def test_native_index_survives_growth_and_deletion() -> None:
    native, oracle = NativeBlockIndex(), PyBlockIndex()
    keys = [(k * 0x9E3779B97F4A7C15) & (2**64 - 1) for k in range(20_000)]
    for index in (native, oracle):
        index.store(3, 0, keys)
        index.remove(3, 0, keys[::3])
        index.store(7, 1, keys[:5000])
    assert len(native) == len(oracle)
    assert native.find(keys[1:3] + keys[4:6]) == oracle.find(keys[1:3] + keys[4:6])
    with pytest.raises(OverflowError):
        native.find([-1])


# --- indexer fed by events ------------------------------------------------------------------------------------
def _stored(tokens: list[int], hashes: list, parent=None, medium="GPU") -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS,
                       lora_id=None, medium=medium, lora_name=None)


def _batch(*events) -> KVEventBatch:
    return KVEventBatch(ts=0.0, events=list(events))


def test_events_with_engine_hashes_map_to_router_keys() -> None:
    tokens = list(range(1, 17))  # four blocks
    keys = block_hashes(tokens, BS)
    idx = KvIndexer(BS)
    idx.add_worker("a")
    idx.add_worker("b")
    # worker a: sha256-style byte hashes, in two events chained through the parent
    idx.apply_batch("a", _batch(_stored(tokens[:8], [b"x1", b"x2"]), _stored(tokens[8:12], [b"x3"], parent=b"x2")))
    idx.apply_batch("a", _batch(_stored(tokens[12:16], [b"x4"], parent=b"x3", medium="CPU")))
    # worker b: int hashes, the whole prompt offloaded to storage
    idx.apply_batch("b", _batch(_stored(tokens, [11, 12, 13, 14], medium="STORAGE")))
    assert idx.find_matches(keys) == {"a": Overlap(3, 4, 4), "b": Overlap(0, 0, 4)}
    assert idx.find_matches(keys[:2] + [123]) == {"a": Overlap(2, 2, 2), "b": Overlap(0, 0, 2)}
    idx.apply_batch("a", _batch(BlockRemoved(block_hashes=[b"x2"], medium="GPU")))
    assert idx.find_matches(keys)["a"] == Overlap(1, 1, 1)
    idx.apply_batch("a", _batch(_stored(tokens[8:12], [b"x3"], parent=b"x2")))  # parent forgotten: orphan
    assert idx.stats.orphan_blocks == 1
    idx.apply_batch("b", _batch(AllBlocksCleared()))
    assert "b" not in idx.find_matches(keys)
    idx.remove_worker("a")
    assert idx.find_matches(keys) == {} and len(idx) == 0


def test_events_for_another_block_size_are_skipped() -> None:
    idx = KvIndexer(BS)
    idx.add_worker("a")
    idx.apply_batch("a", _batch(BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1, 2], block_size=2,
                                            lora_id=None, medium=None, lora_name=None)))
    assert idx.stats.skipped_events == 1 and len(idx) == 0


def test_approximate_workers_learn_from_routing_and_forget_after_ttl() -> None:
    now = [0.0]
    idx = KvIndexer(BS, approx_ttl_s=10.0, clock=lambda: now[0])
    idx.add_worker("quiet", approximate=True)
    idx.add_worker("loud")
    keys = block_hashes(list(range(12)), BS)
    idx.record_routing("quiet", keys)
    idx.record_routing("loud", keys)  # publishes events: routing decisions are not evidence
    assert idx.find_matches(keys) == {"quiet": Overlap(3, 3, 3)}
    now[0] = 5.0
    idx.record_routing("quiet", keys[:1])  # refreshed
    now[0] = 12.0
    assert idx.find_matches(keys) == {"quiet": Overlap(1, 1, 1)}
    now[0] = 16.0
    assert idx.find_matches(keys) == {}


def test_worker_slots_are_reused_and_bounded() -> None:
    idx = KvIndexer(BS)
    for i in range(64):
        idx.add_worker(f"w{i}")
    with pytest.raises(ValueError, match="at most 64"):
        idx.add_worker("one-too-many")
    with pytest.raises(ValueError, match="already"):
        idx.add_worker("w1")
    idx.remove_worker("w5")
    idx.add_worker("late")
    keys = block_hashes(list(range(4)), BS)
    idx.apply_batch("late", _batch(_stored(list(range(4)), [1])))
    assert idx.find_matches(keys) == {"late": Overlap(1, 1, 1)}


# --- choice ---------------------------------------------------------------------------------------------------
def test_cost_credits_tiers_and_load() -> None:
    chooser = Chooser(CostWeights())
    loads = {"a": WorkerLoad(), "b": WorkerLoad(), "c": WorkerLoad()}
    overlaps = {"a": Overlap(0, 0, 8), "b": Overlap(0, 4, 4), "c": Overlap(1, 1, 1)}
    costs = chooser.costs(10, overlaps, loads, ["a", "b", "c"])
    assert costs == {"a": 10 - 8 * 0.25, "b": 10 - 4 * 0.75, "c": 9.0}
    assert chooser.choose(10, overlaps, loads, ["a", "b", "c"]) == "b"
    loads["b"].active_blocks = 2
    assert chooser.choose(10, overlaps, loads, ["a", "b", "c"]) == "a"
    with pytest.raises(ValueError):
        CostWeights(host_credit=1.5)


def test_ties_break_deterministically_and_spread() -> None:
    chooser = Chooser()
    loads = {w: WorkerLoad() for w in "abcd"}
    picks = [chooser.choose(4, {}, loads, list("abcd"), tie_key=k) for k in range(200)]
    assert picks == [chooser.choose(4, {}, loads, list("abcd"), tie_key=k) for k in range(200)]
    assert set(picks) == set("abcd")
    loads["a"].inflight = 1  # equal cost: fewer requests in flight wins
    assert all(chooser.choose(4, {}, loads, ["a", "b"], tie_key=k) == "b" for k in range(20))


def test_temperature_samples_favouring_the_cheapest() -> None:
    chooser = Chooser(CostWeights(temperature=0.5), seed=7)
    loads = {"a": WorkerLoad(), "b": WorkerLoad()}
    overlaps = {"a": Overlap(8, 8, 8)}
    picks = [chooser.choose(10, overlaps, loads, ["a", "b"]) for _ in range(2000)]
    share = picks.count("a") / len(picks)
    assert 0.8 < share < 0.95  # e^2 : 1 -> 0.88


def test_sessions_are_sticky_bounded_and_forgettable() -> None:
    table = SessionTable(max_sessions=2)
    table.put("s1", "a", 7)
    table.put("s2", "b")
    assert table.get("s1") == ("a", 7)
    table.put("s3", "c")  # s2 is the least recently used
    assert table.get("s2") is None and len(table) == 2
    table.forget_worker("a")
    assert table.get("s1") is None and table.get("s3").worker == "c"


def test_gate_wakes_the_most_latency_sensitive_first() -> None:
    async def scenario() -> list[str]:
        gate = PriorityGate(max_waiting=3)
        order: list[str] = []

        async def waiter(name: str, latency_sensitivity_s: float) -> None:
            await gate.wait(latency_sensitivity_s)
            order.append(name)

        tasks = [asyncio.create_task(waiter(n, p)) for n, p in [("low", 0.0), ("high", 500.0), ("mid", 100.0)]]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await gate.wait(900.0)
        for _ in range(3):
            gate.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["high", "mid", "low"]
