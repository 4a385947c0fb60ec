"""The block manager: chunk index, tiers G1..G4, retention (pins, priorities, ephemeral) and policies."""

from kvtier.manager.core import EntryInfo, Manager, ManagerError, ManagerListener, PinReport, StorePlan
from kvtier.manager.policies import ONLINE_POLICIES, POLICIES, Policy, make_policy
from kvtier.manager.tier import TierSpec

__all__ = ["EntryInfo", "Manager", "ManagerError", "ManagerListener", "PinReport", "StorePlan", "TierSpec",
           "Policy", "POLICIES", "ONLINE_POLICIES", "make_policy"]
