"""Agent sessions through real vLLM servers (vLLM 0.32's CPU build): vLLM alone, vLLM + kvtier and the limit, one run.

Sessions are shaped by the Weka v8 trace (real Claude Code sessions, callanjfox/kv-cache-tester@c9b3da5,
Apache-2.0, in ../shared/traces): each keeps its recorded context growth and tool-call gaps, scaled so the
longest context fits the model and gaps stay short; every session starts with the same system prompt and tool
definitions. Each session is driven through an official SDK as an agent client drives it, with no kvtier-specific
field: ``--protocol chat`` sends OpenAI chat with ``prompt_cache_key`` (the ``openai`` SDK); ``--protocol messages``
sends what Claude Code sends (the ``anthropic`` SDK, ``cache_control`` breakpoints on the system prompt, the tools
and the latest block, a ``x-claude-code-session-id`` header). Configurations of two workers each:
  (a)     vLLM alone, requests spread round robin by the client;
  (b)     vLLM alone behind ``kvtier router`` (KV-aware, fed by the workers' KV events);
  (c)     vLLM + kvtier (G2 + G3, the agent policy) behind ``kvtier router``, which derives the agent hints;
  (c-lru) the same with ``policy: lru`` and the router deriving nothing (``--no-derive-hints``): a plain LRU offload;
  (d)     the limit: vLLM alone whose own KV cache holds every session, behind ``kvtier router``.
``--cliff F`` sizes kvtier's tiers to hold only F of the working set (G2 alone, no disk), and runs every session at
once, so that what kvtier keeps decides the hits.

Per configuration: requests/s, prompt tokens/s, TTFT p50/p99, the fraction of prompt tokens served from cache
(vLLM's own G1, kvtier's G2/G3, from the workers' /metrics) beside its ceiling (what an unbounded cache would
serve: each call's previous prompt, and the shared system prompt and tools), recomputed tokens, ratios to (a) and
to the limit (d). Prints a table, writes --json and --plot.

    kvtier bench serving [--quick] [--protocol chat|messages] [--cliff F] [--json out.json] [--plot out.png]
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
from kvtier.command_options import byte_size, fraction, non_negative_float, output_path, positive_int
from kvtier.errors import UsageError
from kvtier.testing.agent_session import TOOLS, words
from kvtier.testing.vllm_server import VllmServer, free_port, kvtier_transfer_config, start_router, vllm_cpu_python

TRACE = shared_file("traces/weka_kvcachetester_v8_c9b3da5_traces.tar.xz")
BLOCK = 128  # vLLM's CPU backend
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
BREAKPOINT = {"type": "ephemeral"}


@dataclass(frozen=True)
class Config:
    key: str
    name: str
    kvtier: bool = False
    routed: bool = True
    policy: str = "agent"
    derive_hints: bool = True
    limit: bool = False


CONFIGS = {c.key: c for c in (
    Config("a", "(a) vLLM alone, round robin", routed=False),
    Config("b", "(b) vLLM alone, kvtier router"),
    Config("c", "(c) vLLM + kvtier, kvtier router", kvtier=True),
    Config("c-lru", "(c-lru) vLLM + kvtier lru, no hints", kvtier=True, policy="lru", derive_hints=False),
    Config("d", "(d) limit: vLLM holding every session", limit=True),
)}


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
class Turn:
    """One tool round trip the script appends: the assistant's call and the tool's result."""

    call_id: str
    arguments: dict
    result: str


@dataclass
class ShapedSession:
    """A conversation whose prompt grows to each call's scaled context: one shared system prompt and tools, a
    task, then tool results sized to the trace (about one token per word). The script decides what is appended, so
    every configuration is sent the same prompts."""

    index: int
    shape: Shape
    system: str
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.index)
        self.task = f"task {self.index}"
        self.size = len(self.system.split()) + 700  # tool definitions are about 700 tokens

    def grow(self, call: int) -> None:
        if call > 0:
            grow = max(16, self.shape.contexts[call] - self.size)
            self.turns.append(Turn(f"toolu_{self.index:02d}{call:03d}", {"path": "src/x.py"}, words(self.rng, grow)))
            self.size += grow + 20

    def chat(self) -> dict:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": self.task}]
        for t in self.turns:
            messages.append({"role": "assistant", "content": "", "tool_calls": [{
                "id": t.call_id, "type": "function",
                "function": {"name": "bash", "arguments": json.dumps(t.arguments)}}]})
            messages.append({"role": "tool", "tool_call_id": t.call_id, "content": t.result})
        return {"messages": messages, "tools": TOOLS, "tool_choice": "none"}

    def messages(self) -> dict:
        """The same conversation as Claude Code sends it: breakpoints on the system prompt, the tools and the
        latest block."""
        messages: list[dict] = [{"role": "user", "content": [{"type": "text", "text": self.task}]}]
        for t in self.turns:
            messages.append({"role": "assistant", "content": [
                {"type": "tool_use", "id": t.call_id, "name": "bash", "input": t.arguments}]})
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": t.call_id, "content": t.result}]})
        messages[-1]["content"][-1] = {**messages[-1]["content"][-1], "cache_control": BREAKPOINT}
        tools = [*ANTHROPIC_TOOLS[:-1], {**ANTHROPIC_TOOLS[-1], "cache_control": BREAKPOINT}]
        return {"system": [{"type": "text", "text": self.system, "cache_control": BREAKPOINT}], "tools": tools,
                "messages": messages, "tool_choice": {"type": "none"}}


@dataclass
class Result:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    text: str


def call_chat(url: str, session: ShapedSession, max_tokens: int) -> Result:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    start = time.perf_counter()
    ttft, text, usage = None, [], None
    for chunk in client.chat.completions.create(model="tiny", max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                prompt_cache_key=f"agent-{session.index}", **session.chat()):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    details = usage.prompt_tokens_details
    return Result(ttft or time.perf_counter() - start, usage.prompt_tokens,
                  (details.cached_tokens or 0) if details else 0, "".join(text))


def call_messages(url: str, session: ShapedSession, max_tokens: int) -> Result:
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=900,
                                 default_headers={"x-claude-code-session-id": f"claude-code-{session.index}"})
    start = time.perf_counter()
    ttft, text, usage = None, [], None
    for event in client.messages.create(model="tiny", max_tokens=max_tokens, stream=True,
                                        extra_body={"temperature": 0}, **session.messages()):
        if event.type == "message_start":
            usage = event.message.usage
        elif event.type == "content_block_delta" and getattr(event.delta, "text", None):
            ttft = ttft or time.perf_counter() - start
            text.append(event.delta.text)
        elif event.type == "message_delta" and event.usage.cache_read_input_tokens is not None:
            usage = event.usage
    cached = usage.cache_read_input_tokens or 0   # Anthropic's input_tokens leave out what was read or written
    prompt = (usage.input_tokens or 0) + cached + (usage.cache_creation_input_tokens or 0)
    return Result(ttft or time.perf_counter() - start, prompt, cached, "".join(text))


CALLS = {"chat": call_chat, "messages": call_messages}


def engine_steps(server: VllmServer) -> float:
    """The engine steps that scheduled tokens so far (vLLM's ``iteration_tokens`` histogram)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in server.metrics().splitlines()
               if line.startswith("vllm:iteration_tokens_total_count"))


