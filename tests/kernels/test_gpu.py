"""GPU paths against the slicing oracle, on fresh random data; skipped where no GPU is present (run on a
lent GPU by benchmarks/gpu_check.sh). Host arenas are pinned, as the host pool's are."""

import pytest
import torch

from kvtier.kernels import available_impls, load, offload
from tests.kernels.caches import DTYPES, all_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
POISON = 0xA5


def _gpu_impls():
    return [i for i in ("triton", "cuda", "staged", "dma") if i in available_impls(torch.device("cuda"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sm_budget", [0, 2])
def test_gpu_impls_match_oracle(dtype, sm_budget):
    impls = _gpu_impls()
    assert {"triton", "dma"} <= set(impls), impls
    for impl in impls:
        for case in all_cases(dtype, seed=11, device="cuda"):
            lay = case.layout
            gen = torch.Generator().manual_seed(7)
            ids = torch.randperm(lay.num_blocks, generator=gen)[: max(1, lay.num_blocks - 2)]
            offs = torch.arange(ids.numel()) * (lay.block_bytes + 16)
            arena = torch.full((int(offs[-1]) + lay.block_bytes,), POISON, dtype=torch.uint8).pin_memory()
            offload(lay, ids, arena, offs, impl=impl, sm_budget=sm_budget)
            torch.cuda.synchronize()
            for b, o in zip(ids.tolist(), offs.tolist()):
                assert torch.equal(arena[o:o + lay.block_bytes], case.oracle(b).cpu()), (impl, case.name, b)
            expected = {b: case.oracle(b) for b in ids.tolist()}
            for t in case.tensors:
                t.view(torch.uint8).fill_(POISON)
            load(lay, ids, arena, offs, impl=impl, sm_budget=sm_budget)
            torch.cuda.synchronize()
            for b in range(lay.num_blocks):
                got = case.oracle(b)
                if b in expected:
                    assert torch.equal(got, expected[b]), (impl, case.name, b)
                else:
                    assert bool((got == POISON).all()), (impl, case.name, b)


def test_unpinned_arena_is_refused_for_zero_copy():
    case = all_cases(torch.float16, device="cuda")[0]
    arena = torch.zeros(case.layout.block_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pinned"):
        offload(case.layout, [0], arena, [0], impl="triton")
