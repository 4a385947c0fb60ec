"""Bad input is a clear ValueError before anything is touched: the cache and the arena stay as they were."""

import pytest
import torch

from kvtier import layout as L
from kvtier.kernels import available_impls, load, offload
from tests.kernels.caches import all_cases, random_tensor


@pytest.fixture
def case():
    return all_cases(torch.float16, seed=2)[0]


def _unchanged(case, arena, call):
    before = [t.clone() for t in case.tensors]
    arena_before = arena.clone()
    with pytest.raises(ValueError) as err:
        call()
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(case.tensors, before))
    assert torch.equal(arena, arena_before)
    return str(err.value)


def test_bad_batches(case):
    lay = case.layout
    bb = lay.block_bytes
    arena = torch.zeros(4 * bb, dtype=torch.uint8)
    good_offs = [0, bb]
    bad_calls = {
        "out of range": lambda: offload(lay, [0, lay.num_blocks], arena, good_offs),
        "out of range ": lambda: load(lay, [-1, 0], arena, good_offs),
        "unique": lambda: load(lay, [2, 2], arena, good_offs),
        "overlap": lambda: offload(lay, [1, 2], arena, [0, bb - 1]),
        "cannot hold": lambda: offload(lay, [1, 2], arena, [0, 3 * bb + 1]),
        "cannot hold ": lambda: load(lay, [1], arena, [-5]),
        "block ids but": lambda: offload(lay, [1, 2, 3], arena, good_offs),
        "integers": lambda: offload(lay, torch.tensor([1.0, 2.0]), arena, good_offs),
        "one-dimensional": lambda: offload(lay, torch.tensor([[1, 2]]), arena, good_offs),
        "uint8": lambda: offload(lay, [1, 2], arena.view(torch.int16), good_offs),
        "contiguous": lambda: offload(lay, [1], torch.zeros(8 * bb, dtype=torch.uint8)[::2], [0]),
        "unknown transfer": lambda: offload(lay, [1], arena, [0], impl="warp-drive"),
        "not available": lambda: offload(lay, [1], arena, [0], impl="cuda"),
        "sm_budget": lambda: offload(lay, [1], arena, [0], sm_budget=-1),
    }
    for expected, call in bad_calls.items():
        message = _unchanged(case, arena, call)
        assert expected.strip() in message, (expected, message)


def test_cuda_and_staged_are_not_offered_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert set(available_impls(torch.device("cpu"))) <= {"torch", "dma", "triton"}


def test_bad_layouts():
    gen = torch.Generator().manual_seed(0)
    kv = random_tensor((2, 4, 2, 4, 8), torch.float16, gen)  # contiguous: LBHNC
    with pytest.raises(ValueError, match="unknown vLLM KV layout"):
        L.vllm_layout(kv, "XYZ")
    with pytest.raises(ValueError, match="not LBNHC"):
        L.vllm_layout(kv, "LBNHC")
    with pytest.raises(ValueError, match=r"\[L, B, H, N, C\]"):
        L.vllm_layout(kv[0], "LBHNC")
    with pytest.raises(ValueError, match="2, B, N, H, D"):
        L.paired_kv_layout([kv[0]])
    with pytest.raises(ValueError, match="B, 2, N, H, D"):
        L.flashinfer_layout([kv])
    with pytest.raises(ValueError, match="B, N, C"):
        L.vllm_mla_layout([kv])
    with pytest.raises(ValueError, match="number of blocks"):
        L.vllm_mla_layout([kv[0, :, 0], kv[0, :3, 0]])
    with pytest.raises(ValueError, match="page shapes"):
        L.vllm_mla_layout([kv[0, :, 0], kv[0, :, 0, :2]])
    with pytest.raises(ValueError, match="K buffers"):
        L.sglang_mha_layout([kv[0, 0]], [], 2)
    with pytest.raises(ValueError, match="page_size"):
        L.sglang_mla_layout([kv[0, 0]], 0)
    with pytest.raises(ValueError, match="fewer than one page"):
        L.sglang_mla_layout([kv[0, 0]], 64)
    with pytest.raises(ValueError, match="overlap"):
        L.vllm_mla_layout([kv[0, :1, 0].expand(4, 4, 8)])
    with pytest.raises(ValueError, match="no KV tensors"):
        L.build_layout("empty", [])


def test_dispatch_table_is_validated(tmp_path, monkeypatch):
    from kvtier.kernels import dispatch

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"offload": [[16384, "cuda"], [4611686018427387904, "dma"]], "load": []}')
    bad.write_text('{"offload": [[16384, "warp"]]}')
    monkeypatch.setenv(dispatch.DISPATCH_TABLE_ENV, str(good))
    assert dispatch._load_table()["offload"][0] == [16384, "cuda"]
    monkeypatch.setenv(dispatch.DISPATCH_TABLE_ENV, str(bad))
    with pytest.raises(ValueError, match="malformed dispatch row"):
        dispatch._load_table()
