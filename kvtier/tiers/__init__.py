"""Storage tiers below the GPU behind one Tier protocol: host (G2), disk (G3), remote (G4).

The remote tier needs ``redis``, an optional extra: it is imported only when a G4 is configured
(``open_remote_tier``, or the ``RemoteTier`` attribute of this package), so G2/G3-only setups run without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvtier.config import KvtierConfig
from kvtier.hashing import Namespace
from kvtier.tiers.base import Tier, TierClosedError, StoreStats
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostPool, HostTier, PoolExhausted

if TYPE_CHECKING:
    from kvtier.tiers.remote import RemoteTier

__all__ = ["DiskTier", "HostPool", "HostTier", "PoolExhausted", "RemoteTier", "Tier", "TierClosedError", "StoreStats",
           "open_remote_tier", "remote_tier_class"]

REDIS_EXTRA = "pip install 'kvtier[redis]'"


class MissingExtraError(ImportError):
    """A configured feature needs an optional dependency that is not installed."""


def remote_tier_class() -> type[RemoteTier]:
    """``RemoteTier``, importing redis now; a ``MissingExtraError`` naming the extra when it is not installed."""
    try:
        from kvtier.tiers.remote import RemoteTier
    except ImportError as exc:
        raise MissingExtraError(f"remote_url (G4) needs the redis package, which is not installed ({exc}): "
                                f"{REDIS_EXTRA}") from exc
    return RemoteTier


def open_remote_tier(cfg: KvtierConfig, namespace: Namespace) -> Tier:
    """G4 for ``cfg.remote_url`` (see ``remote_tier_class`` for a missing redis)."""
    return remote_tier_class().from_config(cfg, namespace)


def __getattr__(name: str) -> Any:
    if name == "RemoteTier":
        return remote_tier_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
