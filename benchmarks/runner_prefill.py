"""How fast does the reference runner prefill, against this machine's matmul ceiling and a G1 prefix hit?

For each prompt length: time to first token when every chunk is computed (recompute), when all chunks but the
last come from G1's prefix cache (hit), the prefill rate, and the share of the ceiling it reaches. The
ceiling is the measured dense-matmul rate of this device in the model's dtype divided by the model FLOPs of
the prompt (projections, MLP and causal attention), so it is what a perfect kernel set could do here.

    python benchmarks/runner_prefill.py --preset small --lengths 1024 2048 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from kvtier.runner import ModelConfig, Runner


def matmul_flops_per_s(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """The best rate of a square matmul over ``repeats`` tries (best, like the runner's figures)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        sync(device)
        started = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_flops(config: ModelConfig, tokens: int) -> float:
    """Model FLOPs of a prefill: every layer's matmuls for each token, causal attention, one lm_head row."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_token = config.hidden_size * (q + 2 * kv) + q * config.hidden_size + 3 * config.hidden_size * config.intermediate_size
    attention_pairs = tokens * (tokens + 1) / 2
    per_layer = 2 * per_token * tokens + 4 * config.num_heads * config.head_dim * attention_pairs
    return config.num_layers * per_layer + 2 * config.hidden_size * config.vocab_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", help="tiny, small or llama3-8b-l<N>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--chunk-blocks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per point; the best is reported (the machine may be shared)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    config = ModelConfig.preset(args.preset)
    device = torch.device(args.device)
    longest = max(args.lengths)
    runner = Runner.create(config, num_blocks=-(-(longest + 1) // args.block_size) + 1, block_size=args.block_size,
                           chunk_blocks=args.chunk_blocks, device=device)
    flops_per_s = matmul_flops_per_s(config.torch_dtype, device)
    prompt = torch.randint(0, config.vocab_size, (longest,), generator=torch.Generator().manual_seed(0)).tolist()
    runner.generate(prompt[:2 * runner.chunk_tokens], 1)     # warm-up

    rows = []
    for length in tqdm(args.lengths, desc="prompt lengths"):
        recompute, hit = [], []
        for _ in range(args.repeats):
            cold = Runner(runner.model, runner.pool, args.chunk_blocks, prefix_caching=False)
            recompute.append(cold.generate(prompt[:length], 1).stats.ttft_s)
            runner.generate(prompt[:length], 1)                  # fills G1
            hit.append(runner.generate(prompt[:length], 1).stats.ttft_s)
        ttft, ttft_hit = min(recompute), min(hit)
        ceiling_s = prefill_flops(config, length) / flops_per_s
        rows.append(dict(tokens=length, recompute_ttft_s=ttft, tokens_per_s=length / ttft, ceiling_ttft_s=ceiling_s,
                         share_of_ceiling=ceiling_s / ttft, g1_hit_ttft_s=ttft_hit, hit_speedup=ttft / ttft_hit))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{config.model_id}: {runner.model.num_parameters() / 1e6:.1f} M parameters, {config.dtype}, "
          f"chunks of {runner.chunk_tokens} tokens, on {name}; matmul ceiling {flops_per_s / 1e9:.0f} GFLOP/s")
    print(f"best of {args.repeats} runs per point")
    print(f"{'tokens':>7} {'recompute TTFT':>15} {'prefill tok/s':>14} {'ceiling TTFT':>13} {'of ceiling':>11} "
          f"{'G1-hit TTFT':>12} {'hit speedup':>12}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['recompute_ttft_s'] * 1e3:>12.1f} ms {r['tokens_per_s']:>14.0f} "
              f"{r['ceiling_ttft_s'] * 1e3:>10.1f} ms {r['share_of_ceiling']:>10.0%} "
              f"{r['g1_hit_ttft_s'] * 1e3:>9.1f} ms {r['hit_speedup']:>11.1f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(model=config.model_id, device=name, dtype=config.dtype, chunk_tokens=runner.chunk_tokens,
                           matmul_flops_per_s=flops_per_s, rows=rows), out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
