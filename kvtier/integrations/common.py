"""What both engine plug-ins need: stable namespaced keys, kvtier settings read from an extra config, and a
disk tier per process."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import xxhash

from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError
from kvtier.hashing import Namespace
from kvtier.tiers import remote_tier_class
from kvtier.tiers.disk import DiskTier

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


def kvtier_config(extra: Mapping[str, Any] | None, engine_keys: Collection[str], where: str) -> KvtierConfig:
    """kvtier's settings from an engine's extra config: the engine's own keys are skipped and the rest load like
    a kvtier.yaml, so every plug-in takes every ``KvtierConfig`` key and no other (a typo or a bad value is a
    ``ConfigError`` at start-up). ``host_capacity_bytes`` is required: each engine process allocates that host
    tier, and no default fits every deployment."""
    ours = {k: v for k, v in (extra or {}).items() if k not in engine_keys}
    if "host_capacity_bytes" not in ours:
        raise ConfigError(f"{where}: the extra config needs host_capacity_bytes (kvtier's host tier per process, "
                          f"e.g. \"8GiB\")")
    cfg = KvtierConfig.from_mapping(ours, source=where)
    if cfg.remote_url:
        remote_tier_class()  # a missing redis fails the start-up, naming the extra, not the first G4 use
    return cfg


def per_dp_rank(cfg: KvtierConfig, dp_rank: int) -> KvtierConfig:
    """Data-parallel ranks are separate processes with one namespace (their pages are interchangeable), and a
    disk directory has one owner: each rank keeps its chunks in ``disk_path/dp<rank>``."""
    if not cfg.disk_path:
        return cfg
    return dataclasses.replace(cfg, disk_path=str(Path(cfg.disk_path) / f"dp{dp_rank}"))


def open_disk_tier(cfg: KvtierConfig, namespace: Namespace, chunk_bytes: int, where: str) -> DiskTier:
    """``DiskTier.from_config``, its start-up errors naming the plug-in."""
    try:
        return DiskTier.from_config(cfg, namespace, chunk_bytes)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
