"""What both engine plug-ins need: stable namespaced keys and kvtier settings read from an extra config."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import xxhash

from kvtier.config import KvtierConfig
from kvtier.hashing import Namespace

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def name_part(text: str) -> str:
    """A model path / id / dtype as a ``Namespace`` field: separators and spaces become '-'."""
    cleaned = _UNSAFE.sub("-", str(text)).strip("-")
    if not cleaned:
        raise ValueError(f"cannot build a namespace name from {text!r}")
    return cleaned


def engine_key(namespace: Namespace, raw: bytes | str) -> int:
    """An engine's block key (vLLM ``OffloadKey`` bytes, SGLang page hash) as a kvtier u64 chunk key.

    Seeded with the namespace's fingerprint, never with anything process-random: the same prefix of the
    same model maps to the same key in every process and after restarts, and different models, ranks,
    layouts or tenants map to unrelated keys even for equal engine hashes.
    """
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    return xxhash.xxh3_64_intdigest(data, seed=namespace.id)


def kvtier_config(extra: Mapping[str, Any] | None, engine_keys: Collection[str], allowed: Collection[str],
                  where: str) -> KvtierConfig:
    """kvtier's settings from an engine's extra config: the engine's own keys are skipped, the rest must be
    ``KvtierConfig`` keys this integration uses (a typo or an unsupported key is a ValueError at start-up)."""
    ours = {k: v for k, v in (extra or {}).items() if k not in engine_keys}
    unused = sorted(k for k in ours if k not in allowed)
    if unused:
        raise ValueError(f"{where}: unsupported key(s) {unused} in the extra config; kvtier keys accepted here: "
                         f"{sorted(allowed)}")
    return KvtierConfig.from_mapping(ours, source=where)
