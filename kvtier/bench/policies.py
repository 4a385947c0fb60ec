"""Which eviction policy keeps the most prefix hits, and how fast is the manager?

Sweeps G1 capacities (fractions of each trace's unique blocks) over policies on the Weka v8 Claude Code
traces (N session slots, seeded placement) and the Mooncake control traces, next to LRU (the baseline) and
Belady's MIN (the offline bound), and measures the manager's block operations per second on one core.
Prints a table with ratios, writes --json and a --plot PNG.

Traces: callanjfox/kv-cache-tester@c9b3da5 (Apache-2.0); kvcache-ai/Mooncake FAST25-release (Apache-2.0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from kvtier.bench.common import machine_line, pyplot, shared_file, write_json
from kvtier.manager import TierSpec
from kvtier.sim.manager import ReplayManager
from kvtier.manager.policies import NextUseOracle
from kvtier.sim.cli import max_gap_arg
from kvtier.sim.mooncake import load_mooncake
from kvtier.sim.replay import capacity_from_frac, replay
from kvtier.sim.weka import DEFAULT_MAX_GAP_S, load_weka


def measure_ops(policy: str, requests: int = 2000, blocks: int = 2000, sessions: int = 32) -> dict[str, float]:
    """Block operations per second of ``Manager.access`` on one tier: agent-like requests that re-send a
    growing context (90% hits), capacity for a third of the working set so eviction runs constantly."""
    rng = np.random.default_rng(0)
    contexts = [list(range(s * 10_000_000, s * 10_000_000 + blocks - 200)) for s in range(sessions)]
    manager = ReplayManager([TierSpec("G1", sessions * blocks // 3)], policy=policy)
    reqs = []
    for i in range(requests):
        s = int(rng.integers(sessions))
        contexts[s].extend(range(contexts[s][-1] + 1, contexts[s][-1] + 1 + int(rng.integers(1, 20))))
        reqs.append((s, contexts[s][-blocks:] if len(contexts[s]) > blocks else list(contexts[s])))
    total = sum(len(r) for _, r in reqs)
    start = time.perf_counter()
    for t, (s, keys) in enumerate(reqs):
        manager.access(keys, session=s, now=float(t))
    wall = time.perf_counter() - start
    keys = reqs[-1][1]
    start = time.perf_counter()
    for _ in range(200):
        manager.lookup(keys)
    lookup_wall = time.perf_counter() - start
    return {"policy": policy, "access_block_ops_per_s": total / wall,
            "lookup_block_ops_per_s": 200 * len(keys) / lookup_wall}


def sweep(trace, name: str, policies: list[str], fracs: list[float], progress: bool) -> list[dict]:
    oracle = NextUseOracle(trace.keys, trace.offsets) if "belady" in policies else None
    rows = []
    for frac in fracs:
        cap = capacity_from_frac(trace, frac)
        results = {p: replay(trace, p, cap, oracle=oracle, progress=progress) for p in policies}
        for p, r in results.items():
            rows.append({"trace": name, "frac": frac, "capacity_blocks": cap, "policy": p, "hit_rate": r.hit_rate,
                         "vs_lru": r.hit_rate / results["lru"].hit_rate if results["lru"].hit_rate else None,
                         "vs_belady": r.hit_rate / results["belady"].hit_rate
                         if "belady" in results and results["belady"].hit_rate else None,
                         "wall_s": r.wall_s, "block_ops_per_s": r.block_ops_per_s})
            print(f"{name:<28} {100 * frac:>5.1f}% {cap:>8} {p:<8} {r.hit_rate:>7.4f} "
                  f"{rows[-1]['vs_lru'] or 0:>7.3f} {rows[-1]['vs_belady'] or 0:>8.3f} {r.wall_s:>7.1f}s", flush=True)
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="60 Weka sessions, capacities 1%% and 5%%")
    ap.add_argument("--weka", default=str(shared_file("traces/weka_kvcachetester_v8_c9b3da5_traces.tar.xz")),
                    help="the Weka kv-cache-tester trace (.tar.xz)")
    ap.add_argument("--mooncake", nargs="*", default=[str(shared_file("traces/mooncake_conversation_trace.jsonl")),
                                                      str(shared_file("traces/mooncake_synthetic_trace.jsonl"))],
                    help="Mooncake traces (.jsonl)")
    ap.add_argument("--slots", type=int, default=32, help="concurrent Weka session slots")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Weka session placement")
    ap.add_argument("--max-gap", type=max_gap_arg, default=DEFAULT_MAX_GAP_S,
                    help="cap on the gap between a Weka session's requests, seconds, or 'none' (recorded clock)")
    ap.add_argument("--max-sessions", type=int, default=None, help="subsample Weka sessions")
    ap.add_argument("--fracs", default="0.005,0.01,0.02,0.05", help="G1 capacities, fractions of unique blocks")
    ap.add_argument("--policies", default="agent,lru,lineage,s3fifo,arc,belady", help="policies to sweep")
    ap.add_argument("--skip-weka", action="store_true", help="only the Mooncake traces")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="write a PNG of hit rate against capacity per trace here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.max_sessions = args.max_sessions or 60
        args.fracs = "0.01,0.05"
    fracs = [float(x) for x in args.fracs.split(",")]
    policies = list(dict.fromkeys(["lru", "belady"] + args.policies.split(",")))
    print(f"{machine_line()}; one core used")
    ops = [measure_ops(p) for p in ("lru", "agent", "lineage")]
    print(f"{'policy':<8} {'access blocks/s':>16} {'lookup blocks/s':>16}")
    for o in ops:
        print(f"{o['policy']:<8} {o['access_block_ops_per_s']:>16,.0f} {o['lookup_block_ops_per_s']:>16,.0f}")
    print(f"{'trace':<28} {'cap':>6} {'blocks':>8} {'policy':<8} {'hit':>7} {'/LRU':>7} {'/Belady':>8} {'wall':>8}")
    rows: list[dict] = []
    traces = []
    if not args.skip_weka:
        t0 = time.perf_counter()
        weka = load_weka(args.weka, slots=args.slots, seed=args.seed, max_sessions=args.max_sessions,
                         max_gap=args.max_gap)
        print(f"weka: {weka.num_requests} requests, {weka.num_accesses} blocks, {weka.unique_blocks()} unique, "
              f"infinite-cache hit rate {weka.infinite_cache_hit_rate():.4f}, load {time.perf_counter() - t0:.1f}s")
        traces.append((f"weka-v8 {args.slots} slots gap<={args.max_gap}", weka))
    for path in args.mooncake:
        traces.append((Path(path).stem, load_mooncake(path)))
    for name, trace in traces:
        rows += sweep(trace, name, policies, fracs, not args.no_progress)
    write_json(args.json, {"machine": machine_line(), "ops": ops, "rows": rows, "slots": args.slots,
                           "seed": args.seed, "max_gap": args.max_gap})
    if args.plot:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4.5), squeeze=False)
        for ax, (name, _) in zip(axes[0], traces):
            for p in policies:
                pts = [(r["frac"], r["hit_rate"]) for r in rows if r["trace"] == name and r["policy"] == p]
                ax.plot([100 * f for f, _ in pts], [h for _, h in pts], marker="o", label=p,
                        linestyle="--" if p == "belady" else "-")
            ax.set_xscale("log")
            ax.set_xlabel("G1 capacity (% of unique blocks)")
            ax.set_ylabel("prefix hit rate")
            ax.set_title(name)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0