def kvtier_counters(server: VllmServer) -> dict[str, float]:
    """kvtier's counters on a worker's /metrics, by series and labels (engine labels left out):
    ``{"loaded_tokens{tier=G2}": 1024.0, "refused_store_chunks{reason=policy}": 3.0, ...}``."""
    out: dict[str, float] = {}
    for line in server.metrics().splitlines():
        if not line.startswith("vllm:kvtier_") or "_total{" not in line:
            continue
        head, value = line.rsplit(" ", 1)
        name, labels = head[len("vllm:kvtier_"):].split("_total{", 1)
        kept = ",".join(p.replace('"', "") for p in labels.rstrip("}").split(",")
                        if p and not p.startswith(("engine=", "model_name=")))
        key = f"{name}{{{kept}}}"
        out[key] = out.get(key, 0.0) + float(value)
    return out


@dataclass
class Plan:
    """What every configuration of one run shares."""

    shapes: list[Shape]
    system: str
    model: Path
    workdir: Path
    block_bytes: int
    concurrency: int
    kv_blocks: int           # each worker's own KV cache, in blocks (the limit's: enough for every session)
    limit_kv_blocks: int
    host_capacity_bytes: int  # kvtier's G2 per worker
    disk: bool               # a disk tier below G2

    @property
    def working_set_blocks(self) -> int:
        return sum(-(-max(s.contexts) // BLOCK) for s in self.shapes)


def worker_config(config: Config, plan: Plan, name: str) -> dict | None:
    if not config.kvtier:
        return None
    disk = {"disk_path": str(plan.workdir / f"{name}-disk"), "disk_capacity_bytes": "4GiB"} if plan.disk else {}
    return kvtier_transfer_config(host_capacity_bytes=plan.host_capacity_bytes, blocks_per_chunk=1, policy=config.policy,
                                  **disk)


def run_config(config: Config, args: argparse.Namespace, plan: Plan) -> dict:
    blocks = plan.limit_kv_blocks if config.limit else plan.kv_blocks
    space = max(1, -(-blocks * plan.block_bytes // 2**30))
    workers = [VllmServer(plan.model, worker_config(config, plan, f"{config.key}{i}"), events_port=free_port(),
                          kv_cache_blocks=blocks, kv_cache_space_gib=space, max_model_len=args.max_context + 512,
                          dtype=args.dtype,
                          log_path=plan.workdir / f"{config.key}-w{i}.log") for i in range(2)]
    router = None
    call = CALLS[args.protocol]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda w: w.start(), workers))
        url = None
        if config.routed:
            router, url = start_router(workers, plan.model, plan.workdir / f"{config.key}-router.log", BLOCK,
                                       extra_args=[] if config.derive_hints else ["--no-derive-hints"])
        sessions = [ShapedSession(i, s, plan.system) for i, s in enumerate(plan.shapes)]
        shared_tokens = len(workers[0].post("/tokenize", {"model": "tiny", "tools": TOOLS, "add_generation_prompt": False,
                                                          "messages": sessions[0].chat()["messages"][:1]})["tokens"])
        results: dict[tuple[int, int], Result] = {}
        lock = threading.Lock()
        rr = iter(range(10**9))
        bar = tqdm(total=sum(len(s.contexts) for s in plan.shapes), desc=config.key, unit="call", leave=False)

        def drive(session: ShapedSession) -> None:
            for c, gap in enumerate(session.shape.gaps):
                time.sleep(gap)
                session.grow(c)
                r = call(url or workers[next(rr) % 2].url, session, args.max_tokens)
                with lock:
                    results[(session.index, c)] = r
                    bar.update()

        cpu_before = [w.cpu_seconds() for w in workers]
        start = time.perf_counter()
        with ThreadPoolExecutor(plan.concurrency) as pool:
            list(pool.map(drive, sessions))
        wall = time.perf_counter() - start
        cpu = sum(w.cpu_seconds() for w in workers) - sum(cpu_before)
        steps = sum(engine_steps(w) for w in workers)
        bar.close()
        counters: dict[str, float] = {}
        for w in workers:
            for key, v in (kvtier_counters(w) if config.kvtier else {}).items():
                counters[key] = counters.get(key, 0.0) + v
        tiers = {key.split("tier=")[1].rstrip("}"): v for key, v in counters.items() if key.startswith("loaded_tokens")}
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
    return {"key": config.key, "name": config.name, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "prompt_tokens_per_s": prompt / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "cached_token_frac": cached / prompt, "ceiling_cached_token_frac": ideal / prompt,
            "recomputed_tokens": prompt - cached, "prompt_tokens": prompt, "kv_cache_blocks": blocks,
            "worker_cpu_s": cpu, "engine_steps": steps,
            "tier_tokens": {"G1": cached - sum(tiers.values()), **tiers}, "kvtier_counters": counters,
            "texts": {f"{s}:{c}": r.text for (s, c), r in sorted(results.items())}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the 2-layer tiny model (per-step overhead dominates, "
                   "not prefill): a few minutes, for checking the set-up")
    p.add_argument("--protocol", choices=sorted(CALLS), default="chat",
                   help="chat: OpenAI chat with prompt_cache_key (openai SDK); messages: what Claude Code sends "
                        "(anthropic SDK, cache_control breakpoints, a session header)")
    p.add_argument("--configs", default=",".join(CONFIGS), type=configs_arg,
                   help=f"which configurations to run, comma-separated (default all: {','.join(CONFIGS)})")
    p.add_argument("--cliff", type=fraction, help="kvtier's tiers hold only this fraction of the working set "
                   "(G2 alone), and every session runs at once")
    p.add_argument("--sessions", type=positive_int, help="Weka sessions replayed (default 12, --quick 10)")
    p.add_argument("--concurrency", type=positive_int, help="sessions at once (default 4, --quick 2; with --cliff all)")
    p.add_argument("--max-calls", type=positive_int, default=8, help="calls per session (from the trace's first ones)")
    p.add_argument("--max-context", type=positive_int, default=6000, help="the longest scaled context, in tokens")
    p.add_argument("--max-tokens", type=positive_int, default=16, help="output tokens per call")
    p.add_argument("--gap-scale", type=non_negative_float, default=0.01, help="recorded tool-call gaps (capped at 60 s) x this")
    p.add_argument("--kv-blocks", type=positive_int, help="each worker's vLLM KV cache, in 128-token blocks (default: "
                   "the fewest that hold one longest request; the limit (d) always holds every session)")
    p.add_argument("--host-capacity", type=byte_size, default="128MiB", help="kvtier G2 per worker (below it, a disk tier); "
                   "--cliff sets it instead")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the model's dtype (vLLM's CPU build computes bfloat16 slowly without AVX-512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the session choice and the prompts' words")
    p.add_argument("--logs", type=output_path, help="keep the servers' and routers' logs in this directory")
    p.add_argument("--json", type=output_path, help="write the results here")
    p.add_argument("--plot", type=output_path, help="write a PNG of requests/s, TTFT p99 and cached share here")


def configs_arg(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIGS]
    if not keys or unknown:
        raise argparse.ArgumentTypeError(f"expects configurations among {', '.join(CONFIGS)}, got {text!r}")
    return keys


def model_block_bytes(model: Path, dtype: str) -> int:
    """KV bytes of one 128-token block of the model: K and V, every layer."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * BLOCK * (4 if dtype == "float32"
                                                                                       else 2)


def run(args: argparse.Namespace) -> int:
    if vllm_cpu_python() is None:
        raise UsageError("vllm-cpu is not installed: run scripts/setup_vllm_cpu.sh")
    sessions = args.sessions or (10 if args.quick else 12)
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-serving-") as tmp:
        work = Path(tmp)
        if args.logs:
            work = Path(args.logs)
            work.mkdir(exist_ok=True)
        model = work / "model"
        size = [] if args.quick else ["--layers", "8", "--hidden", "1024", "--heads", "8", "--kv-heads", "2"]
        subprocess.run([str(vllm_cpu_python()), "-m", "kvtier.testing.tiny_model", str(model), *size],
                       check=True, capture_output=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        shapes = weka_shapes(sessions, args.max_context, args.max_calls, args.gap_scale, args.seed)
        block_bytes = model_block_bytes(model, args.dtype)
        kv_blocks = args.kv_blocks or (args.max_context + 512) // BLOCK + 2
        plan = Plan(shapes, "You are a coding agent. " + words(random.Random(args.seed), 500), model, work, block_bytes,
                    args.concurrency or (len(shapes) if args.cliff else 2 if args.quick else 4), kv_blocks,
                    sum(-(-max(s.contexts) // BLOCK) + 2 for s in shapes) + kv_blocks, args.host_capacity,
                    disk=args.cliff is None)
        if args.cliff is not None:  # the two workers' G2 together hold the fraction of the working set
            plan.host_capacity_bytes = -(-int(args.cliff * plan.working_set_blocks) // 2) * block_bytes
        configs = [run_config(CONFIGS[key], args, plan) for key in args.configs]
    report(configs, plan, args)
    return 0


def report(configs: list[dict], plan: Plan, args: argparse.Namespace) -> None:
    by_key = {c["key"]: c for c in configs}
    base, limit = by_key.get("a"), by_key.get("d")
    for c in configs:
        c["x_a"] = c["requests_per_s"] / base["requests_per_s"] if base else None
        c["x_limit"] = c["requests_per_s"] / limit["requests_per_s"] if limit else None
    same = all(c["texts"] == configs[0]["texts"] for c in configs)
    working_set = plan.working_set_blocks * BLOCK
    tiers = f"kvtier G2 {plan.host_capacity_bytes // 1024}KiB per worker" + (" + disk" if plan.disk else "")
    cliff = f"cliff {args.cliff}: " if args.cliff else ""
    print(f"\n{machine_line()}; vLLM 0.32 on CPU; protocol {args.protocol}; {len(plan.shapes)} Weka-shaped sessions, "
          f"{plan.concurrency} at once; working set {working_set} tokens = "
          f"{working_set / (2 * plan.kv_blocks * BLOCK):.1f}x the two workers' vLLM KV caches; {cliff}{tiers}")
    print(f"{'config':38} {'req/s':>6} {'x(a)':>5} {'x(d)':>5} {'prompt tok/s':>12} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'cached':>7} {'ceiling':>7} {'recomputed':>10}  tiers")
    for c in configs:
        ratio = lambda x: f"{x:5.2f}" if x is not None else "    -"  # noqa: E731
        tier_text = " ".join(f"{k}:{int(v)}" for k, v in sorted(c["tier_tokens"].items()))
        print(f"{c['name']:38} {c['requests_per_s']:6.3f} {ratio(c['x_a'])} {ratio(c['x_limit'])} "
              f"{c['prompt_tokens_per_s']:12.0f} {c['ttft_p50_ms']:8.0f}ms {c['ttft_p99_ms']:8.0f}ms "
              f"{c['cached_token_frac']:7.1%} {c['ceiling_cached_token_frac']:7.1%} {c['recomputed_tokens']:10d}  "
              f"{tier_text}")
    targets = {}
    if "c" in by_key and limit:
        targets["c_over_limit"] = by_key["c"]["requests_per_s"] / limit["requests_per_s"]
    if "c" in by_key and "c-lru" in by_key:
        targets["c_over_c_lru"] = by_key["c"]["requests_per_s"] / by_key["c-lru"]["requests_per_s"]
        targets["c_minus_c_lru_cached_frac"] = by_key["c"]["cached_token_frac"] - by_key["c-lru"]["cached_token_frac"]
    for name, value in targets.items():
        print(f"{name}: {value:.3f}")
    for c in configs:
        print(f"{c['key']}: servers' CPU {c['worker_cpu_s']:.0f} s in {c['wall_s']:.0f} s "
              f"({c['worker_cpu_s'] / c['wall_s']:.2f} cores busy), "
              f"{c['engine_steps']:.0f} engine steps")
        if c["kvtier_counters"]:
            print(f"{c['key']} kvtier: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(c["kvtier_counters"].items())))
    print(f"same tokens in every configuration: {same}")
    out = {"machine": machine_line(), "trace": TRACE.name, "protocol": args.protocol, "cliff": args.cliff,
           "sessions": len(plan.shapes), "concurrency": plan.concurrency, "working_set_tokens": working_set,
           "host_capacity_bytes": plan.host_capacity_bytes, "disk": plan.disk, "targets": targets, "same_tokens": same,
           "x_limit": {c["key"]: c["x_limit"] for c in configs},
           "configs": [{k: v for k, v in c.items() if k != "texts"} for c in configs]}
    write_json(args.json, out)
    if args.plot:
        plot(out, args.plot)


def plot(out: dict, path: Path) -> None:
    plt = pyplot()

    names = [c["key"] for c in out["configs"]]
    colors = {"a": "#999", "b": "#69c", "c": "#2a7", "c-lru": "#c84", "d": "#444"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in zip(axes, ("requests_per_s", "ttft_p99_ms", "cached_token_frac"),
                              ("requests / s", "TTFT p99 (ms)", "prompt tokens from cache")):
        ax.bar(names, [c[key] for c in out["configs"]], color=[colors.get(n, "#888") for n in names])
        ax.set_title(label)
    cliff = f", cliff {out['cliff']}" if out["cliff"] else ""
    fig.suptitle(f"Weka-shaped agent sessions on vLLM 0.32 CPU, {out['protocol']}{cliff} ({out['machine'][:60]})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
