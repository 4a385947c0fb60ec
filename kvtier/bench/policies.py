"""Which eviction policy keeps the most prefix hits on agent traffic, and at what cost in lower-tier writes?

Dev set (so that no policy is tuned to one trace): the Weka v8 Claude Code sessions split into two seeded
halves of their sessions (``v8-tune`` is what the default was developed on, ``v8-heldout`` is only reported),
both Mooncake traces (chat, the control case) and the synthetic generator's regimes (``kvtier.sim.synthetic``;
global hash ids with a shared system prompt and tools prefix). Every policy at every capacity on every trace
runs in its own process (``--jobs``), next to leaf-first LRU (the baseline: what vLLM's prefix cache does),
Belady's MIN (the offline bound) and the infinite cache. Cliff capacities are those where leaf-first LRU hits
less than half of what an infinite cache hits.

Per trace, as soon as its replays are done: a table (hit rate, x LRU, x Belady), ``--json``'s path with
``-<trace>`` before its suffix, and the same for ``--plot``'s PNG; ``--json`` itself holds every trace reported so
far, and ``<json>.rows.jsonl`` every finished replay (a rerun skips those: a long run can be resumed). Then, at
each trace's first cliff capacity with G2 = 4x and G3 = 16x G1, the blocks each policy writes into G2 and G3
and the reads per write (write once, read many; NVIDIA Dynamo reports 11.7 on agent traffic), and for the
default policy the G3 admission rules side by side (hits against G3 writes).

Traces: callanjfox/kv-cache-tester@c9b3da5 (Apache-2.0), and with ``--weka-more`` its other releases (v6 at
7647c82: ``git show 7647c82:traces/`` of that repository); kvcache-ai/Mooncake FAST25-release (Apache-2.0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvtier.bench.common import machine_line, print_table, shared_file, write_json
from kvtier.command_options import output_path, positive_int
from kvtier.errors import UsageError
from kvtier.manager import TierSpec
from kvtier.manager.policies import POLICIES, NextUseOracle
from kvtier.sim.admission import ADMISSION_RULES
from kvtier.sim.cli import fractions_arg, max_gap_arg
from kvtier.sim.manager import ReplayManager
from kvtier.sim.mooncake import load_mooncake
from kvtier.sim.plot import plot_sweep
from kvtier.sim.replay import capacity_from_frac, replay
from kvtier.sim.synthetic import REGIMES, generate
from kvtier.sim.trace import Trace
from kvtier.sim.weka import DEFAULT_MAX_GAP_S, load_weka, trace_label

BASELINE, BOUND, DEFAULT = "lru", "belady", "agent"
TIERS = (4.0, 16.0)   # G2, G3 as multiples of G1 for the write-amplification runs

_TRACES: dict[str, Trace] = {}            # filled before the worker processes fork
_ORACLES: dict[str, NextUseOracle] = {}   # built once per worker and trace


@dataclass(frozen=True)
class Job:
    trace: str
    policy: str
    frac: float
    tiers: tuple[float, ...] = ()
    admission: str = ""

    @property
    def cost(self) -> int:
        """Rough run time, to start the longest jobs first."""
        return _TRACES[self.trace].num_accesses * (3 if self.tiers else 1)


def measure_ops(policy: str, requests: int = 2000, blocks: int = 2000, sessions: int = 32) -> dict[str, float]:
    """Block operations per second of a whole-request replay on one tier: agent-like requests that re-send a
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
    return {"policy": policy, "access_block_ops_per_s": total / wall}


def run_job(job: Job) -> dict:
    trace = _TRACES[job.trace]
    oracle = None
    if job.policy == BOUND:
        oracle = _ORACLES.get(job.trace) or _ORACLES.setdefault(job.trace, NextUseOracle(trace.keys, trace.offsets))
    cap = capacity_from_frac(trace, job.frac)
    result = replay(trace, job.policy, cap, oracle=oracle, tier_multipliers=job.tiers,
                    admission=job.admission or None)
    row = {"trace": job.trace, "policy": job.policy, "frac": job.frac, "capacity_blocks": cap,
           "hit_rate": result.hit_rate, "wall_s": result.wall_s}
    if job.tiers:
        lower = [t for name, t in result.tiers.items() if name != "G1"]
        row.update(tiers=list(job.tiers), admission=job.admission,
                   any_tier_hit_rate=sum(t["hit_blocks"] for t in result.tiers.values()) / trace.num_accesses,
                   writes={name: t["writes"] for name, t in result.tiers.items()},
                   reads={name: t["reads"] for name, t in result.tiers.items()},
                   lower_tier_read_write_ratio=sum(t["reads"] for t in lower) / max(1, sum(t["writes"] for t in lower)))
    return row


