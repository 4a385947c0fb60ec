"""``kvtier sim``: replay a trace through the block manager; the chosen policy next to LRU and Belady."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvtier.command_options import output_path, positive_int
from kvtier.errors import UsageError
from kvtier.manager.policies import POLICIES, NextUseOracle
from kvtier.sim.replay import capacity_from_frac, replay
from kvtier.sim.trace import Trace
from kvtier.sim.weka import DEFAULT_MAX_GAP_S

FORMATS = ("weka", "mooncake", "synthetic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", help="trace file (.tar.xz or directory for weka, .jsonl for mooncake)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="weka (agent sessions), mooncake (request traces) or synthetic (generated sessions)")
    parser.add_argument("--slots", type=positive_int, default=32, help="concurrent session slots (weka)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the session interleaving and the generator")
    parser.add_argument("--max-gap", type=max_gap_arg, default=DEFAULT_MAX_GAP_S,
                        help="cap on the gap between a session's requests, seconds, or 'none' for the recorded "
                             "clock (weka; default 60, kv-cache-tester's --max-delay)")
    parser.add_argument("--policy", default="agent", choices=sorted(POLICIES),
                        help="the policy to replay; LRU and Belady always run beside it")
    cap = parser.add_mutually_exclusive_group()
    cap.add_argument("--capacity-frac", type=capacity_frac_arg,
                     help="G1 capacity as a fraction (0, 1] of the trace's unique blocks (default 0.01)")
    cap.add_argument("--capacity-blocks", type=positive_int, help="G1 capacity in blocks")
    parser.add_argument("--tiers", type=tiers_arg, default=(),
                        help="lower tiers as multiples of G1, e.g. '4,16' for G2, G3 (default: none)")
    parser.add_argument("--max-sessions", type=positive_int, default=None, help="replay only this many sessions (weka)")
    parser.add_argument("--json", dest="json_path", type=output_path, help="write the result as JSON here")
    parser.add_argument("--plot", type=output_path, help="write a PNG of hit rate against capacity per policy here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def tiers_arg(text: str) -> tuple[float, ...]:
    try:
        multipliers = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects multiples of G1 like '4,16', got {text!r}") from None
    if any(not m > 0 for m in multipliers) or len(multipliers) > 3:
        raise argparse.ArgumentTypeError(f"expects up to 3 positive multiples (G2, G3, G4), got {text!r}")
    return multipliers


def capacity_frac_arg(text: str) -> float:
    """``--capacity-frac``: above 1 every policy would hold the whole trace and report the same rate."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expects a fraction in (0, 1] of the trace's unique blocks, got {text!r}")
    return value


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
        if args.capacity_blocks is not None:
            capacity = args.capacity_blocks
        else:
            capacity = capacity_from_frac(trace, args.capacity_frac if args.capacity_frac is not None else 0.01)
    except ValueError as exc:  # a missing or malformed trace
        raise UsageError(str(exc)) from None
    progress = not args.no_progress
    oracle = NextUseOracle(trace.keys, trace.offsets)
    chosen = replay(trace, args.policy, capacity, tier_multipliers=args.tiers if args.policy != "belady" else (),
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
