import io
import json
import tarfile

import numpy as np
import pytest

from kvtier.errors import UsageError
from kvtier.manager import TierSpec
from kvtier.sim.manager import ReplayManager
from kvtier.sim import cli
from kvtier.sim.mooncake import load_mooncake
from kvtier.sim.replay import capacity_from_frac, replay
from kvtier.sim.synthetic import SyntheticSpec, generate
from kvtier.sim.trace import STOP_REASONS, Trace, workload_stats
from kvtier.sim.weka import load_weka, parse_sessions, session_clock


def make_trace(requests, sessions=None):
    offsets = np.r_[0, np.cumsum([len(r) for r in requests])].astype(np.int64)
    n = len(requests)
    return Trace("t", "test", 16, np.asarray([k for r in requests for k in r], np.int64), offsets,
                 np.arange(n, dtype=float), np.asarray(sessions or [0] * n, np.int32), np.zeros(n, np.int32))


def test_prefix_rule_and_capacity_definitions():
    # everything cached: the re-send hits all 3 of 6 blocks
    trace = make_trace([[1, 2, 3], [1, 2, 3]])
    assert replay(trace, "lru", 10).hit_rate == pytest.approx(3 / 6)
    assert trace.infinite_cache_hit_rate() == pytest.approx(3 / 6)
    trace = make_trace([[1, 2, 3], [7, 8], [1, 2, 3]])
    result = replay(trace, "lru", 4)
    assert result.hit_blocks == 2   # leaf 3 went first (capacity 4: blocks 7, 8 displaced 2 of 1, 2, 3)
    assert capacity_from_frac(trace, 0.5) == 2   # 5 unique blocks


def test_synthetic_statistics_within_stated_ranges():
    for seed in range(2):
        stats = workload_stats(generate(SyntheticSpec(sessions=24), seed=seed))
        assert 0.95 <= stats["overlap_mean"] < 1.0     # agents re-send ~97-99% of the previous call
        assert 10 <= stats["read_write_ratio"] <= 40   # write once, read many


def test_synthetic_has_shared_prefix_reasoning_and_subagents():
    spec = SyntheticSpec(sessions=30, subagent_prob=0.2)
    trace = generate(spec, seed=3)
    firsts = {int(trace.sessions[i]): trace.request(i) for i in range(trace.num_requests - 1, -1, -1)}
    assert all(list(ks[:spec.system_blocks]) == list(range(spec.system_blocks)) or
               list(ks[:spec.subagent_system_blocks]) == list(range(spec.system_blocks, spec.system_blocks +
                                                                     spec.subagent_system_blocks))
               for ks in firsts.values())
    assert len(firsts) > 30                     # subagents are sessions of their own
    assert trace.ephemeral_tail.sum() > 0
    # reasoning blocks never come back
    tails = {int(k) for i in range(trace.num_requests) if trace.ephemeral_tail[i]
             for k in trace.request(i)[-trace.ephemeral_tail[i]:]}
    counts = np.bincount(trace.keys)
    assert all(counts[k] == 1 for k in tails)


def test_agent_policy_not_below_lru_on_synthetic():
    trace = generate(SyntheticSpec(sessions=40), seed=5)
    for frac in (0.02, 0.05):
        cap = capacity_from_frac(trace, frac)
        agent, lru, belady = (replay(trace, p, cap).hit_rate for p in ("agent", "lru", "belady"))
        assert lru <= agent <= belady


def test_mooncake_loader_honours_session_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"timestamp": 5, "input_length": 1024, "output_length": 1, "hash_ids": [0, 1], "session_id": "a"},
            {"timestamp": 1, "input_length": 512, "output_length": 1, "hash_ids": [0]},
            {"timestamp": 9, "input_length": 1536, "output_length": 1, "hash_ids": [0, 1, 2], "session_id": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    trace = load_mooncake(path)
    assert trace.times.tolist() == [0.001, 0.005, 0.009]
    assert trace.sessions.tolist() == [-1, 0, 0]
    assert replay(trace, "lru", 10).hit_blocks == 1 + 2
    path.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="m.jsonl:1"):
        load_mooncake(path)


