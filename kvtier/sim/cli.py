"""``kvtier sim``: replay a trace through the block manager; the chosen policy next to LRU and Belady."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvtier.command_options import output_path, positive_int
from kvtier.errors import UsageError
from kvtier.manager.policies import POLICIES, NextUseOracle
from kvtier.sim.admission import ADMISSION_RULES
from kvtier.sim.replay import ReplayResult, capacity_from_frac, replay
from kvtier.sim.synthetic import REGIMES
from kvtier.sim.trace import Trace
from kvtier.sim.weka import DEFAULT_MAX_GAP_S

FORMATS = ("weka", "mooncake", "synthetic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", help="trace file (.tar.xz or directory for weka, .jsonl for mooncake)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="weka (agent sessions), mooncake (request traces) or synthetic (generated sessions)")
    parser.add_argument("--slots", type=positive_int, default=32, help="concurrent session slots (weka)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the session interleaving and the generator")
    parser.add_argument("--regime", default="agentic", choices=sorted(REGIMES), help="synthetic workload regime")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="keep the capture's consecutive duplicate requests (weka; dropped by default)")
    parser.add_argument("--half", type=int, choices=(0, 1), default=None,
                        help="replay one seeded half of the sessions (weka)")
    parser.add_argument("--max-gap", type=max_gap_arg, default=DEFAULT_MAX_GAP_S,
                        help="cap on the gap between a session's requests, seconds, or 'none' for the recorded "
                             "clock (weka; default 60, kv-cache-tester's --max-delay)")
    parser.add_argument("--policy", default="agent", choices=sorted(POLICIES),
                        help="the policy to replay; leaf-first LRU and Belady always run beside it")
    cap = parser.add_mutually_exclusive_group()
    cap.add_argument("--capacity-frac", type=fractions_arg,
                     help="G1 capacities as fractions (0, 1] of the trace's unique blocks, comma-separated "
                          "(default 0.01)")
    cap.add_argument("--capacity-blocks", type=blocks_arg, help="G1 capacities in blocks, comma-separated")
    parser.add_argument("--tiers", type=tiers_arg, default=(),
                        help="lower tiers as multiples of G1, e.g. '4,16' for G2, G3 (default: none)")
    parser.add_argument("--vllm-g1", action="store_true",
                        help="G1 is vLLM's own prefix cache (leaf-first LRU) and the policy orders G2, as under "
                             "the vLLM plug-in (needs --tiers)")
    parser.add_argument("--admission", choices=list(ADMISSION_RULES), default=None,
                        help="G3/G4 admission rule (default: the configuration's admission_min_hits)")
    parser.add_argument("--max-sessions", type=positive_int, default=None, help="replay only this many sessions (weka)")
    parser.add_argument("--json", dest="json_path", type=output_path, help="write the result as JSON here")
    parser.add_argument("--plot", type=output_path,
                        help="write a PNG of hit rate against the capacities asked for, per policy, here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def tiers_arg(text: str) -> tuple[float, ...]:
    try:
        multipliers = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects multiples of G1 like '4,16', got {text!r}") from None
    if any(not m > 0 for m in multipliers) or len(multipliers) > 3:
        raise argparse.ArgumentTypeError(f"expects up to 3 positive multiples (G2, G3, G4), got {text!r}")
    return multipliers


def fractions_arg(text: str) -> list[float]:
    """Capacity fractions, comma-separated: above 1 every policy would hold the whole trace and report the
    same rate."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expects fractions in (0, 1] of the trace's unique blocks like "
                                         f"'0.01' or '0.005,0.01,0.02', got {text!r}")
    return sorted(set(values))


