"""The engine's GPU path end to end (run on a lent GPU by benchmarks/gpu_check.sh; skipped elsewhere): transfers
on the side stream ordered by events, whole-chunk and layer-by-layer loading, every transfer implementation, each
restored context's logits bitwise equal to the all-in-G1 run's."""

import pytest
import torch

from kvtier.kernels import available_impls
from tests.engine.sessions import CHUNK_TOKENS, make_rig, random_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = random_tokens(130, seed=3)
FOLLOW_UP = PROMPT + random_tokens(40, seed=4)
REUSABLE = (len(PROMPT) // CHUNK_TOKENS) * CHUNK_TOKENS


def _gpu_impls() -> list[str]:
    return [i for i in ("triton", "cuda", "staged", "dma") if i in available_impls(torch.device("cuda"))] \
        if torch.cuda.is_available() else []


@pytest.mark.parametrize("impl", _gpu_impls())
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole-chunk", "layerwise"])
@pytest.mark.parametrize("tier", ["G2", "G3"])
def test_restore_on_the_gpu_is_bitwise_identical(tier, layerwise, impl, tmp_path):
    rig = make_rig(tmp_path, device="cuda", disk=tier == "G3", write_through=tier == "G3",
                   layerwise_load=layerwise, transfer_impl=impl)
    with rig.engine:
        first, _ = rig.call(rig.runner(), PROMPT)
        assert rig.same_as_reference(PROMPT, first)
        rig.engine.drain()
        if tier == "G3":
            assert rig.engine.clear("G2") == len(PROMPT) // CHUNK_TOKENS
        again, hooks = rig.call(rig.runner(), FOLLOW_UP)
        assert again.stats.loaded_tokens == REUSABLE and again.stats.failed_loads == 0
        assert hooks.hit_tokens[tier] == REUSABLE
        assert rig.same_as_reference(FOLLOW_UP, again)


def test_offload_while_the_compute_stream_keeps_writing_reads_the_bytes_of_its_time(tmp_path):
    """A store is ordered after the compute stream's work so far: bytes written later to the same G1 blocks (the
    next request's prefill after a release) never reach the stored chunk."""
    rig = make_rig(tmp_path, device="cuda")
    with rig.engine:
        for seed in range(5, 9):  # back to back, no drain: each new prompt reuses the blocks the last one freed
            prompt = random_tokens(130, seed=seed)
            rig.call(rig.runner(), prompt)
        rig.engine.drain()
        for seed in range(5, 9):
            prompt = random_tokens(130, seed=seed)
            got, hooks = rig.call(rig.runner(), prompt + [1, 2, 3])
            assert hooks.hit_tokens["G2"] == REUSABLE
            assert rig.same_as_reference(prompt + [1, 2, 3], got)
