"""Shared bits of the tier tests: a namespace, random payloads, open file descriptors."""

from __future__ import annotations

import os

import numpy as np

from kvtier.hashing import Namespace

NS = Namespace("test-model", "bf16", "LBHNC", tp_rank=0, tp_size=1)
# around every 4 KiB boundary that matters for O_DIRECT padding, and a few larger chunks
SIZES = [1, 4095, 4096, 4097, 12288, 100_000, 1 << 20, (1 << 20) + 17]


def payloads(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
