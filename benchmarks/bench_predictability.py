"""How sharp must a next-call prediction be for an online policy to come near Belady, and how sharp can one be?

The agent policy ranks sessions by when each is predicted to call next. This benchmark replays Weka traces
(v8's halves as ``kvtier bench policies`` splits them, and any ``--weka-more`` release) with that policy told
each session's *true* next call times log-normal noise of spread sigma (an analysis device that reads the
trace's future, never a policy), beside leaf-first LRU, Belady and the honest agent policy, at the cliff
capacities. Then it measures how sharp a prediction from what a server sees can be: the log-error spread of
the gap after a tool-use response, predicted as the agent policy does (each session's running geometric mean)
and by a least-squares fit over everything the trace shows at that response's end (the session's history,
its previous gap, the response's duration, request size and growth, reasoning length, call count), fitted on the
very gaps it predicts: an optimistic bound for any online predictor. The oracle also runs at that fitted spread.
Where the fitted spread sits on the noise curve is the most an online policy of this structure can expect.

Prints a table per trace, writes ``--json`` and a ``--plot`` PNG; replays run in ``--jobs`` processes.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kvtier.bench.common import machine_line, print_table, pyplot, shared_file, write_json  # noqa: E402
from kvtier.command_options import output_path, positive_int  # noqa: E402
from kvtier.manager.policies import POLICIES, AgentAware, NextUseOracle  # noqa: E402
from kvtier.sim.cli import fractions_arg, max_gap_arg  # noqa: E402
from kvtier.sim.replay import capacity_from_frac, replay  # noqa: E402
from kvtier.sim.trace import STOP_REASONS, Trace  # noqa: E402
from kvtier.sim.weka import DEFAULT_MAX_GAP_S, load_weka, trace_label  # noqa: E402

BASELINES = ("lru", "agent", "belady")
ORACLE = "agent-oracle"
_TRACES: dict[str, Trace] = {}   # filled before the worker processes fork


@dataclass(frozen=True)
class Job:
    trace: str
    policy: str
    frac: float
    sigma: float | None = None   # the noisy oracle's spread; None for the baselines

    @property
    def label(self) -> str:
        return self.policy if self.sigma is None else f"true next call x e^N(0,{self.sigma:.2f})"


def next_arrivals(trace: Trace) -> dict[int, list[float]]:
    """Per session, the arrival time of the call after each of its calls (inf after the last)."""
    out: dict[int, list[float]] = {}
    for s, t in zip(trace.sessions.tolist(), trace.times.tolist()):
        out.setdefault(s, []).append(t)
    return {s: ts[1:] + [math.inf] for s, ts in out.items()}


def noisy_oracle(trace: Trace, sigma: float, seed: int = 0) -> type[AgentAware]:
    """The agent policy, told each session's next call up to a factor exp(N(0, sigma))."""
    upcoming = next_arrivals(trace)
    rng = np.random.default_rng(seed)

    class NoisyOracle(AgentAware):
        name = ORACLE

        def __init__(self, capacity: int) -> None:
            super().__init__(capacity)
            self._calls: dict[int, int] = {}
            self._next: dict[int, float] = {}   # by id() of the policy's session record

        def begin_request(self, session, now, next_call_delay_s=None) -> None:
            super().begin_request(session, now, None)
            k = self._calls.get(session, 0)
            self._calls[session] = k + 1
            gap = upcoming[session][k] - now
            self._next[id(self._sessions[session])] = \
                now + gap * math.exp(rng.normal(0.0, sigma)) if math.isfinite(gap) else math.inf

        def predicted_next_call(self, s, now: float) -> float:
            return self._next.get(id(s), math.inf)

    return NoisyOracle


