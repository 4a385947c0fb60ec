#!/usr/bin/env python3
"""Block-key hashing throughput for a long prompt (default 128K tokens), against its ceiling: one xxh3 call
over the whole token buffer (the raw hash speed), and a per-token Python loop as the naive baseline.

    python benchmarks/bench_hashing.py [--tokens N] [--block-size B] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvtier.bench.common import print_table, write_json  # noqa: E402
from kvtier.hashing import DEFAULT_SEED, block_hashes  # noqa: E402


def _best_seconds(fn, repeat: int = 5) -> float:
    import time
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128 * 1024)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    tokens = np.random.default_rng(0).integers(0, 128_000, args.tokens, dtype=np.int64)
    as_list = tokens.tolist()
    raw = tokens.astype("<u4").tobytes()

    def per_token_loop():
        h = xxhash.xxh3_64(seed=DEFAULT_SEED)
        for t in as_list:
            h.update(t.to_bytes(4, "little"))
        return h.intdigest()

    rows = []
    for name, fn in [("kvtier block_hashes (numpy array)", lambda: block_hashes(tokens, args.block_size)),
                     ("kvtier block_hashes (list)", lambda: block_hashes(as_list, args.block_size)),
                     ("ceiling: one xxh3 over all tokens", lambda: xxhash.xxh3_64_intdigest(raw, DEFAULT_SEED)),
                     ("baseline: per-token Python loop", per_token_loop)]:
        seconds = _best_seconds(fn)
        rows.append({"impl": name, "ms": seconds * 1e3, "tokens_per_s": args.tokens / seconds})
    ceiling = rows[2]["tokens_per_s"]
    for r in rows:
        r["ratio_to_ceiling"] = r["tokens_per_s"] / ceiling
    print_table(rows, ["impl", "ms", "tokens_per_s", "ratio_to_ceiling"],
                f"hashing {args.tokens} tokens in blocks of {args.block_size}")
    write_json(args.json, {"tokens": args.tokens, "block_size": args.block_size, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
