"""Random KV caches in every supported layout, each with an independent slicing oracle.

The oracle says what a block's chunk record must be ([layer tensor][page bytes], pages in the cache's
physical byte order) using plain indexing of the physical tensors, never the descriptor code under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier import layout as L

DTYPES = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32]


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).flatten()


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Arbitrary bit patterns (NaNs included): the kernels move bytes, so every pattern must survive."""
    n = 1
    for s in shape:
        n *= s
    es = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * es,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(shape).to(device)


@dataclass
class Case:
    name: str
    layout: L.PageLayout
    oracle: Callable[[int], torch.Tensor]   # block id -> expected record bytes
    tensors: list[torch.Tensor]             # the physical allocations (to poison / compare whole caches)


def vllm_case(order: str, dtype: torch.dtype, gen: torch.Generator, device="cpu", L_=3, B=9, H=2, N=4, D=6) -> Case:
    C = 2 * D  # K and V packed, in elements
    dims = dict(L=L_, B=B, H=H, N=N, C=C)
    phys = random_tensor(tuple(dims[d] for d in order), dtype, gen, device)
    kv = phys.permute(*[order.index(d) for d in "LBHNC"])  # logical [L, B, H, N, C]

    def oracle(b: int) -> torch.Tensor:
        parts = []
        for layer in range(L_):
            index = tuple(layer if d == "L" else b if d == "B" else slice(None) for d in order)
            parts.append(_bytes(phys[index]))
        return torch.cat(parts)

    return Case(f"vllm-{order}-{dtype}", L.vllm_layout(kv, order), oracle, [phys])


def paired_case(dtype: torch.dtype, gen: torch.Generator, device="cpu", L_=3, B=7, N=4, H=2, D=5) -> Case:
    per_layer = [random_tensor((2, B, N, H, D), dtype, gen, device) for _ in range(L_)]
    return Case(f"paired-{dtype}", L.paired_kv_layout(per_layer),
                lambda b: torch.cat([_bytes(t[kv, b]) for t in per_layer for kv in (0, 1)]), per_layer)


def runner_case(dtype: torch.dtype, gen: torch.Generator, device="cpu", L_=2, B=6, N=4, H=2, D=8) -> Case:
    """One (L, 2, B, N, H, D) allocation described per layer, as the reference runner holds it."""
    whole = random_tensor((L_, 2, B, N, H, D), dtype, gen, device)
    return Case(f"runner-{dtype}", L.paired_kv_layout([whole[i] for i in range(L_)]),
                lambda b: torch.cat([_bytes(whole[i, kv, b]) for i in range(L_) for kv in (0, 1)]), [whole])


def flashinfer_case(dtype: torch.dtype, gen: torch.Generator, device="cpu", L_=2, B=7, N=4, H=3, D=4) -> Case:
    per_layer = [random_tensor((B, 2, N, H, D), dtype, gen, device) for _ in range(L_)]
    return Case(f"flashinfer-{dtype}", L.flashinfer_layout(per_layer),
                lambda b: torch.cat([_bytes(t[b]) for t in per_layer]), per_layer)


def vllm_mla_case(dtype: torch.dtype, gen: torch.Generator, device="cpu", L_=3, B=8, N=4, C=9) -> Case:
    per_layer = [random_tensor((B, N, C), dtype, gen, device) for _ in range(L_)]
    return Case(f"vllm-mla-{dtype}", L.vllm_mla_layout(per_layer),
                lambda b: torch.cat([_bytes(t[b]) for t in per_layer]), per_layer)


def sglang_mha_case(dtype: torch.dtype, gen: torch.Generator, device="cpu", L_=2, pages=6, ps=4, H=2, D=8) -> Case:
    tokens = pages * ps + ps  # SGLang pools carry a padding page
    ks = [random_tensor((tokens, H, D), dtype, gen, device) for _ in range(L_)]
    vs = [random_tensor((tokens, H, D), dtype, gen, device) for _ in range(L_)]
    return Case(f"sglang-mha-{dtype}", L.sglang_mha_layout(ks, vs, ps),
                lambda b: torch.cat([_bytes(t[b * ps:(b + 1) * ps]) for k, v in zip(ks, vs) for t in (k, v)]),
                ks + vs)


def sglang_mla_case(dtype: torch.dtype, gen: torch.Generator, device="cpu", L_=2, pages=5, ps=8, D=12) -> Case:
    kvs = [random_tensor((pages * ps + 3, 1, D), dtype, gen, device) for _ in range(L_)]
    return Case(f"sglang-mla-{dtype}", L.sglang_mla_layout(kvs, ps),
                lambda b: torch.cat([_bytes(t[b * ps:(b + 1) * ps]) for t in kvs]), kvs)


def all_cases(dtype: torch.dtype, seed: int = 0, device: torch.device | str = "cpu") -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    cases = [vllm_case(order, dtype, gen, device=device) for order in L.VLLM_ORDERS]
    cases += [build(dtype, gen, device=device) for build in (paired_case, runner_case, flashinfer_case, vllm_mla_case,
                                                             sglang_mha_case, sglang_mla_case)]
    return cases
