"""``kvtier demo``: one agentic coding session run three ways on the reference model.

1. *recompute*: every prompt prefilled from scratch (no reuse at all);
2. *unlimited G1*: the runner's own prefix cache in a KV pool big enough for everything (no offload);
3. *kvtier*: a G1 pool too small for the session, with kvtier's engine behind it (G2 pinned host memory,
   G3 files in a temporary directory, G4 Redis with ``--remote``), so context spills down and comes back.

The session: a shared system prompt and tool definitions (pinned through agent_hints), turns that append a
tool call and its output, reasoning at the tail of each prompt that the next call does not re-send (marked
ephemeral), and one subagent that starts from the same system prompt. kvtier must reproduce the unlimited-G1
logits bit for bit (same computation, the KV only came from elsewhere) and the recompute run's tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvtier.command_options import output_path, positive_int, remote_url, torch_device
from kvtier.config import KvtierConfig
from kvtier.engine import EngineRequest, KvtierEngine
from kvtier.hashing import Namespace
from kvtier.hints import AgentHints, Pin, TokenRange
from kvtier.layout import paired_kv_layout
from kvtier.runner.kv_cache import PagedKVPool
from kvtier.runner.model import LlamaModel, ModelConfig
from kvtier.runner.offload import EngineHooks
from kvtier.runner.runner import Generation, Runner
from kvtier.tiers.remote import unreachable_reason


@dataclass(frozen=True)
class Turn:
    label: str
    session: str
    prompt: list[int]
    hints: AgentHints


def agentic_session(vocab: int, seed: int = 0, system_tokens: int = 768, turns: int = 5,
                    subagent_at: int = 2, subagent_calls: int = 3) -> list[Turn]:
    """Token-level shape of a coding-agent session (random ids stand in for text). The subagent's calls run
    while the main agent waits; they push the main context out of a small G1."""
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def call(label: str, session: str, history: list[int], reasoning: list[int]) -> Turn:
        prompt = history + reasoning
        hints = AgentHints(session_id=session, prefix_tokens=system_tokens, pins=[Pin(target="system_and_tools")],
                           ephemeral=[TokenRange(len(history), len(prompt))], next_call_delay_s=2.0)
        return Turn(label, session, prompt, hints)

    system = text(system_tokens)
    history = system + text(160)  # the user's task
    sub = system + text(1100)  # the subagent's task and the files it reads
    sub_calls = 0
    out: list[Turn] = []
    for k in range(turns):
        # the subagent works in two bursts around one main call, so both contexts leave G1 and come back
        burst = subagent_calls - 1 if k == subagent_at else 1 if k == subagent_at + 2 else 0
        for _ in range(min(burst, subagent_calls - sub_calls)):
            sub_calls += 1
            out.append(call(f"sub {sub_calls}", "sub-1", sub, text(48)))
            sub = sub + text(24) + text(200)
        out.append(call(f"turn {k + 1}", "main", history, text(40 + 8 * k)))
        history = history + text(24) + text(180 + 40 * k)  # the tool call, then the tool's output
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=model_arg, default="small", help="tiny, small or llama3-8b-l<N>")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N]")
    parser.add_argument("--turns", type=positive_int, default=5, help="main-agent calls in the session")
    parser.add_argument("--new-tokens", type=positive_int, default=8, help="tokens generated per call")
    parser.add_argument("--remote", type=remote_url, help="G4: a redis://host:port URL (overrides remote_url of --config and "
                        "KVTIER_REMOTE_URL); with G4, G3 is kept small so the session reaches it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the session's tokens")
    parser.add_argument("--json", type=output_path, help="write the results here")


def model_arg(name: str) -> str:
    try:
        ModelConfig.preset(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def run(args: argparse.Namespace) -> int:
    overrides = {"remote_url": args.remote} if args.remote is not None else {}
    result = run_demo(ModelConfig.preset(args.model), torch.device(args.device), args.turns, args.new_tokens,
                      args.seed, config_path=args.config, **overrides)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0 if result["identical"] else 1


def demo_config(model_config: ModelConfig, disk: str, config_path: str | None = None,
                **overrides: object) -> KvtierConfig:
    """The demo's sizes, then the configuration file, ``KVTIER_*`` and ``overrides`` on top. G2 holds about
    a third of the session so it spills to G3; with a remote tier and the demo's own G3, G3 is a little larger
    than G2 and written through, so G4 serves what G3 lost."""
    chunk_tokens = 16 * 16
    token_bytes = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * \
        torch.empty(0, dtype=model_config.torch_dtype).element_size()
    base = KvtierConfig(block_size=16, chunk_blocks=16, model_name=model_config.model_id, disk_path=disk,
                        host_capacity_bytes=12 * chunk_tokens * token_bytes,
                        disk_capacity_bytes=64 * chunk_tokens * token_bytes, admission_min_hits=0)
    config = KvtierConfig.load(config_path, base=base, **overrides)
    if config.remote_url and config.disk_capacity_bytes == base.disk_capacity_bytes:
        # G3 a few chunks larger than G2 (no larger: what falls out of G3 comes back from G4), every chunk written
        # through; as small as G2 in bytes it held fewer chunks than G2 (an extent adds a header page), so it
        # served nothing G2 did not already hold
        config = dataclasses.replace(config, disk_capacity_bytes=int(1.25 * config.host_capacity_bytes),
                                     write_through=True)
    return config


def run_demo(model_config: ModelConfig, device: torch.device, turns: int = 5, new_tokens: int = 8, seed: int = 0,
             config_path: str | None = None, **overrides: object) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as disk:
        config = demo_config(model_config, disk, config_path, **overrides)  # bad settings fail before any work
        model = LlamaModel(model_config, device)
        session = agentic_session(model_config.vocab_size, seed, turns=turns)
        g4_problem = unreachable_reason(config) if config.remote_url else None
        if g4_problem:
            print(f"kvtier demo: warning: G4 {config.remote_url} is unreachable ({g4_problem}); "
                  "its lookups are misses", file=sys.stderr)
        block_size, chunk_blocks = config.block_size, config.chunk_blocks
        longest = max(len(t.prompt) for t in session) + new_tokens
        blocks_per_request = -(-longest // block_size)

        def runner(num_blocks: int, prefix_caching: bool) -> Runner:
            pool = PagedKVPool(model_config, num_blocks, block_size, device)
            return Runner(model, pool, chunk_blocks, prefix_caching=prefix_caching)

        recompute = runner(blocks_per_request, prefix_caching=False)
        unlimited = runner(4 * blocks_per_request * (turns + 1), prefix_caching=True)
        small = runner(blocks_per_request, prefix_caching=True)  # one request at a time: everything else spills
        layout = paired_kv_layout(small.pool.per_layer_views())
        namespace = Namespace(model_config.model_id, model_config.dtype, layout.name, salt=config.cache_salt)
        with KvtierEngine(config, layout, namespace) as engine:
            rows = []
            for i, turn in enumerate(tqdm(session, desc="demo turns", unit="call")):
                base = recompute.generate(turn.prompt, new_tokens)
                warm = unlimited.generate(turn.prompt, new_tokens)
                hooks = EngineHooks(engine, EngineRequest(f"call-{i}", turn.prompt, turn.hints))
                tiered = small.generate(turn.prompt, new_tokens, kv_hooks=hooks)
                engine.drain()  # the tool runs between calls; demotions settle meanwhile
                rows.append(_row(turn, base, warm, tiered, hooks.hit_tokens))
    totals = {g: sum(r["hit_tokens"][g] for r in rows) for g in ("G1", "G2", "G3", "G4")}
    ttft_without = [r["ttft_ms_recompute"] for r in rows]
    ttft_with = [r["ttft_ms_kvtier"] for r in rows]
    return {
        "device": str(device), "model": model_config.model_id,
        "identical": all(r["logits_identical"] and r["tokens_identical"] for r in rows),
        "turns": rows, "ttft_ms_without": ttft_without, "ttft_ms_with": ttft_with,
        "ttft_ms_unlimited_g1": [r["ttft_ms_unlimited_g1"] for r in rows],
        "hit_tokens": totals, "speedup": sum(ttft_without) / max(sum(ttft_with), 1e-9),
        "tiers": {"G2_bytes": config.host_capacity_bytes, "G3_bytes": config.disk_capacity_bytes,
                  "G4": config.remote_url or None, "G4_unreachable": g4_problem},
    }


def _row(turn: Turn, base: Generation, warm: Generation, tiered: Generation, engine_hits: dict[str, int]) -> dict:
    hits = {"G1": tiered.stats.g1_hit_tokens, **{g: engine_hits.get(g, 0) for g in ("G2", "G3", "G4")}}
    return {
        "label": turn.label, "prompt_tokens": len(turn.prompt),
        "logits_identical": torch.equal(tiered.first_logits, warm.first_logits),
        "tokens_identical": tiered.tokens == base.tokens,
        "ttft_ms_recompute": base.stats.ttft_s * 1e3, "ttft_ms_unlimited_g1": warm.stats.ttft_s * 1e3,
        "ttft_ms_kvtier": tiered.stats.ttft_s * 1e3, "hit_tokens": hits,
        "computed_tokens": tiered.stats.computed_tokens, "failed_loads": tiered.stats.failed_loads,
    }


def _print(result: dict) -> None:
    print(f"\nkvtier demo: {result['model']} on {result['device']}")
    tiers = result["tiers"]
    g4 = "none (--remote redis://host:port to add one)" if not tiers["G4"] else tiers["G4"]
    if tiers["G4_unreachable"]:
        g4 += f" UNREACHABLE: {tiers['G4_unreachable']}"
    print(f"tiers: G2 {tiers['G2_bytes'] / 2**20:.1f} MiB pinned host memory, G3 {tiers['G3_bytes'] / 2**20:.1f} MiB "
          f"in a temporary directory, G4 {g4}")
    header = f"{'call':>10} {'prompt':>7} {'recompute':>10} {'G1 only':>9} {'kvtier':>8}   hit tokens G1/G2/G3/G4   same"
    print(header)
    for r in result["turns"]:
        h = r["hit_tokens"]
        same = "yes" if r["logits_identical"] and r["tokens_identical"] else "NO"
        print(f"{r['label']:>10} {r['prompt_tokens']:>7} {r['ttft_ms_recompute']:>8.0f}ms {r['ttft_ms_unlimited_g1']:>7.0f}ms "
              f"{r['ttft_ms_kvtier']:>6.0f}ms   {h['G1']:>5}/{h['G2']:>5}/{h['G3']:>5}/{h['G4']:>5}   {same}")
    t = result["hit_tokens"]
    print(f"\ntime to first token, summed: recompute {sum(result['ttft_ms_without']):.0f} ms, kvtier "
          f"{sum(result['ttft_ms_with']):.0f} ms -> speedup {result['speedup']:.2f}x; hit tokens G1 {t['G1']}, "
          f"G2 {t['G2']}, G3 {t['G3']}, G4 {t['G4']}")
    print("bitwise identical to the unlimited-G1 logits and the recompute tokens:",
          "yes" if result["identical"] else "NO")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
