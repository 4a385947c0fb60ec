"""The torch implementation: runs on any device; the CPU path and the oracle the other paths are tested
against. One strided copy per (affine run of arena offsets) x (segment), never a loop per byte or page."""

from __future__ import annotations


from kvtier.kernels.batch import TransferBatch


def copy(batch: TransferBatch) -> None:
    lay = batch.layout
    if batch.num_blocks == 0:
        return
    ids = batch.block_ids.to(lay.device)
    for start, stop, first, step in batch.affine_runs():
        n = stop - start
        run_ids = ids[start:stop]
        for j in range(lay.num_segments):
            cache_rows = lay.segment_rows(j)
            arena_rows = batch.arena.as_strided((n, lay.segment_bytes), (step, 1),
                                                first + j * lay.segment_bytes)
            if batch.to_host:
                arena_rows.copy_(cache_rows.index_select(0, run_ids))
            else:
                cache_rows.index_copy_(0, run_ids, arena_rows.to(lay.device))
