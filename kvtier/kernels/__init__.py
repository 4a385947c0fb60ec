"""Paged-KV transfer kernels behind one dispatch API: ``offload`` (cache -> arena) and ``load`` (back)."""

from kvtier.kernels.batch import TransferBatch
from kvtier.kernels.dispatch import available_impls, choose, load, offload, transfer

__all__ = ["TransferBatch", "available_impls", "choose", "load", "offload", "transfer"]
