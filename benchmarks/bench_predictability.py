"""How good must a next-call prediction be for an online policy to come near Belady, and how good can it be?

The agent policy ranks sessions by their predicted next call. This benchmark replays the Weka v8 traces with
that policy fed the *true* next-call time of each session times log-normal noise of spread sigma (an analysis
device, never a real policy: it reads the trace's future), next to LRU, Belady and the honest agent policy;
and it measures the log-error spread of the honest predictions (the gap after each response, by stop reason).
Where the honest spread sits on the noise curve says how much of the distance to Belady is missing information
rather than a missing idea. Prints a table, writes --json and a --plot PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kvtier.manager.policies import POLICIES, AgentAware  # noqa: E402
from kvtier.sim.replay import capacity_from_frac, replay  # noqa: E402
from kvtier.sim.trace import STOP_REASONS, Trace  # noqa: E402
from kvtier.sim.weka import load_weka  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"


def next_arrivals(trace: Trace) -> dict[int, list[float]]:
    """Per session, the arrival time of the call after each of its calls (inf after the last)."""
    out: dict[int, list[float]] = {}
    times = trace.times.tolist()
    for i, s in enumerate(trace.sessions.tolist()):
        out.setdefault(s, []).append(times[i])
    return {s: ts[1:] + [math.inf] for s, ts in out.items()}


def noisy_oracle(trace: Trace, sigma: float, seed: int = 0) -> type[AgentAware]:
    """The agent policy, told each session's next call up to a factor exp(N(0, sigma))."""
    upcoming = next_arrivals(trace)
    rng = np.random.default_rng(seed)

    class NoisyOracle(AgentAware):
        name = "agent-oracle"

        def __init__(self, capacity: int) -> None:
            super().__init__(capacity)
            self._calls: dict[int, int] = {}
            self._next: dict[int, float] = {}   # by id() of the policy's session record

        def begin_request(self, session, now, next_call_delay_s=None) -> None:
            super().begin_request(session, now, None)
            k = self._calls.get(session, 0)
            self._calls[session] = k + 1
            gap = upcoming[session][k] - now
            self._next[id(self._sessions[session])] = now + gap * math.exp(rng.normal(0.0, sigma)) if math.isfinite(gap) else math.inf

        def predicted_next_call(self, s, now: float) -> float:
            return self._next.get(id(s), math.inf)

    return NoisyOracle


def honest_log_error(trace: Trace) -> float:
    """Spread (sd of log(actual / predicted)) of the gap after a tool-use response, predicted as the agent
    policy does (running geometric mean of that session's earlier gaps after the same stop reason)."""
    last_end: dict[int, tuple[float, int]] = {}
    mean: dict[tuple[int, int], float] = {}
    errors = []
    times, ends, stops = trace.times.tolist(), trace.ends.tolist(), trace.stop_reasons.tolist()
    for i, s in enumerate(trace.sessions.tolist()):
        if s in last_end:
            end, stop = last_end[s]
            g = math.log(max(0.05, times[i] - end))
            if STOP_REASONS[stop] == "tool_use" and (s, stop) in mean:
                errors.append(g - mean[(s, stop)])
            mean[(s, stop)] = g if (s, stop) not in mean else 0.7 * mean[(s, stop)] + 0.3 * g
        last_end[s] = (ends[i], stops[i])
    return float(np.std(errors))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(SHARED / "weka_kvcachetester_v8_c9b3da5_traces.tar.xz"))
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frac", type=float, default=0.005)
    ap.add_argument("--sigmas", default="0,0.25,0.5,0.75,1.0,1.5")
    ap.add_argument("--json", default="benchmarks/results/bench_predictability.json")
    ap.add_argument("--plot", default="benchmarks/results/bench_predictability.png")
    args = ap.parse_args()
    trace = load_weka(args.trace, slots=args.slots, seed=args.seed)
    capacity = capacity_from_frac(trace, args.frac)
    sigmas = [float(x) for x in args.sigmas.split(",")]
    base = {}
    for policy in tqdm(("lru", "belady", "agent"), desc="baselines"):
        base[policy] = replay(trace, policy, capacity).hit_rate
    curve = []
    for sigma in tqdm(sigmas, desc="noisy oracle"):
        POLICIES["agent-oracle"] = noisy_oracle(trace, sigma, args.seed)
        try:
            curve.append((sigma, replay(trace, "agent-oracle", capacity).hit_rate))
        finally:
            del POLICIES["agent-oracle"]
    spread = honest_log_error(trace)
    print(f"Weka v8, {args.slots} slots, capacity {args.frac:.2%} = {capacity} blocks")
    print(f"{'predictor':>30} {'hit rate':>9} {'/ Belady':>9}")
    for name, rate in base.items():
        print(f"{name:>30} {rate:9.4f} {rate / base['belady']:9.3f}")
    for sigma, rate in curve:
        print(f"{f'true next call x e^N(0,{sigma})':>30} {rate:9.4f} {rate / base['belady']:9.3f}")
    print(f"honest prediction log-error spread (gap after tool use): {spread:.3f}")
    result = {"trace": trace.name, "capacity_blocks": capacity, "frac": args.frac, **{f"{k}_hit_rate": v for k, v
              in base.items()}, "noisy_oracle": [{"sigma": s, "hit_rate": r} for s, r in curve],
              "honest_log_error_sd": spread}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s for s, _ in curve], [r for _, r in curve], "o-", label="true next call with noise")
        for name, style in (("belady", "k--"), ("agent", "g:"), ("lru", "r:")):
            ax.axhline(base[name], color=style[0], linestyle=style[1:], label=name)
        ax.axvline(spread, color="gray", label=f"honest spread {spread:.2f}")
        ax.set_xlabel("log-error spread of next-call prediction (sigma)")
        ax.set_ylabel("prefix hit rate")
        ax.set_title(f"Weka v8, {args.slots} slots, {args.frac:.1%} capacity")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
