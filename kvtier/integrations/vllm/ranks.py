"""Tensor parallelism below G2: a chunk is one entry per worker rank in G3/G4, each rank's bytes under its
own namespace (``tp_rank = rank``), moved together by a ``RankedTier``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from kvtier.cascade import G3, G4
from kvtier.config import KvtierConfig
from kvtier.hashing import Namespace
from kvtier.integrations.common import open_disk_tier
from kvtier.tiers import open_remote_tier
from kvtier.tiers.base import Tier
from kvtier.tiers.ranks import RankedTier

def rank_namespace(namespace: Namespace, rank: int, world_size: int) -> Namespace:
    """Where rank ``rank`` stores its bytes of every chunk below G2."""
    return dataclasses.replace(namespace, tp_rank=rank, tp_size=world_size)


def lower_tiers(cfg: KvtierConfig, namespace: Namespace, world_size: int, parts: Sequence[torch.Tensor],
                chunk_bytes: int) -> dict[int, Tier]:
    """G3 and G4 as configured, each a ``RankedTier`` over one tier per rank (its own namespace)."""
    per_rank = dataclasses.replace(cfg, disk_capacity_bytes=cfg.disk_capacity_bytes // world_size)
    makers = {G3: lambda ns: open_disk_tier(per_rank, ns, chunk_bytes, "KvtierOffloadingSpec"),
              G4: lambda ns: open_remote_tier(cfg, ns)}
    wanted = [g for g, on in ((G3, cfg.disk_path), (G4, cfg.remote_url)) if on]
    built: dict[int, list[Tier]] = {}
    try:
        for g in wanted:
            built[g] = []
            for r in range(world_size):
                built[g].append(makers[g](rank_namespace(namespace, r, world_size)))
    except BaseException:
        for tier in (t for ts in built.values() for t in ts):
            tier.close()
        raise
    return {g: RankedTier(ts, parts) for g, ts in built.items()}
