"""Storage tiers below the GPU behind one Tier protocol: host (G2), disk (G3), remote (G4)."""

from kvtier.tiers.base import Tier, TierClosedError, TierStats
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostPool, HostTier, PoolExhausted
from kvtier.tiers.remote import RemoteTier

__all__ = ["DiskTier", "HostPool", "HostTier", "PoolExhausted", "RemoteTier", "Tier", "TierClosedError", "TierStats"]