def load_dev_set(args: argparse.Namespace) -> dict[str, Callable[[], Trace]]:
    """The traces by name, each loaded when asked for."""
    loaders: dict[str, Callable[[], Trace]] = {}
    if not args.skip_weka:
        for half, name in ((0, "v8-tune"), (1, "v8-heldout")):
            loaders[name] = lambda half=half: load_weka(args.weka, slots=args.slots, seed=args.seed, half=half,
                                                        max_sessions=args.max_sessions, max_gap=args.max_gap,
                                                        keep_duplicates=args.keep_duplicates,
                                                        progress=not args.no_progress)
    for path in args.weka_more:
        loaders[trace_label(path)] = lambda path=path: load_weka(path, slots=args.slots, seed=args.seed,
                                                                 max_gap=args.max_gap,
                                                                 keep_duplicates=args.keep_duplicates,
                                                                 progress=not args.no_progress)
    for path in args.mooncake:
        loaders[Path(path).stem] = lambda path=path: load_mooncake(path)
    for regime in args.regimes:
        loaders[f"synthetic-{regime}"] = lambda regime=regime: generate(REGIMES[regime], args.seed, regime)
    return loaders


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    help="60 Weka sessions per half, two synthetic regimes, capacities 1%% and 5%%")
    ap.add_argument("--weka", default=str(shared_file("traces/weka_kvcachetester_v8_c9b3da5_traces.tar.xz")),
                    help="the Weka kv-cache-tester trace (.tar.xz), split into a tuning and a held-out half")
    ap.add_argument("--weka-more", nargs="*", default=[], metavar="PATH",
                    help="other releases of the Weka traces (.tar.xz or a directory of trace_*.json), replayed "
                         "whole: e.g. kv-cache-tester's v6 set (commit 7647c82, global hash ids)")
    ap.add_argument("--mooncake", nargs="*", default=[str(shared_file("traces/mooncake_conversation_trace.jsonl")),
                                                      str(shared_file("traces/mooncake_synthetic_trace.jsonl"))],
                    help="Mooncake traces (.jsonl)")
    ap.add_argument("--regimes", type=regimes_arg, default=list(REGIMES),
                    help=f"synthetic regimes, comma-separated (default all: {','.join(REGIMES)}; '' for none)")
    ap.add_argument("--slots", type=positive_int, default=32, help="concurrent Weka session slots")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Weka placement and split, and the generator")
    ap.add_argument("--max-gap", type=max_gap_arg, default=DEFAULT_MAX_GAP_S,
                    help="cap on the gap between a Weka session's requests, seconds, or 'none' (recorded clock)")
    ap.add_argument("--max-sessions", type=positive_int, default=None, help="subsample each Weka half")
    ap.add_argument("--keep-duplicates", action="store_true", help="keep the Weka capture's duplicate requests")
    ap.add_argument("--fracs", type=fractions_arg, default=[0.005, 0.01, 0.02, 0.05, 0.1],
                    help="G1 capacities, fractions of each trace's unique blocks, comma-separated")
    ap.add_argument("--policies", type=policies_arg, default=["agent", "lru", "lru-root", "lirs", "arc", "s3fifo"],
                    help="online policies to sweep (leaf-first LRU and Belady always run)")
    ap.add_argument("--admission", type=admission_arg, default=list(ADMISSION_RULES),
                    help=f"G3 admission rules to compare for the default policy ({','.join(ADMISSION_RULES)})")
    ap.add_argument("--skip-weka", action="store_true", help="no Weka halves")
    ap.add_argument("--skip-tiers", action="store_true", help="no G2/G3 runs (writes per policy, admission rules)")
    ap.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                    help="parallel processes (default: the core count)")
    ap.add_argument("--json", type=output_path, help="write every trace's rows here, and each trace's beside it")
    ap.add_argument("--plot", type=output_path, help="write each trace's PNG beside this path (-<trace>.png)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def _choices(kind: str, known) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)}")
        return names
    return parse