def gap_spreads(trace: Trace) -> dict[str, float]:
    """Log-error spread of the gap from a tool-use response's end to the session's next call, predicted by the
    agent policy's running geometric mean, and by an in-sample least-squares fit over what a server sees."""
    times, ends, stops = trace.times.tolist(), trace.ends.tolist(), trace.stop_reasons.tolist()
    sizes = np.diff(trace.offsets).tolist()
    tails = trace.ephemeral_tail.tolist() if trace.ephemeral_tail is not None else [0] * len(sizes)
    tool_use = STOP_REASONS.index("tool_use")
    state: dict[int, dict] = {}   # per session: its previous request and its gap history
    features, targets, ema_errors = [], [], []
    for i, s in enumerate(trace.sessions.tolist()):
        st = state.setdefault(s, {"prev": None, "ema": None, "last_gap": None, "calls": 0, "size": 0})
        j = st["prev"]
        if j is not None and stops[j] == tool_use:
            gap = math.log(max(0.05, times[i] - ends[j]))
            ema, last = st["ema"], st["last_gap"]
            if ema is not None:
                ema_errors.append(gap - ema)
            features.append([1.0, ema if ema is not None else 0.0, float(ema is None),
                             last if last is not None else 0.0, float(last is None),
                             math.log(max(0.05, ends[j] - times[j])), math.log1p(sizes[j]),
                             math.log1p(max(0, sizes[j] - st["size"])), math.log1p(tails[j]),
                             math.log1p(st["calls"])])
            targets.append(gap)
            st["ema"] = gap if ema is None else 0.7 * ema + 0.3 * gap   # the agent policy's weight
            st["last_gap"] = gap
        st["size"] = sizes[j] if j is not None else 0
        st["prev"], st["calls"] = i, st["calls"] + 1
    if not targets:
        return {"gaps": 0, "gap_sd": None, "agent_ema_sd": None, "fit_sd": None}
    x, y = np.asarray(features), np.asarray(targets)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"gaps": len(y), "gap_sd": float(np.std(y)),
            "agent_ema_sd": float(np.std(ema_errors)) if ema_errors else None,
            "fit_sd": float(np.std(y - x @ coef))}


def _fitted(spread: dict) -> list[float]:
    """The fitted predictor's spread as one more noise level for the oracle (none without tool-use gaps)."""
    return [] if spread["fit_sd"] is None else [round(spread["fit_sd"], 2)]


