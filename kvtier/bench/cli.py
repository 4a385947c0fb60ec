"""``kvtier bench NAME [options]``: the benchmarks, each with ``--quick``, ``--json`` and ``--plot``; a
benchmark's module is imported only when it runs (``kvtier bench NAME --help`` lists its options)."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, question it answers)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "transfer": ("kvtier.bench.transfer", "GPU cache <-> pinned host GB/s per implementation and page size, against "
                 "one contiguous copy"),
    "tiers": ("kvtier.bench.tiers", "G3 against fio, G4 against redis-benchmark, G2 and G3 against LMCache's "
              "LocalCPUBackend and LocalDiskBackend"),
    "router": ("kvtier.bench.router", "router index ops/s and find_matches latency against NVIDIA Dynamo's "
               "RadixTree; routing quality against round-robin"),
    "front": ("kvtier.bench.front", "the router's HTTP front against calling the workers directly: requests/s, "
              "p50/p99, CPU per request"),
    "policies": ("kvtier.bench.policies", "hit rate per eviction policy and capacity against LRU and Belady"),
    "restore": ("kvtier.bench.restore", "restoring a context from G2/G3/G4 against recomputing its prefill"),
    "serving": ("kvtier.bench.serving", "agent sessions through real vLLM servers: vLLM alone against vLLM + kvtier "
                "behind kvtier's router"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS),
                        help="; ".join(f"{name}: {text}" for name, (_, text) in sorted(BENCHMARKS.items())))
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="the benchmark's own options (kvtier bench NAME --help)")


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import OneLineParser

    module_name, question = BENCHMARKS[args.benchmark]
    module = importlib.import_module(module_name)
    parser = OneLineParser(prog=f"kvtier bench {args.benchmark}", description=question)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