regimes_arg = _choices("regime", REGIMES)
policies_arg = _choices("policy", [p for p in POLICIES if p != BOUND])
admission_arg = _choices("admission rule", ADMISSION_RULES)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.max_sessions = args.max_sessions or 60
        args.fracs = [0.01, 0.05]
        args.regimes = args.regimes[:2]
    policies = list(dict.fromkeys([DEFAULT, BASELINE, *args.policies, BOUND]))
    missing = [p for p in ([] if args.skip_weka else [args.weka]) + args.weka_more + args.mooncake
               if not Path(p).exists()]
    if missing:
        raise UsageError(f"trace not found: {', '.join(missing)}")
    print(f"{machine_line()}; {args.jobs} worker processes")
    for name, load in load_dev_set(args).items():
        t0 = time.perf_counter()
        _TRACES[name] = load()
        trace = _TRACES[name]
        print(f"{name}: {trace.name}; {trace.num_requests} requests ({trace.dropped_duplicates} duplicates "
              f"dropped), {trace.num_accesses} blocks, {trace.unique_blocks()} unique, loaded in "
              f"{time.perf_counter() - t0:.0f} s; source: {trace.source}", flush=True)
    sweep = _Sweep(args, policies)
    sweep.run([Job(t, p, f) for t in _TRACES for p in policies for f in args.fracs])
    if not args.skip_tiers:
        # write once, read many and G3 admission: at each trace's first cliff capacity (else its smallest)
        at = {name: (sweep.cliffs(name) or args.fracs)[:1][0] for name in _TRACES}
        tier_jobs = [Job(t, p, at[t], TIERS) for t in _TRACES for p in policies if p != BOUND]
        sweep.run(tier_jobs + [Job(t, DEFAULT, at[t], TIERS, rule) for t in _TRACES for rule in args.admission])
    return 0


class _Sweep:
    """The replays' rows as they finish. Each trace is reported (table, its JSON and PNG, the summary JSON)
    as soon as its replays of a phase are done, so an interrupted run keeps what it finished; every row is
    also appended to ``<json>.rows.jsonl``, and a rerun with the same ``--json`` and setup skips the replays found
    there (after changing a policy, delete its rows to replay it)."""

    def __init__(self, args: argparse.Namespace, policies: list[str]) -> None:
        self.args, self.policies = args, policies
        self.infinite = {name: t.infinite_cache_hit_rate() for name, t in _TRACES.items()}
        self.rows: list[dict] = []
        self.done: dict[Job, dict] = {}
        # what a row's figure depends on besides its job: rows of another setup are never reused
        self.setup = {k: getattr(args, k) for k in ("weka", "weka_more", "slots", "seed", "max_gap", "max_sessions",
                                                      "keep_duplicates")}
        self.checkpoint = Path(f"{args.json}.rows.jsonl") if args.json else None
        if self.checkpoint is not None and self.checkpoint.exists():
            for line in self.checkpoint.read_text().splitlines():
                row = json.loads(line)
                if row.get("setup") == self.setup:
                    self.done[_job_of(row)] = row
        self.summary = {"machine": machine_line(), "seed": args.seed, "slots": args.slots, "max_gap": args.max_gap,
                        "traces": {}, "ops": [measure_ops(p) for p in (BASELINE, DEFAULT)]}

    def cliffs(self, name: str) -> list[float]:
        return [f for f in self.args.fracs if _rate(self.rows, name, BASELINE, f) < 0.5 * self.infinite[name]]

    def run(self, jobs: list[Job]) -> None:
        left = {name: sum(j.trace == name for j in jobs) for name in _TRACES}
        todo = [j for j in jobs if j not in self.done]
        for job in jobs:
            if job in self.done:
                self._finished(job, self.done[job], left)
        for job, row in _run_all(todo, self.args):
            if self.checkpoint is not None:
                with self.checkpoint.open("a") as out:
                    out.write(json.dumps({**row, "setup": self.setup}) + "\n")
            self._finished(job, row, left)

    def _finished(self, job: Job, row: dict, left: dict[str, int]) -> None:
        self.rows.append({k: v for k, v in row.items() if k != "setup"})
        left[job.trace] -= 1
        if left[job.trace] == 0:
            self._report(job.trace, tiered=bool(job.tiers))

    def _report(self, name: str, tiered: bool) -> None:
        trace, args = _TRACES[name], self.args
        mine = [r for r in self.rows if r["trace"] == name and "tiers" not in r]
        for r in mine:
            r["vs_lru"] = r["hit_rate"] / max(1e-12, _rate(mine, name, BASELINE, r["frac"]))
            r["vs_belady"] = r["hit_rate"] / max(1e-12, _rate(mine, name, BOUND, r["frac"]))
        cliffs = self.cliffs(name)
        report = {"trace": trace.name, "source": trace.source, "infinite_cache_hit_rate": self.infinite[name],
                  "unique_blocks": trace.unique_blocks(), "cliff_fracs": cliffs, "rows": mine,
                  "tiers": [r for r in self.rows if r["trace"] == name and "tiers" in r],
                  "targets": _targets(mine, cliffs, self.policies)}
        self.summary["traces"][name] = report
        (_print_tiers if tiered else _print_trace)(name, report, self.policies, args.fracs)
        if args.json:
            write_json(_beside(args.json, name), report)
            write_json(args.json, self.summary)
        if args.plot and not tiered:
            plot_sweep(_beside(args.plot, name), args.fracs,
                       {p: [_rate(mine, name, p, f) for f in args.fracs] for p in self.policies},
                       title=f"{name} (infinite cache {self.infinite[name]:.3f})", cliffs=cliffs)


