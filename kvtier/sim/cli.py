"""``kvtier sim``: replay a trace through the block manager; the chosen policy next to LRU and Belady."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvtier.manager.policies import POLICIES, NextUseOracle
from kvtier.sim.replay import capacity_from_frac, replay
from kvtier.sim.trace import Trace
from kvtier.sim.weka import DEFAULT_MAX_GAP_S

FORMATS = ("weka", "mooncake", "synthetic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", help="trace file (.tar.xz or directory for weka, .jsonl for mooncake)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--slots", type=int, default=32, help="concurrent session slots (weka)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-gap", type=max_gap_arg, default=DEFAULT_MAX_GAP_S,
                        help="cap on the gap between a session's requests, seconds, or 'none' for the recorded "
                             "clock (weka; default 60, kv-cache-tester's --max-delay)")
    parser.add_argument("--policy", default="agent", choices=sorted(POLICIES))
    cap = parser.add_mutually_exclusive_group()
    cap.add_argument("--capacity-frac", type=float, help="G1 capacity as a fraction of the trace's unique blocks")
    cap.add_argument("--capacity-blocks", type=int, help="G1 capacity in blocks")
    parser.add_argument("--tiers", default="", help="lower tiers as multiples of G1, e.g. '4,16' for G2, G3")
    parser.add_argument("--max-sessions", type=int, default=None, help="replay only this many sessions (weka)")
    parser.add_argument("--json", dest="json_path", help="write the result as JSON here")
    parser.add_argument("--plot", help="write a PNG of hit rate against capacity per policy here")
    parser.add_argument("--no-progress", action="store_true")


def max_gap_arg(text: str) -> float | None:
    """``--max-gap``: seconds, or ``none`` to replay the recorded clock."""
    if text.strip().lower() == "none":
        return None
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"max gap must be non-negative seconds or 'none', got {text!r}")
    return value


def load_trace(fmt: str, path: str | None, slots: int, seed: int, max_sessions: int | None = None,
               max_gap: float | None = DEFAULT_MAX_GAP_S) -> Trace:
    if fmt == "synthetic":
        from kvtier.sim.synthetic import generate
        return generate(seed=seed)
    if not path:
        raise ValueError(f"--trace is required for --format {fmt}")
    if not Path(path).exists():
        raise ValueError(f"trace not found: {path}")
    if fmt == "weka":
        from kvtier.sim.weka import load_weka
        return load_weka(path, slots=slots, seed=seed, max_sessions=max_sessions, max_gap=max_gap)
    from kvtier.sim.mooncake import load_mooncake
    return load_mooncake(path)



def run(args: argparse.Namespace) -> int:
    try:
        trace = load_trace(args.format, args.trace, args.slots, args.seed, args.max_sessions, args.max_gap)
        multipliers = [float(x) for x in args.tiers.split(",") if x.strip()]
        if args.capacity_blocks is not None:
            capacity = args.capacity_blocks
        else:
            capacity = capacity_from_frac(trace, args.capacity_frac if args.capacity_frac is not None else 0.01)
    except ValueError as exc:
        print(f"kvtier sim: {exc}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    oracle = NextUseOracle(trace.keys, trace.offsets)
    chosen = replay(trace, args.policy, capacity, tier_multipliers=multipliers if args.policy != "belady" else (),
                    oracle=oracle, progress=progress)
    lru = chosen if args.policy == "lru" else replay(trace, "lru", capacity, progress=progress)
    belady = chosen if args.policy == "belady" else replay(trace, "belady", capacity, oracle=oracle,
                                                           progress=progress)
    print(f"trace {trace.name}: {trace.num_requests} requests, {trace.num_accesses} blocks, "
          f"{trace.unique_blocks()} unique; source: {trace.source}")
    print(f"capacity {capacity} blocks; wall {chosen.wall_s:.1f}s ({chosen.block_ops_per_s / 1e6:.2f}M blocks/s)")
    print(f"{'policy':<10} {'hit rate':>9} {'/LRU':>7} {'/Belady':>8}")
    for r in (chosen, lru, belady) if args.policy not in ("lru", "belady") else (lru, belady):
        print(f"{r.policy:<10} {r.hit_rate:>9.4f} {_ratio(r.hit_rate, lru.hit_rate):>7.3f} "
              f"{_ratio(r.hit_rate, belady.hit_rate):>8.3f}")
    print(f"{'tier':<5} {'hit rate':>9} {'writes':>10} {'reads':>10} {'r:w':>7} {'evictions':>10} {'demoted':>9}")
    for name, t in chosen.tiers.items():
        print(f"{name:<5} {t['hit_rate']:>9.4f} {t['writes']:>10} {t['reads']:>10} {t['read_write_ratio']:>7.2f} "
              f"{t['evictions']:>10} {t['demotions_out']:>9}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "policy": args.policy, "capacity_blocks": capacity, "hit_rate": chosen.hit_rate,
            "lru_hit_rate": lru.hit_rate, "belady_hit_rate": belady.hit_rate, "tiers": chosen.tiers,
            "trace": trace.name, "source": trace.source, "wall_s": chosen.wall_s}, indent=2))
    if args.plot:
        from kvtier.sim.plot import plot_sweep
        fracs = (0.005, 0.01, 0.02, 0.05)
        caps = [capacity_from_frac(trace, f) for f in fracs]
        curves = {name: [replay(trace, name, c, oracle=oracle).hit_rate for c in caps]
                  for name in dict.fromkeys((args.policy, "lru", "belady"))}
        plot_sweep(args.plot, fracs, curves, title=trace.name)
    return 0


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
