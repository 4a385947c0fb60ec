"""Every implementation that runs on CPU, every layout, every dtype: bitwise against the slicing oracle."""

import os

import pytest
import torch

from kvtier.kernels import available_impls, load, offload
from tests.kernels.caches import DTYPES, all_cases

POISON = 0xA5
CPU = torch.device("cpu")
IMPLS = [i for i in ("torch", "triton", "dma") if i in available_impls(CPU)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine Triton compiles instead")
def test_triton_runs_in_the_interpreter_here():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run the suite through scripts/test.sh"
    assert "triton" in IMPLS


def _ids_and_offsets(case, gen, n=None, spread=3):
    """Random, non-contiguous block ids; arena offsets shuffled with gaps between records."""
    nb = case.layout.num_blocks
    n = nb if n is None else n
    ids = torch.randperm(nb, generator=gen)[:n]
    slots = torch.randperm(n * spread, generator=gen)[:n]
    return ids, slots * (case.layout.block_bytes + 16) + 7 * (slots % 2)  # odd offsets: unaligned paths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_offload_matches_oracle_and_load_restores(impl, dtype):
    gen = torch.Generator().manual_seed(hash((impl, str(dtype))) % 2**31)
    for case in all_cases(dtype, seed=3):
        lay = case.layout
        for n in (lay.num_blocks, 1, lay.num_blocks // 2):  # full, single and partial batches
            ids, offs = _ids_and_offsets(case, gen, n)
            arena = torch.full((int(offs.max()) + lay.block_bytes + 64,), POISON, dtype=torch.uint8)
            assert offload(lay, ids, arena, offs, impl=impl) == impl
            written = torch.zeros_like(arena, dtype=torch.bool)
            for b, o in zip(ids.tolist(), offs.tolist()):
                assert torch.equal(arena[o:o + lay.block_bytes], case.oracle(b)), (case.name, impl, b)
                written[o:o + lay.block_bytes] = True
            assert bool((arena[~written] == POISON).all()), f"{case.name}: bytes written outside the records"

            # scatter into a poisoned copy of the cache: exactly the loaded blocks come back, nothing else moves
            originals = [t.clone() for t in case.tensors]
            for t in case.tensors:
                t.view(torch.uint8).fill_(POISON)
            assert load(lay, ids, arena, offs, impl=impl) == impl
            for b in range(lay.num_blocks):
                got = case.oracle(b)
                if b in set(ids.tolist()):
                    with_original = _restore(case, originals)
                    assert torch.equal(got, with_original(b)), (case.name, impl, b)
                else:
                    assert bool((got == POISON).all()), f"{case.name}: block {b} was written but not loaded"
            for t, o in zip(case.tensors, originals):
                t.copy_(o)


def _restore(case, originals):
    """The oracle evaluated over the original tensors (swapped in temporarily)."""
    def oracle(b):
        saved = [t.clone() for t in case.tensors]
        for t, o in zip(case.tensors, originals):
            t.copy_(o)
        try:
            return case.oracle(b)
        finally:
            for t, s in zip(case.tensors, saved):
                t.copy_(s)
    return oracle


@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_into_a_fresh_cache(impl):
    """Gather everything, scatter it into a different (poisoned) cache of the same shape: identical."""
    for case, fresh in zip(all_cases(torch.bfloat16, seed=5), all_cases(torch.bfloat16, seed=6)):
        lay = case.layout
        ids = torch.arange(lay.num_blocks).flip(0)
        offs = torch.arange(lay.num_blocks) * lay.block_bytes
        arena = torch.full((lay.num_blocks * lay.block_bytes,), POISON, dtype=torch.uint8)
        offload(lay, ids, arena, offs, impl=impl)
        for t in fresh.tensors:
            t.view(torch.uint8).fill_(POISON)
        load(fresh.layout, ids, arena, offs, impl=impl)
        for b in range(lay.num_blocks):
            assert torch.equal(case.oracle(b), fresh.oracle(b)), (case.name, b)


def test_implementations_agree_byte_for_byte():
    for case in all_cases(torch.float8_e4m3fn, seed=9):
        lay = case.layout
        ids = [lay.num_blocks - 1, 0, lay.num_blocks // 2]
        offs = [0, 3 * lay.block_bytes + 1, lay.block_bytes]
        arenas = []
        for impl in IMPLS:
            arena = torch.full((5 * lay.block_bytes,), POISON, dtype=torch.uint8)
            offload(lay, ids, arena, offs, impl=impl)
            arenas.append(arena)
        for other in arenas[1:]:
            assert torch.equal(arenas[0], other), case.name


def test_empty_batch_is_a_no_op():
    case = all_cases(torch.float16)[0]
    arena = torch.full((16,), POISON, dtype=torch.uint8)
    for impl in IMPLS:
        offload(case.layout, [], arena, [], impl=impl)
        load(case.layout, [], arena, [], impl=impl)
    assert bool((arena == POISON).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_wide_body_with_byte_tail(impl):
    """16-byte aligned addresses but 37-byte pages: the vector body plus the byte tail must be exact."""
    from kvtier.kernels import TransferBatch
    from kvtier.layout import vllm_mla_layout

    gen = torch.Generator().manual_seed(1)
    padded = [torch.randint(0, 256, (6, 1, 48), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
              for _ in range(1)]
    lay = vllm_mla_layout([p[:, :, :37] for p in padded])
    assert lay.segment_bytes == 37 and lay.num_segments == 1
    offs = torch.tensor([0, 128, 256])
    arena = torch.full((512,), POISON, dtype=torch.uint8)
    assert TransferBatch.build(lay, [4, 0, 2], arena, offs, True).alignment == 16  # torch allocations are aligned
    offload(lay, [4, 0, 2], arena, offs, impl=impl)
    for b, o in zip([4, 0, 2], offs.tolist()):
        expected = torch.cat([p[b, :, :37].contiguous().view(torch.uint8).flatten() for p in padded])
        assert torch.equal(arena[o:o + 37], expected)
        assert bool((arena[o + 37:o + 128] == POISON).all())


def test_layer_slices_move_exactly_their_layer():
    """Loading a record layer by layer through ``layer_slices`` equals loading it whole."""
    for case in all_cases(torch.bfloat16, seed=21):
        lay = case.layout
        slices = lay.layer_slices()
        if slices is None:
            assert lay.segments_per_layer == 0  # BL* orders: a block's layers are one segment
            continue
        ids = torch.arange(lay.num_blocks)
        offs = ids * lay.block_bytes
        arena = torch.empty(lay.num_blocks * lay.block_bytes, dtype=torch.uint8)
        offload(lay, ids, arena, offs)
        expected = [case.oracle(b) for b in range(lay.num_blocks)]
        for t in case.tensors:
            t.view(torch.uint8).fill_(POISON)
        for sub, byte_offset in slices:
            load(sub, ids, arena, offs + byte_offset)
        assert all(torch.equal(case.oracle(b), expected[b]) for b in range(lay.num_blocks)), case.name