def weka_tar(tmp_path, scope="local", duplicate=False):
    sessions = [
        {"id": "trace_0000", "models": ["m1"], "block_size": 64, "tool_tokens": 64, "system_tokens": 64,
         "hash_id_scope": scope,
         "requests": [
             {"t": 0.0, "type": "s", "model": "m1", "in": 200, "out": 5, "hash_ids": [1, 2, 3], "api_time": 1.0,
              "stop": "tool_use"},
             {"t": 10.0, "type": "subagent", "agent_id": "agent_001", "system_tokens": 0, "tool_tokens": 0,
              "requests": [{"t": 1.0, "type": "n", "model": "m2", "in": 64, "out": 1, "hash_ids": [1]}]},
             {"t": 20.0, "type": "n", "model": "m1", "in": 260, "out": 5, "hash_ids": [1, 2, 3, 4],
              "api_time": 2.0, "stop": "end_turn", "unknown_field": 1}]},
        {"id": "trace_0001", "models": ["m1"], "block_size": 64, "tool_tokens": 0, "system_tokens": 0,
         "hash_id_scope": scope,
         "requests": [{"t": 0.0, "type": "s", "model": "m1", "in": 64, "out": 1, "hash_ids": [1]},
                      {"t": 5.0, "type": "s", "model": "m1", "in": 128, "out": 1, "hash_ids": [1, 2]}]},
    ]
    if duplicate:   # the proxy's repeat of the request before it, which alone records why the response stopped
        sessions[1]["requests"].append(dict(sessions[1]["requests"][-1], t=5.5, api_time=1.0, stop="tool_use"))
    path = tmp_path / f"w_{scope}{'_dup' if duplicate else ''}.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        for s in sessions:
            raw = json.dumps(s).encode()
            info = tarfile.TarInfo(f"traces/{s['id']}.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_weka_loader_places_sessions_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path / "cache"))
    path = weka_tar(tmp_path)
    trace = load_weka(path, slots=1, seed=0)
    assert trace.num_requests == 5 and trace.num_accesses == 11
    # one slot: sessions run back to back; the subagent request sits at 10 + 1 s of its session
    assert np.all(np.diff(trace.times) >= 0)
    assert trace.unique_blocks() == 4 + 1 + 2   # (session, model, hash id): no sharing across them
    assert len(set(trace.sessions.tolist())) == 3  # main m1, subagent m2, second session
    assert trace.prefix_blocks.max() == 2
    assert list((tmp_path / "cache").glob("weka_*.npz"))           # parsed form cached
    again = load_weka(path, slots=2, seed=0)
    assert again.times.min() == 0.0 and again.num_accesses == 11
    assert replay(trace, "lru", 100).hit_blocks == 3 + 1
    # each response's end (arrival + api_time) and why it stopped ride along, in arrival order
    assert sorted((trace.ends - trace.times).tolist()) == [0.0, 0.0, 0.0, 1.0, 2.0]
    assert sorted(STOP_REASONS[c] for c in trace.stop_reasons) == ["", "", "", "end_turn", "tool_use"]


def test_replay_tells_the_policy_each_response_end_in_time_order(monkeypatch):
    """Ends are delivered once the clock passes them, before the next arrival, never from the future."""
    calls = []
    monkeypatch.setattr(ReplayManager, "end_request", lambda self, session, now, stop: calls.append((session, now, stop)))
    monkeypatch.setattr(ReplayManager, "access", lambda self, keys, session, now: calls.append(("arrive", now)) or [0])
    trace = Trace(name="t", source="test", block_tokens=1, keys=np.arange(3), offsets=np.arange(4),
                  times=np.array([0.0, 1.0, 5.0]), sessions=np.array([7, 8, 7]), prefix_blocks=np.zeros(3, int),
                  ends=np.array([4.0, 2.0, 9.0]), stop_reasons=np.array([1, 2, 0]))
    replay(trace, "lru", 10)
    assert calls == [("arrive", 0.0), ("arrive", 1.0), (8, 2.0, "end_turn"), (7, 4.0, "tool_use"), ("arrive", 5.0)]
    with pytest.raises(ValueError, match="STOP_REASONS"):
        Trace(name="t", source="test", block_tokens=1, keys=np.arange(1), offsets=np.arange(2), times=np.zeros(1),
              sessions=np.zeros(1, int), prefix_blocks=np.zeros(1, int), stop_reasons=np.array([3]))


def test_weka_clock_caps_gaps_and_keeps_order(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path / "cache"))
    parsed = parse_sessions(weka_tar(tmp_path))
    recorded = session_clock(parsed, None)
    np.testing.assert_array_equal(recorded, [0.0, 11.0, 20.0, 0.0, 5.0])   # subagent: marker 10 + its 1 s
    np.testing.assert_array_equal(session_clock(parsed, 4.0), [0.0, 4.0, 8.0, 0.0, 4.0])
    np.testing.assert_array_equal(session_clock(parsed, 60.0), recorded)
    with pytest.raises(ValueError, match="max_gap"):
        session_clock(parsed, -1.0)
    # one slot: the second session starts when the first one's last response ends (capped: 8 + 2 s)
    capped = load_weka(weka_tar(tmp_path), slots=1, seed=0, max_gap=4.0)
    uncapped = load_weka(weka_tar(tmp_path), slots=1, seed=0, max_gap=None)
    assert capped.times.max() < uncapped.times.max()
    assert sorted(capped.times.tolist()) in ([0.0, 4.0, 8.0, 10.0, 14.0], [0.0, 4.0, 4.0, 8.0, 12.0])


