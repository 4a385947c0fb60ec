"""Block keys: the hash chain shared with NVIDIA Dynamo's router (see DESIGN.md, "Block keys").

``local_i = xxh3_64(tokens of block i as LE u32, seed)``; ``seq_0 = local_0``;
``seq_i = xxh3_64(LE u64 seq_{i-1} || LE u64 local_i, seed)``. The seed is 1337, or derived from the
tenant's cache salt so that tenants never share a key. Only full blocks are hashed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

DEFAULT_SEED = 1337
_PAIR = struct.Struct("<QQ")


def seed_for_salt(salt: str | bytes | None) -> int:
    """The hash seed for a tenant: exactly 1337 without a salt, a salt-derived 64-bit seed otherwise."""
    if salt is None or salt == "" or salt == b"":
        return DEFAULT_SEED
    raw = salt.encode() if isinstance(salt, str) else salt
    return xxhash.xxh3_64_intdigest(raw, seed=DEFAULT_SEED)


def _as_u32_bytes(tokens: Sequence[int] | np.ndarray) -> memoryview:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in an unsigned 32-bit integer")
    return memoryview(np.ascontiguousarray(arr, dtype="<u4")).cast("B")


def local_block_hashes(tokens: Sequence[int] | np.ndarray, block_size: int, salt: str | bytes | None = None) -> list[int]:
    """Hash each full block of ``tokens`` on its own (one xxh3 call per block, no per-token loop)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    seed = seed_for_salt(salt)
    data = _as_u32_bytes(tokens)
    step = 4 * block_size
    n_full = len(data) // step
    digest = xxhash.xxh3_64_intdigest
    return [digest(data[i * step : (i + 1) * step], seed) for i in range(n_full)]


def chain_hashes(local_hashes: Sequence[int], salt: str | bytes | None = None, parent: int | None = None) -> list[int]:
    """Chain local block hashes into prefix (seq) hashes, optionally continuing from ``parent``."""
    seed = seed_for_salt(salt)
    digest = xxhash.xxh3_64_intdigest
    pack = _PAIR.pack
    out: list[int] = []
    prev = parent
    for local in local_hashes:
        prev = local if prev is None else digest(pack(prev, local), seed)
        out.append(prev)
    return out


def block_hashes(tokens: Sequence[int] | np.ndarray, block_size: int, salt: str | bytes | None = None) -> list[int]:
    """Seq hashes of every full block of ``tokens``: block i's key identifies the whole prefix up to it."""
    return chain_hashes(local_block_hashes(tokens, block_size, salt), salt)


@dataclass(frozen=True)
class Namespace:
    """What must match for stored KV to be reusable; prefixes every key below G1.

    Kept out of the hash chain so routers and engines agree on block hashes; the tenant salt is in the
    chain (through the seed) and repeated here so stores keep tenants apart even for colliding hashes.
    """

    model: str
    dtype: str
    layout: str
    tp_rank: int = 0
    tp_size: int = 1
    salt: str = ""

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "layout"):
            value = getattr(self, name)
            if not value or any(c in value for c in "/ \n"):
                raise ValueError(f"namespace {name} must be non-empty without '/', spaces or newlines: {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")

    @property
    def prefix(self) -> str:
        salt_tag = f"{xxhash.xxh3_64_intdigest(self.salt.encode()):016x}" if self.salt else "nosalt"
        return f"kvtier/{self.model}/{self.dtype}/{self.layout}/tp{self.tp_rank}of{self.tp_size}/{salt_tag}"

    @property
    def id(self) -> int:
        """A 64-bit fingerprint of the namespace, stored in chunk headers to catch mismatched reads."""
        return xxhash.xxh3_64_intdigest(self.prefix.encode())

    def key(self, seq_hash: int) -> str:
        """The stored key of the chunk ending at the block with ``seq_hash``."""
        return f"{self.prefix}/{seq_hash:016x}"
