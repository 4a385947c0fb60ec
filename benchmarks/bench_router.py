"""How fast is the router's index, and how good are its choices?

1. Index throughput: the block operations of a real agent trace (Weka kv-cache-tester v8, Claude Code
   sessions, ``callanjfox/kv-cache-tester`` @ c9b3da5, Apache-2.0) replayed through the index: stores and
   removals as KV events deliver them, plus ``find_matches`` per request, each counted per block as NVIDIA
   Dynamo counts them. Native index vs the pure-Python one (its baseline and oracle), one core. Also the
   full event path (msgpack decode + re-hashing token ids + index) for scale.
2. ``find_matches`` latency for 128-block prompts against a populated index (p50 / p99).
3. Routing quality: N simulated workers (device LRU, host LRU below it) serving the trace's requests in time
   order with KV-aware, session-sticky and round-robin choice: block hit rate and load spread.

``python benchmarks/bench_router.py [--quick] [--json PATH] [--plot PATH]``
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import platform
import random
import sys
import tarfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kvtier, also when run as a script

from kvtier.events import BlockStored, KVEventBatch, decode_batch, encode_batch
from kvtier.router.block_index import NativeBlockIndex, PyBlockIndex
from kvtier.router.choice import Chooser, CostWeights, WorkerLoad
from kvtier.router.indexer import KvIndexer, Overlap

ROOT = Path(__file__).resolve().parents[1]
TRACE_NAME = "traces/weka_kvcachetester_v8_c9b3da5_traces.tar.xz"
TRACE = next((p / TRACE_NAME for p in (ROOT.parent / "shared", ROOT / "shared", ROOT.parent.parent / "shared")
              if (p / TRACE_NAME).is_file()), ROOT.parent / "shared" / TRACE_NAME)
SOURCE = "Weka kv-cache-tester v8 traces (github.com/callanjfox/kv-cache-tester @ c9b3da5, Apache-2.0)"
TARGET_OPS_PER_CORE = 7e6
TARGET_P99_US = 10.0


@dataclass
class Request:
    t: float
    end: float
    session: int
    keys: list[int]


def load_trace(path: Path, n_sessions: int, slots: int, seed: int) -> list[Request]:
    """Sessions placed in ``slots`` concurrent slots (each starts its next session when the last ends),
    subagent requests flattened at their marker's time; blocks keyed by (session, model, hash id)."""
    sessions = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(".json") and len(sessions) < n_sessions:
                sessions.append(json.load(tar.extractfile(member)))
    random.Random(seed).shuffle(sessions)
    free_at = [(0.0, s) for s in range(slots)]
    requests: list[Request] = []
    for index, session in enumerate(sessions):
        start, slot = heapq.heappop(free_at)
        flat = list(_flatten(session["requests"], 0.0))
        for t, model, hash_ids, api_time in flat:
            keys = [xxhash.xxh3_64_intdigest(f"{index}/{model}/{h}".encode()) for h in hash_ids]
            requests.append(Request(start + t, start + t + api_time, index, keys))
        last = max((t + a for t, _, _, a in flat), default=0.0)
        heapq.heappush(free_at, (start + last, slot))
    requests.sort(key=lambda r: r.t)
    return requests


def _flatten(requests: list[dict], offset: float):
    for r in requests:
        if r.get("type") == "subagent" and "requests" in r:
            yield from _flatten(r["requests"], offset + r.get("t", 0.0))
        elif r.get("hash_ids"):
            yield offset + r["t"], r.get("model", ""), r["hash_ids"], float(r.get("api_time") or 0.0)


# --- simulated workers -------------------------------------------------------------------------------------
@dataclass
class SimWorker:
    device_capacity: int
    host_capacity: int
    device: OrderedDict = field(default_factory=OrderedDict)
    host: OrderedDict = field(default_factory=OrderedDict)
    requests: int = 0
    prefill_blocks: int = 0

    def serve(self, keys: list[int], log: list | None, slot: int) -> tuple[int, int]:
        """Prefix hits (device, host), then cache the prompt; evictions demote device -> host -> gone."""
        device_hits = host_hits = 0
        for key in keys:
            if key in self.device:
                device_hits += 1
            elif key in self.host:
                host_hits += 1
            else:
                break
        self.requests += 1
        self.prefill_blocks += len(keys) - device_hits - host_hits
        promoted = [k for k in keys if k not in self.device]
        for key in keys:
            self.device[key] = None
            self.device.move_to_end(key)
            self.host.pop(key, None)
        demoted = []
        while len(self.device) > self.device_capacity:
            key, _ = self.device.popitem(last=False)
            self.host[key] = None
            demoted.append(key)
        dropped = []
        while len(self.host) > self.host_capacity:
            key, _ = self.host.popitem(last=False)
            dropped.append(key)
        if log is not None:
            if promoted:
                log.append(("store", slot, 0, promoted))
            if demoted:
                log.append(("remove", slot, 0, demoted))
                log.append(("store", slot, 1, demoted))
            if dropped:
                log.append(("remove", slot, 1, dropped))
        return device_hits, host_hits


