"""Restoring a context from kvtier against recomputing its prefill, on the reference model, same run.

For each context length: time to first token when the whole prompt is recomputed, and when every reusable
chunk is restored from G2 (pinned host memory) or from G3 (files; G2 emptied first), and with ``--redis-url``
from G4 (a Redis server, in an engine without G3; G2 emptied first), with G1 emptied before each timed call. Restored runs must produce logits bitwise equal to the recompute run's reference. On a GPU
the model is Llama-3-8B-shaped (random bf16 weights; ``--layers`` cuts depth, which scales both sides
alike); on CPU the reference runner's ``small`` preset.

    kvtier bench restore [--quick] [--lengths 8192 32768 131072] [--layers N] [--redis-url URL] [--json PATH]
        [--plot PATH]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from tqdm import tqdm

from kvtier.bench.common import device_name, machine_line, print_table, pyplot, write_json
from kvtier.command_options import output_path, positive_int, remote_url, torch_device
from kvtier.config import KvtierConfig
from kvtier.engine import EngineRequest, KvtierEngine
from kvtier.hashing import Namespace
from kvtier.layout import paired_kv_layout
from kvtier.runner.kv_cache import PagedKVPool
from kvtier.runner.model import LlamaModel, ModelConfig
from kvtier.runner.offload import EngineHooks
from kvtier.runner.runner import Runner

BLOCK = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the shortest contexts only")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    parser.add_argument("--lengths", type=positive_int, nargs="+",
                        help="context lengths in tokens (default 8192 32768 131072 on GPU, 1024 4096 on CPU)")
    parser.add_argument("--layers", type=positive_int, default=32, help="GPU model depth (Llama-3-8B has 32)")
    parser.add_argument("--chunk-blocks", type=positive_int, help="blocks per chunk (default 64 on GPU, 16 on CPU)")
    parser.add_argument("--redis-url", type=remote_url, default="", help="also restore from G4 on this Redis (its keys are deleted)")
    parser.add_argument("--json", type=output_path, help="write the rows here")
    parser.add_argument("--plot", type=output_path, help="write a PNG of restore and recompute time per context here")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    lengths = args.lengths or ([8192, 32768, 131072] if on_gpu else [1024, 4096])
    if args.quick and not args.lengths:
        lengths = lengths[:1]
    config = ModelConfig.llama3_8b_layers(args.layers) if on_gpu else ModelConfig.small()
    chunk_blocks = args.chunk_blocks or (64 if on_gpu else 16)
    chunk_tokens = BLOCK * chunk_blocks
    model = LlamaModel(config, device)
    longest = max(lengths) + chunk_tokens
    pool = PagedKVPool(config, -(-longest // BLOCK), BLOCK, device)
    layout = paired_kv_layout(pool.per_layer_views())
    chunk_bytes = layout.block_bytes * chunk_blocks
    rows = []
    lowers = ["G3"] + (["G4"] if args.redis_url else [])
    with tempfile.TemporaryDirectory(prefix="kvtier-restore-") as disk:
        def engine_over(lower: str) -> KvtierEngine:
            engine_config = KvtierConfig(
                block_size=BLOCK, chunk_blocks=chunk_blocks, model_name=config.model_id,
                host_capacity_bytes=(longest // chunk_tokens + 8) * chunk_bytes,
                disk_path=disk if lower == "G3" else "", remote_url=args.redis_url if lower == "G4" else "",
                disk_capacity_bytes=(longest // chunk_tokens + 8) * (chunk_bytes + 8192),
                write_through=True, admission_min_hits=0, lower_tier_deadline_ms=60_000)
            return KvtierEngine(engine_config, layout, Namespace(config.model_id, config.dtype, layout.name))

        with engine_over("G3") as engine:  # warm-up: the model, and the transfer kernels' first store and load
            warm = list(range(2 * chunk_tokens))
            for phase in ("store", "load"):
                pool.reset_prefix_cache()
                hooks = EngineHooks(engine, EngineRequest(f"warm-{phase}", warm))
                Runner(model, pool, chunk_blocks).generate(warm, 1, kv_hooks=hooks)
                engine.drain()
            engine.clear("G3")
            engine.clear("G2")
        for n, lower in tqdm([(n, lower) for n in lengths for lower in lowers], desc="contexts", unit="ctx"):
            prompt = torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            recompute = Runner(model, pool, chunk_blocks, prefix_caching=False).generate(prompt, 1)
            with engine_over(lower) as engine:
                pool.reset_prefix_cache()
                cached = Runner(model, pool, chunk_blocks)
                cached.generate(prompt, 1, kv_hooks=EngineHooks(engine, EngineRequest(f"store-{n}", prompt)))
                engine.drain()
                for tier in ("G2", lower) if lower == "G3" else (lower,):
                    if tier != "G2":
                        engine.clear("G2")
                    pool.reset_prefix_cache(poison=0xA5)
                    hooks = EngineHooks(engine, EngineRequest(f"{tier}-{n}", prompt))
                    restored = Runner(model, pool, chunk_blocks).generate(prompt, 1, kv_hooks=hooks)
                    engine.drain()
                    rows.append({"context": n, "source": tier, "restored_tokens": restored.stats.loaded_tokens,
                                 "recompute_ms": recompute.stats.ttft_s * 1e3, "restore_ms": restored.stats.ttft_s * 1e3,
                                 "speedup": recompute.stats.ttft_s / restored.stats.ttft_s,
                                 "identical": bool(torch.equal(restored.first_logits, recompute.first_logits))})
                engine.clear(lower)
                engine.clear("G2")
    name = device_name(device)
    print(machine_line())
    print_table(rows, ["context", "source", "restored_tokens", "recompute_ms", "restore_ms", "speedup", "identical"],
                f"restore vs recompute, {config.model_id} ({config.num_layers} layers) on {name}")
    write_json(args.json, {"machine": machine_line(), "device": name, "model": config.model_id,
                           "layers": config.num_layers, "chunk_tokens": chunk_tokens, "rows": rows})
    if args.plot:
        plot(rows, args.plot, f"restore vs recompute, {config.model_id} on {name}")
    return 0 if all(r["identical"] for r in rows) else 1


def plot(rows: list[dict], path: str, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['context'] // 1024}K from {r['source']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["recompute_ms"] for r in rows], width=0.4, label="recompute")
    ax.bar([i + 0.2 for i in x], [r["restore_ms"] for r in rows], width=0.4, label="restore (kvtier)")
    ax.set_xticks(list(x), labels, rotation=20)
    ax.set_ylabel("time to first token, ms")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)