def _sd(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_job(job: Job, seed: int) -> float:
    trace = _TRACES[job.trace]
    cap = capacity_from_frac(trace, job.frac)
    if job.policy == "belady":
        return replay(trace, "belady", cap, oracle=NextUseOracle(trace.keys, trace.offsets)).hit_rate
    if job.sigma is None:
        return replay(trace, job.policy, cap).hit_rate
    POLICIES[ORACLE] = noisy_oracle(trace, job.sigma, seed)   # in this worker process only
    try:
        return replay(trace, ORACLE, cap).hit_rate
    finally:
        del POLICIES[ORACLE]


def run_all(jobs: list[Job], args: argparse.Namespace) -> Iterator[tuple[Job, float]]:
    with tqdm(total=len(jobs), desc="replays", unit="replay", disable=args.no_progress) as bar:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
            futures = {pool.submit(run_job, job, args.seed): job for job in jobs}
            for done in as_completed(futures):
                yield futures[done], done.result()
                bar.update()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weka", default=str(shared_file("traces/weka_kvcachetester_v8_c9b3da5_traces.tar.xz")),
                    help="the Weka v8 trace, split into halves as `kvtier bench policies` does")
    ap.add_argument("--halves", default="0", help="which v8 halves to replay: 0 (v8-tune), 1 (v8-heldout), "
                                                  "'0,1', or '' for none")
    ap.add_argument("--weka-more", nargs="*", default=[], metavar="PATH", help="other Weka releases, replayed whole")
    ap.add_argument("--fracs", type=fractions_arg, default=[0.005, 0.01, 0.02], help="G1 capacities")
    ap.add_argument("--sigmas", default="0,0.5,1.0", help="noise spreads of the oracle (the fitted spread is added)")
    ap.add_argument("--slots", type=positive_int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-gap", type=max_gap_arg, default=DEFAULT_MAX_GAP_S)
    ap.add_argument("--jobs", type=positive_int, default=2)
    ap.add_argument("--json", type=output_path, default="benchmarks/results/bench_predictability.json")
    ap.add_argument("--plot", type=output_path, default="benchmarks/results/bench_predictability.png")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        halves = [int(h) for h in args.halves.split(",") if h.strip()]
        sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]
        if any(h not in (0, 1) for h in halves) or any(not s >= 0 for s in sigmas):
            raise ValueError
    except ValueError:
        ap.error("--halves takes 0 and/or 1, --sigmas non-negative numbers, comma-separated")
    missing = [p for p in ([args.weka] if halves else []) + args.weka_more if not Path(p).exists()]
    if missing:
        ap.error(f"trace not found: {', '.join(missing)}")

    print(machine_line())
    for half in halves:
        _TRACES[("v8-tune", "v8-heldout")[half]] = load_weka(args.weka, slots=args.slots, seed=args.seed, half=half,
                                                             max_gap=args.max_gap, progress=not args.no_progress)
    for path in args.weka_more:
        _TRACES[trace_label(path)] = load_weka(path, slots=args.slots, seed=args.seed, max_gap=args.max_gap,
                                               progress=not args.no_progress)
    spreads = {name: gap_spreads(trace) for name, trace in _TRACES.items()}
    jobs = [Job(name, p, f) for name in _TRACES for p in BASELINES for f in args.fracs]
    jobs += [Job(name, ORACLE, f, s) for name in _TRACES for f in args.fracs
             for s in sorted({*sigmas, *_fitted(spreads[name])})]
    rates: dict[Job, float] = dict(run_all(jobs, args))

    report = {"machine": machine_line(), "slots": args.slots, "seed": args.seed, "max_gap": args.max_gap,
              "traces": {}}
    for name, trace in _TRACES.items():
        mine = [j for j in jobs if j.trace == name]
        bound = {f: rates[Job(name, "belady", f)] for f in args.fracs}
        rows, table = [], []
        for label in dict.fromkeys(j.label for j in mine):
            line = {"predictor": label}
            for j in (j for j in mine if j.label == label):
                rows.append({"policy": j.policy, "sigma": j.sigma, "frac": j.frac, "hit_rate": rates[j],
                             "vs_belady": rates[j] / bound[j.frac]})
                line[f"{100 * j.frac:g}%"] = f"{rates[j]:.4f} ({rates[j] / bound[j.frac]:.2f}xB)"
            table.append(line)
        sp = spreads[name]
        print_table(table, ["predictor", *[f"{100 * f:g}%" for f in args.fracs]], f"{name}: hit rate (x Belady)")
        print(f"{name}: gap after a tool-use response, log sd {_sd(sp['gap_sd'])} over {sp['gaps']} gaps; "
              f"log-error sd of the agent policy's prediction {_sd(sp['agent_ema_sd'])}, of an in-sample fit "
              f"over what a server sees {_sd(sp['fit_sd'])}", flush=True)
        report["traces"][name] = {"trace": trace.name, "source": trace.source, "rows": rows, "spreads": sp}
    write_json(args.json, report)
    if args.plot:
        plot(args.plot, report, args.fracs)
    return 0


def plot(path: str, report: dict, fracs: list[float]) -> None:
    plt = pyplot()
    names = list(report["traces"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        data = report["traces"][name]
        for k, f in enumerate(fracs):
            color = f"C{k}"
            curve = sorted((r["sigma"], r["vs_belady"]) for r in data["rows"] if r["sigma"] is not None
                           and r["frac"] == f)
            ax.plot(*zip(*curve), "o-", color=color, label=f"oracle + noise, {100 * f:g}%")
            agent = next(r["vs_belady"] for r in data["rows"] if r["policy"] == "agent" and r["frac"] == f)
            ax.axhline(agent, color=color, linestyle=":", label=f"agent policy, {100 * f:g}%")
        if data["spreads"]["fit_sd"] is not None:
            ax.axvline(data["spreads"]["fit_sd"], color="gray", label="fitted predictor's spread")
        ax.axhline(0.8, color="black", linestyle="--", linewidth=0.8, label="0.8 of Belady")
        ax.set_xlabel("log-error spread of the next-call prediction (sigma)")
        ax.set_ylabel("hit rate / Belady")
        ax.set_ylim(0, 1.05)
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