def blocks_arg(text: str) -> list[int]:
    """Capacities in blocks, comma-separated."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expects positive block counts like '1000' or '1000,4000', got {text!r}")
    return sorted(set(values))


def max_gap_arg(text: str) -> float | None:
    """``--max-gap``: seconds, or ``none`` to replay the recorded clock."""
    if text.strip().lower() == "none":
        return None
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"max gap must be non-negative seconds or 'none', got {text!r}")
    return value


def load_trace(args: argparse.Namespace) -> Trace:
    fmt, path = args.format, args.trace
    if fmt == "synthetic":
        from kvtier.sim.synthetic import generate
        return generate(REGIMES[args.regime], seed=args.seed, regime=args.regime)
    if not path:
        raise ValueError(f"--trace is required for --format {fmt}")
    if not Path(path).exists():
        raise ValueError(f"trace not found: {path}")
    if fmt == "weka":
        from kvtier.sim.weka import load_weka
        return load_weka(path, slots=args.slots, seed=args.seed, max_sessions=args.max_sessions, max_gap=args.max_gap,
                         keep_duplicates=args.keep_duplicates, half=args.half, progress=not args.no_progress)
    from kvtier.sim.mooncake import load_mooncake
    return load_mooncake(path)


def run(args: argparse.Namespace) -> int:
    if args.vllm_g1 and not args.tiers:
        raise UsageError("--vllm-g1 needs a G2: give --tiers")
    try:
        trace = load_trace(args)
        if args.capacity_blocks is not None:
            capacities = args.capacity_blocks
        else:
            capacities = [capacity_from_frac(trace, f) for f in args.capacity_frac or [0.01]]
    except ValueError as exc:  # a missing or malformed trace
        raise UsageError(str(exc)) from None
    progress = not args.no_progress
    print(f"trace {trace.name}: {trace.num_requests} requests ({trace.dropped_duplicates} duplicates dropped), "
          f"{trace.num_accesses} blocks, {trace.unique_blocks()} unique, infinite cache "
          f"{trace.infinite_cache_hit_rate():.4f}; source: {trace.source}")
    oracle = NextUseOracle(trace.keys, trace.offsets)
    names = list(dict.fromkeys((args.policy, "lru", "belady")))
    results: dict[int, dict[str, ReplayResult]] = {}
    for capacity in capacities:
        results[capacity] = {name: replay(trace, name, capacity, oracle=oracle, progress=progress,
                                          tier_multipliers=args.tiers if name == args.policy != "belady" else (),
                                          admission=args.admission,
                                          vllm_g1=args.vllm_g1 and name == args.policy != "belady")
                           for name in names}
    print(f"{'capacity':>9} {'policy':<10} {'hit rate':>9} {'/LRU':>7} {'/Belady':>8}")
    for capacity, row in results.items():
        lru, belady = row["lru"].hit_rate, row["belady"].hit_rate
        for r in row.values():
            print(f"{capacity:>9} {r.policy:<10} {r.hit_rate:>9.4f} {_ratio(r.hit_rate, lru):>7.3f} "
                  f"{_ratio(r.hit_rate, belady):>8.3f}")
    if args.tiers and args.policy != "belady":
        print(f"{'capacity':>9} {'tier':<5} {'hit rate':>9} {'writes':>10} {'reads':>10} {'r:w':>7} {'evictions':>10} "
              f"{'demoted':>9}")
        for capacity, row in results.items():
            for name, t in row[args.policy].tiers.items():
                print(f"{capacity:>9} {name:<5} {t['hit_rate']:>9.4f} {t['writes']:>10} {t['reads']:>10} "
                      f"{t['read_write_ratio']:>7.2f} {t['evictions']:>10} {t['demotions_out']:>9}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "trace": trace.name, "source": trace.source, "policy": args.policy,
            "rows": [{"capacity_blocks": c, "policy": r.policy, "hit_rate": r.hit_rate, "tiers": r.tiers,
                      "wall_s": r.wall_s} for c, row in results.items() for r in row.values()]}, indent=2))
    if args.plot:
        from kvtier.sim.plot import plot_sweep
        unique = trace.unique_blocks()
        plot_sweep(args.plot, [c / unique for c in capacities],
                   {name: [results[c][name].hit_rate for c in capacities] for name in names}, title=trace.name)
    return 0


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
