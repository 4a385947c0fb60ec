"""The benchmarks' peers run for real on tiny inputs: NVIDIA Dynamo's RadixTree answers the router benchmark's
stream as kvtier's index does, and LMCache's backends return every byte. Each skips, naming the set-up
command, only where ``scripts/setup_peers.sh`` could not install the peer."""

from __future__ import annotations

import json
import random

import pytest

from kvtier.bench import router as bench_router
from kvtier.bench import tiers as bench_tiers
from kvtier.bench.peers import missing_reason, run_peer
from kvtier.hashing import chain_hashes
from kvtier.router.block_index import NativeBlockIndex, PyBlockIndex


def sessions(n_sessions: int = 6, turns: int = 5, seed: int = 0) -> list[bench_router.Request]:
    """Agent-like requests: each session's prompt grows by a few blocks per turn, all share a system prompt."""
    rng = random.Random(seed)
    system = [rng.getrandbits(64) for _ in range(4)]
    requests, t = [], 0.0
    for s in range(n_sessions):
        local = system + [rng.getrandbits(64) for _ in range(3)]
        for _ in range(turns):
            local += [rng.getrandbits(64) for _ in range(rng.randint(1, 4))]
            t += 1.0
            requests.append(bench_router.Request(t, t + 0.5, s, chain_hashes(local)))
    requests.sort(key=lambda r: r.t)
    return requests


def simulated_log() -> tuple[list, list[bench_router.Request]]:
    requests = sessions()
    log: list = []
    bench_router.simulate(requests, n_workers=3, policy="kv-aware", device_capacity=12, seed=0, log=log)
    return log, requests


def test_the_any_medium_stream_answers_as_the_per_medium_log_does():
    """The peers' stream must not change what the router sees: every find gets the same any-medium overlap."""
    log, requests = simulated_log()
    index = PyBlockIndex()
    expected = []
    for item in log:
        if item[0] == "find":
            expected.append({str(slot): n for slot, _d, _h, n in index.find(item[1]) if n})
        else:
            getattr(index, item[0])(item[1], item[2], item[3])
    stream = bench_router.any_medium_stream(log, requests)
    assert any(op[0] == "remove" for op in stream) and any(op[0] == "store" for op in stream)
    _, _, answers = bench_router.kvtier_peer_replay(stream, PyBlockIndex)
    assert answers == expected


def test_dynamo_radixtree_gives_kvtiers_answers_on_the_same_stream(tmp_path):
    reason = missing_reason("dynamo")
    if reason:
        pytest.skip(reason)
    log, requests = simulated_log()
    stream = bench_router.any_medium_stream(log, requests)
    impls = [("native", NativeBlockIndex)] if NativeBlockIndex else []
    impls.append(("python", PyBlockIndex))
    latency = {name: (1.0, 2.0) for name, _ in impls}
    rows = bench_router.compare_with_dynamo(stream, impls, latency, calls=50, workdir=tmp_path)
    dynamo = next(r for r in rows if r["impl"] == "dynamo-radixtree")
    assert dynamo["same_block_keys"] and dynamo["refused_events"] == 0
    assert all(r["same_answers"] for r in rows)
    assert dynamo["find_p99_us"] > 0 and dynamo["block_ops_per_cpu_s"] > 0


def test_lmcache_backends_return_every_byte(tmp_path):
    reason = missing_reason("lmcache")
    if reason:
        pytest.skip(reason)
    workload = tmp_path / "workload.json"
    workload.write_text(json.dumps({"sizes": [64 << 10], "total_bytes": 1 << 20, "reps": 1,
                                    "disk_dir": str(tmp_path)}))
    rows = run_peer("lmcache", "lmcache_tiers", workload, timeout_s=600)["rows"]
    assert {r["tier"] for r in rows} == {"G2", "G3"}
    assert all(r["verified"] and r["get_gbps"] > 0 for r in rows)


def test_kvtiers_host_tier_side_returns_every_byte():
    first, warm, get, same = bench_tiers.tier_host(64 << 10, 16)
    assert same and min(first, warm, get) > 0
