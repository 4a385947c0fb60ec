"""Eviction policies behind one interface (``Policy``), by name."""

from __future__ import annotations

from typing import Any

from kvtier.manager.policies.agent import AgentAware
from kvtier.manager.policies.arc import ARC
from kvtier.manager.policies.base import Key, Policy
from kvtier.manager.policies.belady import Belady, NextUseOracle
from kvtier.manager.policies.fifo import FIFO
from kvtier.manager.policies.lfu import LFU
from kvtier.manager.policies.lirs import LIRS
from kvtier.manager.policies.lru import LRU, RootFirstLRU
from kvtier.manager.policies.s3fifo import S3FIFO
from kvtier.manager.policies.tinylfu import TinyLFU

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in
                                     (AgentAware, LRU, RootFirstLRU, LFU, FIFO, ARC, S3FIFO, LIRS, TinyLFU, Belady)}
ONLINE_POLICIES = tuple(name for name in POLICIES if name != "belady")


def make_policy(name: str, capacity: int, **kwargs: Any) -> Policy:
    """A policy by name (``agent`` is the default; ``belady`` needs ``oracle=``, simulator only)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return cls(capacity, **kwargs)


__all__ = ["POLICIES", "ONLINE_POLICIES", "Key", "Policy", "NextUseOracle", "make_policy", "AgentAware",
           "ARC", "Belady", "FIFO", "LFU", "LIRS", "LRU", "RootFirstLRU", "S3FIFO", "TinyLFU"]