def test_cli_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path / "cache"))
    import argparse
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--format", "weka", "--trace", str(weka_tar(tmp_path)), "--slots", "2",
                              "--policy", "agent", "--capacity-blocks", "3", "--json", str(out), "--no-progress",
                              "--tiers", "2,4"])
    assert cli.run(args) == 0
    data = json.loads(out.read_text())
    rows = {r["policy"]: r for r in data["rows"]}
    assert set(rows) == {"agent", "lru", "belady"} and "w_local" in data["trace"]
    assert set(rows["agent"]["tiers"]) == {"G1", "G2", "G3"}
    assert rows["lru"]["hit_rate"] <= rows["belady"]["hit_rate"]


def test_cli_plots_the_capacities_asked_for(tmp_path, monkeypatch):
    import argparse
    seen = {}
    monkeypatch.setattr("kvtier.sim.plot.plot_sweep", lambda path, fracs, curves, title: seen.update(
        fracs=fracs, curves=curves))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--format", "synthetic", "--regime", "shared-prefix", "--capacity-frac",
                              "0.02,0.01", "--plot", str(tmp_path / "p.png"), "--no-progress"])
    assert cli.run(args) == 0
    assert len(seen["fracs"]) == 2 and seen["fracs"][0] < seen["fracs"][1]
    assert set(seen["curves"]) == {"agent", "lru", "belady"}
    args = parser.parse_args(["--format", "weka", "--trace", str(tmp_path / "missing.tar.xz")])
    with pytest.raises(UsageError, match="trace not found"):  # kvtier's main prints it as one line
        cli.run(args)


def test_weka_global_scope_shares_blocks_across_sessions(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path / "cache"))
    local = load_weka(weka_tar(tmp_path, "local"), slots=1, seed=0)
    shared = load_weka(weka_tar(tmp_path, "global"), slots=1, seed=0)
    assert local.unique_blocks() == 4 + 1 + 2
    assert shared.unique_blocks() == 4 + 1          # m1's ids 1, 2 are the same blocks in both sessions
    assert "global" in shared.name and "local" in local.name
    assert "w_global" in shared.name                # the label comes from the file


def test_weka_drops_proxy_duplicates_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path / "cache"))
    path = weka_tar(tmp_path, duplicate=True)
    trace = load_weka(path, slots=1, seed=0)
    assert trace.num_requests == 5 and trace.dropped_duplicates == 1
    # folded into the request it repeats: that one keeps its arrival and takes the stop reason and the end
    last = int(np.argmax(trace.times))
    assert trace.times[last] == trace.times.max() and trace.ends[last] == pytest.approx(trace.times[last] + 1.5)
    assert STOP_REASONS[trace.stop_reasons[last]] == "tool_use"
    kept = load_weka(path, slots=1, seed=0, keep_duplicates=True)
    assert kept.num_requests == 6 and kept.dropped_duplicates == 0


def test_weka_halves_are_disjoint_and_cover_the_sessions(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path / "cache"))
    path = weka_tar(tmp_path)
    halves = [load_weka(path, slots=1, seed=0, half=h) for h in (0, 1)]
    assert sum(h.num_requests for h in halves) == load_weka(path, slots=1, seed=0).num_requests
    assert {h.num_requests for h in halves} == {3, 2}


def test_vllm_shape_runs_lru_in_g1_and_the_policy_in_g2():
    """``vllm_g1``: G1 is vLLM's prefix cache (leaf-first LRU) whatever the policy; G2 gets every computed
    block (write-through) and is ordered by the policy, so G1 hits exactly what LRU alone would."""
    trace = generate(SyntheticSpec(sessions=24, slots=6, mean_calls=10), seed=2)
    cap = capacity_from_frac(trace, 0.02)
    shaped = replay(trace, "agent", cap, tier_multipliers=(4,), vllm_g1=True)
    assert shaped.hit_rate == replay(trace, "lru", cap).hit_rate
    assert shaped.tiers["G2"]["hit_blocks"] > 0 and shaped.tiers["G2"]["writes"] > 0
    manager = ReplayManager([TierSpec("G1", 8), TierSpec("G2", 32)], policy="agent", vllm_g1=True)
    assert [t.policy.name for t in manager.tiers] == ["lru", "agent"] and manager.write_through
    with pytest.raises(ValueError, match="needs a G2"):
        ReplayManager([TierSpec("G1", 8)], policy="agent", vllm_g1=True)