def _job_of(row: dict) -> Job:
    return Job(row["trace"], row["policy"], row["frac"], tuple(row.get("tiers", ())), row.get("admission", ""))


def _beside(path: str, trace: str) -> str:
    """``out/x.json`` -> ``out/x-<trace>.json``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', trace)}{p.suffix}"))


def _run_all(jobs: list[Job], args: argparse.Namespace) -> Iterator[tuple[Job, dict]]:
    """Each job with its row, as they finish (the longest started first)."""
    jobs = sorted(jobs, key=lambda j: j.cost, reverse=True)
    with tqdm(total=len(jobs), desc="replays", unit="replay", disable=args.no_progress) as bar:
        if args.jobs == 1:
            for job in jobs:
                yield job, run_job(job)
                bar.update()
            return
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
            futures = {pool.submit(run_job, job): job for job in jobs}
            for done in as_completed(futures):
                yield futures[done], done.result()
                bar.update()


def _rate(rows: list[dict], trace: str, policy: str, frac: float) -> float:
    """A single-tier replay's hit rate."""
    return next(r["hit_rate"] for r in rows
                if r["trace"] == trace and r["policy"] == policy and r["frac"] == frac and "tiers" not in r)


def _targets(rows: list[dict], cliffs: list[float], policies: list[str]) -> dict[str, bool]:
    """Issue 15's bars for the default policy on one trace."""
    def rate(p: str, f: float) -> float:
        return next(r["hit_rate"] for r in rows if r["policy"] == p and r["frac"] == f)
    others = [p for p in policies if p not in (DEFAULT, BOUND)]
    fracs = sorted({r["frac"] for r in rows})
    return {"cliff_0.8_of_belady": all(rate(DEFAULT, f) >= 0.8 * rate(BOUND, f) for f in cliffs),
            "cliff_beats_every_online": all(rate(DEFAULT, f) >= rate(p, f) for f in cliffs for p in others),
            "never_below_lru": all(rate(DEFAULT, f) >= rate(BASELINE, f) for f in fracs)}


def _print_trace(name: str, report: dict, policies: list[str], fracs: list[float]) -> None:
    rows = report["rows"]
    table = []
    for p in policies:
        line = {"policy": p}
        for f in fracs:
            r = next(r for r in rows if r["policy"] == p and r["frac"] == f)
            line[f"{100 * f:g}%"] = f"{r['hit_rate']:.4f} {r['vs_lru']:.2f}xL {r['vs_belady']:.2f}xB"
        table.append(line)
    cliffs = ", ".join(f"{100 * f:g}%" for f in report["cliff_fracs"]) or "none"
    print_table(table, ["policy", *[f"{100 * f:g}%" for f in fracs]],
                f"{name}: hit rate, x leaf-first LRU, x Belady (infinite cache {report['infinite_cache_hit_rate']:.4f}; "
                f"cliff capacities: {cliffs})")
    print("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in report["targets"].items()), flush=True)


def _print_tiers(name: str, report: dict, policies: list[str], fracs: list[float]) -> None:
    tiers = [{"policy": r["policy"] + (f" admit={r['admission']}" if r["admission"] else ""),
              "G1 hit": r["hit_rate"], "any-tier hit": r["any_tier_hit_rate"],
              "G2 writes": r["writes"].get("G2", 0), "G3 writes": r["writes"].get("G3", 0),
              "G2+G3 reads/write": r["lower_tier_read_write_ratio"]} for r in report["tiers"]]
    print_table(tiers, list(tiers[0]), f"{name}: G2 = {TIERS[0]:g}x, G3 = {TIERS[1]:g}x G1 at "
                                       f"{100 * report['tiers'][0]['frac']:g}%")
