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
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvtier.config import KvtierConfig
from kvtier.engine import EngineRequest, KvtierEngine
from kvtier.hashing import Namespace
from kvtier.hints import AgentHints, Pin, TokenRange
from kvtier.layout import paired_kv_layout
from kvtier.runner.kv_cache import PagedKVPool
from kvtier.runner.model import LlamaModel, ModelConfig
from kvtier.runner.offload import EngineHooks
from kvtier.runner.runner import Generation, Runner


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
    parser.add_argument("--model", default="small", help="tiny, small or llama3-8b-l<N> (default: small)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per call")
    parser.add_argument("--remote", default="", help="redis://host:port for G4 (optional)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    result = run_demo(ModelConfig.preset(args.model), torch.device(args.device), args.turns, args.new_tokens,
                      args.remote, args.seed)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0 if result["identical"] else 1


def run_demo(model_config: ModelConfig, device: torch.device, turns: int = 5, new_tokens: int = 8,
             remote_url: str = "", seed: int = 0, block_size: int = 16, chunk_blocks: int = 16) -> dict:
    model = LlamaModel(model_config, device)
    session = agentic_session(model_config.vocab_size, seed, turns=turns)
    longest = max(len(t.prompt) for t in session) + new_tokens
    blocks_per_request = -(-longest // block_size)

    def runner(num_blocks: int, prefix_caching: bool) -> Runner:
        pool = PagedKVPool(model_config, num_blocks, block_size, device)
        return Runner(model, pool, chunk_blocks, prefix_caching=prefix_caching)

    recompute = runner(blocks_per_request, prefix_caching=False)
    unlimited = runner(4 * blocks_per_request * (turns + 1), prefix_caching=True)
    small = runner(blocks_per_request, prefix_caching=True)  # one request at a time: everything else spills
    layout = paired_kv_layout(small.pool.per_layer_views())
    chunk_bytes = layout.block_bytes * chunk_blocks
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as disk:
        config = KvtierConfig(block_size=block_size, chunk_blocks=chunk_blocks, model_name=model_config.model_id,
                              disk_path=disk,
                              host_capacity_bytes=12 * chunk_bytes,  # 8 chunks + 4 spare: G3 gets the rest
                              disk_capacity_bytes=64 * longest * layout.block_bytes, remote_url=remote_url,
                              admission_min_hits=0)
        namespace = Namespace(model_config.model_id, model_config.dtype, layout.name)
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