def simulate(requests: list[Request], n_workers: int, policy: str, device_capacity: int, seed: int,
             log: list | None = None) -> dict:
    workers = [SimWorker(device_capacity, 4 * device_capacity) for _ in range(n_workers)]
    index = (NativeBlockIndex or PyBlockIndex)()
    chooser = Chooser(CostWeights(decode_weight=0.05))
    names = [str(i) for i in range(n_workers)]
    inflight: list[tuple[float, int, int]] = []
    loads = {n: WorkerLoad() for n in names}
    sticky: dict[int, int] = {}
    rr = itertools.cycle(range(n_workers))
    total = device = host = 0
    for req in tqdm(requests, desc=f"{policy:>10}", leave=False):
        while inflight and inflight[0][0] <= req.t:
            _, w, blocks = heapq.heappop(inflight)
            loads[names[w]].inflight -= 1
            loads[names[w]].active_blocks -= blocks
        if policy == "round-robin":
            choice = next(rr)
        elif policy == "sticky":
            if req.session not in sticky:
                sticky[req.session] = min(range(n_workers), key=lambda w: (loads[names[w]].inflight, workers[w].requests))
            choice = sticky[req.session]
        else:
            if log is not None:
                log.append(("find", req.keys))
            overlaps = {names[s]: Overlap(d, h, a) for s, d, h, a in index.find(req.keys)}
            choice = int(chooser.choose(len(req.keys), overlaps, loads, names, tie_key=req.keys[0]))
        sub_log: list = []
        d, h = workers[choice].serve(req.keys, sub_log, choice)
        for op, slot, medium, keys in sub_log:
            getattr(index, op)(slot, medium, keys)
        if log is not None:
            log.extend(sub_log)
        total += len(req.keys)
        device += d
        host += h
        loads[names[choice]].inflight += 1
        loads[names[choice]].active_blocks += len(req.keys)
        heapq.heappush(inflight, (req.end, choice, len(req.keys)))
    reqs = np.array([w.requests for w in workers], dtype=float)
    prefill = np.array([w.prefill_blocks for w in workers], dtype=float)
    return {"policy": policy, "hit_rate": (device + host) / total, "device_hit_rate": device / total,
            "requests_max_over_mean": float(reqs.max() / reqs.mean()), "requests_cv": float(reqs.std() / reqs.mean()),
            "prefill_max_over_mean": float(prefill.max() / max(prefill.mean(), 1e-9)),
            "requests_per_worker": reqs.astype(int).tolist()}


# --- index throughput ----------------------------------------------------------------------------------------
def replay(log: list, factory) -> tuple[float, int]:
    index = factory()
    store, remove, find = index.store, index.remove, index.find
    ops = 0
    started = time.perf_counter()
    for item in log:
        if item[0] == "find":
            find(item[1])
            ops += len(item[1])
        elif item[0] == "store":
            store(item[1], item[2], item[3])
            ops += len(item[3])
        else:
            remove(item[1], item[2], item[3])
            ops += len(item[3])
    return time.perf_counter() - started, ops


def event_path(n_blocks: int, block_size: int = 16) -> float:
    """Blocks per second through the full event path: msgpack batches -> decode -> re-hash -> index."""
    rng = np.random.default_rng(0)
    payloads = []
    for b in range(0, n_blocks, 32):
        tokens = rng.integers(0, 50_000, size=32 * block_size).tolist()
        payloads.append(encode_batch(KVEventBatch(ts=0.0, events=[BlockStored(
            block_hashes=list(range(b, b + 32)), parent_block_hash=None, token_ids=tokens, block_size=block_size,
            lora_id=None, medium="GPU", lora_name=None)])))
    indexer = KvIndexer(block_size)
    indexer.add_worker("w")
    started = time.perf_counter()
    for payload in payloads:
        indexer.apply_batch("w", decode_batch(payload))
    return len(payloads) * 32 / (time.perf_counter() - started)


def find_latency(factory, n_calls: int, n_workers: int = 8, prompt_blocks: int = 128) -> tuple[float, float]:
    """p50 / p99 microseconds of find() on 128-block prompts fully cached by one worker, partly by others."""
    rng = random.Random(1)
    index = factory()
    prompts = []
    for p in range(256):
        keys = [rng.getrandbits(64) for _ in range(prompt_blocks)]
        prompts.append(keys)
        index.store(p % n_workers, 0, keys)
        index.store((p + 1) % n_workers, 1, keys[: prompt_blocks // 2])
    for w in range(n_workers):  # background: 200k other blocks
        index.store(w, 2, [rng.getrandbits(64) for _ in range(25_000)])
    samples = np.empty(n_calls)
    clock = time.perf_counter_ns
    for i in range(n_calls):
        keys = prompts[i % len(prompts)]
        t0 = clock()
        index.find(keys)
        samples[i] = clock() - t0
    return float(np.percentile(samples, 50) / 1e3), float(np.percentile(samples, 99) / 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 sessions instead of 150, fewer latency samples")
    parser.add_argument("--json", help="write the headline figures here")
    parser.add_argument("--plot", help="write a PNG of the routing comparison here")
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_sessions, slots, calls = (24, 8, 20_000) if args.quick else (150, 32, 200_000)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; one core used; "
          f"native index: {'yes' if NativeBlockIndex else 'NOT BUILT (run: python setup.py build_ext --inplace)'}")
    print(f"trace: {SOURCE}; {n_sessions} sessions in {slots} concurrent slots, seed {args.seed}")
    requests = load_trace(Path(args.trace), n_sessions, slots, args.seed)
    unique = len({k for r in requests for k in r.keys})
    device_capacity = max(64, unique // (20 * args.workers))  # the whole fleet's devices hold 5% of the trace
    print(f"{len(requests)} requests, {sum(len(r.keys) for r in requests)} prompt blocks, {unique} unique; "
          f"{args.workers} workers, device LRU {device_capacity} blocks each, host LRU 4x that")

    log: list = []
    quality = [simulate(requests, args.workers, "kv-aware", device_capacity, args.seed, log)]
    quality += [simulate(requests, args.workers, p, device_capacity, args.seed) for p in ("sticky", "round-robin")]

    impls = [("native", NativeBlockIndex)] if NativeBlockIndex else []
    impls.append(("python", PyBlockIndex))
    throughput, event_throughput = {}, {}
    event_log = [item for item in log if item[0] != "find"]
    for name, factory in impls:
        seconds, ops = replay(log, factory)
        throughput[name] = ops / seconds
        seconds, ops = replay(event_log, factory)
        event_throughput[name] = ops / seconds
    latency = {name: find_latency(factory, calls if name == "native" else calls // 10) for name, factory in impls}
    events_per_s = event_path(20_000 if args.quick else 100_000)

    best = impls[0][0]
    print(f"\nIndex replay ({sum(len(i[-1]) for i in log)} block operations: stores, removals, find_matches lookups)")
    print("(a find_matches counts every block of its request, also those after the walk stopped at a miss)")
    print(f"{'index':<8} {'Mops/s/core':>12} {'vs target 7M':>13} {'stores+removes only':>20} {'find p50 us':>12} "
          f"{'find p99 us':>12} {'vs python':>10}")
    for name, _ in impls:
        p50, p99 = latency[name]
        print(f"{name:<8} {throughput[name] / 1e6:>12.2f} {throughput[name] / TARGET_OPS_PER_CORE:>12.2f}x "
              f"{event_throughput[name] / 1e6:>19.2f}M {p50:>12.2f} {p99:>12.2f} {throughput[name] / throughput['python']:>9.1f}x")
    print(f"full event path (decode + re-hash token ids + index): {events_per_s / 1e6:.3f} M blocks/s/core")
    print("reference: Dynamo's Rust flash indexer 170M ops/s on 24 cores (7.1M per core); target p99 < 10 us")

    print("\nRouting quality (prefix-rule block hits on the chosen worker)")
    print(f"{'policy':<12} {'hit rate':>9} {'device':>8} {'vs rr':>7} {'req max/mean':>13} {'req CV':>7} {'prefill max/mean':>17}")
    rr = next(q for q in quality if q["policy"] == "round-robin")
    for q in quality:
        print(f"{q['policy']:<12} {q['hit_rate']:>9.3f} {q['device_hit_rate']:>8.3f} {q['hit_rate'] / rr['hit_rate']:>6.2f}x "
              f"{q['requests_max_over_mean']:>13.2f} {q['requests_cv']:>7.2f} {q['prefill_max_over_mean']:>17.2f}")

    p50, p99 = latency[best]
    result = {"ops_per_s": throughput[best], "ops_per_s_per_core": throughput[best], "find_p50_us": p50,
              "find_p99_us": p99, "index": best, "python_ops_per_s": throughput["python"],
              "store_remove_ops_per_s": event_throughput[best], "python_store_remove_ops_per_s": event_throughput["python"],
              "python_find_p50_us": latency["python"][0], "python_find_p99_us": latency["python"][1],
              "event_path_blocks_per_s": events_per_s, "routing": quality, "trace": SOURCE,
              "sessions": n_sessions, "slots": slots, "workers": args.workers, "seed": args.seed}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        _plot(quality, args.plot)
    return 0


def _plot(quality: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [q["policy"] for q in quality]
    left.bar(names, [q["hit_rate"] for q in quality], label="any tier")
    left.bar(names, [q["device_hit_rate"] for q in quality], label="device")
    left.set_ylabel("prefix block hit rate")
    left.legend()
    for q in quality:
        right.plot(sorted(q["requests_per_worker"], reverse=True), marker="o", label=q["policy"])
    right.set_xlabel("worker (sorted)")
    right.set_ylabel("requests served")
    right.legend()
    fig.suptitle("kvtier router on the Weka agent trace")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
