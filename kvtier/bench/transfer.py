"""How fast do KV blocks move between the cache and pinned host memory, per implementation?

For each geometry, page size and direction this times every implementation on the same scattered batch
(random block ids, >= 1 GiB on a GPU), verifies every row byte for byte against the torch reference, and
measures the ceiling in the same run: one contiguous pinned copy of the same bytes. GPU rows compare
kvtier-triton, kvtier-cuda, staged, cudaMemcpyBatchAsync, a per-page cudaMemcpyAsync loop and torch
index_select+copy, plus an SM-budget sweep. On CPU the same harness runs the CPU paths against memcpy.

    kvtier bench transfer [--quick] [--json PATH] [--plot PATH] [--write-dispatch PATH]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvtier.bench.common import device_name, machine_line, print_table, pyplot, time_it, write_json
from kvtier.command_options import output_path, positive_int, torch_device
from kvtier.kernels import cuda_copy, dma, reference, staged, triton_copy
from kvtier.kernels.batch import TransferBatch
from kvtier.layout import PageLayout, vllm_layout, vllm_mla_layout

GIB = 2**30
POISON = 0xA5
# What ``impl="auto"`` may pick. Staged transfers are left to an explicit ``transfer_impl: staged``: each takes a
# device buffer as large as its batch (memory a serving engine gave to its KV cache), for at most 3% more
# throughput than the zero-copy kernels (H200, benchmarks/RESULTS.md).
DISPATCHABLE = ("triton", "cuda", "dma")


@dataclass(frozen=True)
class Geometry:
    name: str
    layers: int
    heads: int
    head_dim: int
    tokens_per_block: int
    order: str = "LBHNC"   # "MLA" for a latent cache
    elem_bytes: int = 2    # bf16

    @property
    def page_bytes(self) -> int:
        """Bytes of one block in one layer (K and V together)."""
        per_token = self.head_dim * self.elem_bytes * (1 if self.order == "MLA" else 2 * self.heads)
        return per_token * self.tokens_per_block

    def build(self, total_bytes: int, device: torch.device) -> tuple[PageLayout, list[torch.Tensor]]:
        blocks = max(2, total_bytes // (self.layers * self.page_bytes))
        gen = torch.Generator(device=device).manual_seed(0)
        if self.order == "MLA":
            per_layer = [torch.randint(0, 256, (blocks, self.tokens_per_block, self.head_dim * self.elem_bytes),
                                       dtype=torch.uint8, device=device, generator=gen) for _ in range(self.layers)]
            return vllm_mla_layout(per_layer), per_layer
        dims = dict(L=self.layers, B=blocks, H=self.heads, N=self.tokens_per_block, C=2 * self.head_dim * self.elem_bytes)
        phys = torch.randint(0, 256, tuple(dims[d] for d in self.order), dtype=torch.uint8, device=device, generator=gen)
        kv = phys.permute(*[self.order.index(d) for d in "LBHNC"])
        return vllm_layout(kv, self.order), [phys]


def geometries(quick: bool, on_gpu: bool) -> list[Geometry]:
    tokens = [1, 4, 16, 64, 128] if quick else [1, 2, 4, 8, 16, 32, 64, 128]
    out = [Geometry(f"llama3-8b N={n}", 32, 8, 128, n) for n in tokens]  # pages 4 KiB .. 512 KiB
    out.append(Geometry("llama3-8b LHBNC N=16", 32, 8, 128, 16, order="LHBNC"))  # 8 KiB per-head pieces
    out += [Geometry(f"mla N={n}", 61 if on_gpu else 8, 1, 576, n, order="MLA") for n in (16, 64)]
    return out


def implementations(device: torch.device) -> dict[str, callable]:
    impls = {"torch index_select+copy": lambda b, s: reference.copy(b)}
    if device.type == "cuda":
        if triton_copy.available():
            impls["kvtier-triton"] = triton_copy.copy
        if cuda_copy.available():
            impls["kvtier-cuda"] = cuda_copy.copy
        if staged.available():
            impls["staged"] = staged.copy
        if dma.has_batch_copy():
            impls["cudaMemcpyBatchAsync"] = lambda b, s: dma.copy(b, batched=True)
        impls["cudaMemcpyAsync per page"] = lambda b, s: dma.copy(b, batched=False)
    else:
        impls["memmove per page"] = lambda b, s: dma.copy(b)
    return impls


def dispatch_name(impl: str) -> str | None:
    return {"kvtier-triton": "triton", "kvtier-cuda": "cuda", "staged": "staged",
            "cudaMemcpyBatchAsync": "dma"}.get(impl)


def pcie_info(device: torch.device) -> dict[str, float | int] | None:
    """PCIe generation/width from NVML and the link's theoretical rate per direction (GB/s)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        gen = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)
        width = pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle)
        max_gen = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)
    except pynvml.NVMLError:
        return None
    gt_per_lane = {1: 2.5 * 0.8, 2: 5.0 * 0.8, 3: 8 * 128 / 130, 4: 16 * 128 / 130, 5: 32 * 128 / 130, 6: 64 * 242 / 256}
    return {"gen": gen, "max_gen": max_gen, "width": width, "theoretical_gbps": gt_per_lane.get(gen, 0.0) * width / 8}


def ceiling_gbps(nbytes: int, arena: torch.Tensor, device: torch.device, to_host: bool, repeat: int) -> float:
    """One contiguous copy of the same bytes between the device and pinned host memory (or memcpy on CPU)."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = arena[:nbytes]
    if to_host:
        seconds = time_it(lambda: host.copy_(dev, non_blocking=True), device, repeat)
    else:
        seconds = time_it(lambda: dev.copy_(host, non_blocking=True), device, repeat)
    return nbytes / seconds / 1e9


def run_case(geo: Geometry, total: int, device: torch.device, impls: dict, repeat: int, budgets: list[int],
             bar: tqdm) -> list[dict]:
    layout, tensors = geo.build(total, device)
    n = layout.num_blocks
    ids = torch.randperm(n)
    offsets = torch.arange(n, dtype=torch.int64) * layout.block_bytes
    arena = torch.empty(n * layout.block_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    original = [t.clone() for t in tensors]
    expected = torch.empty_like(arena)
    reference.copy(TransferBatch.build(layout, ids, expected, offsets, True))
    rows = []
    for to_host in (True, False):
        direction = "offload" if to_host else "load"
        ceiling = ceiling_gbps(arena.numel(), arena, device, to_host, repeat)
        batch = TransferBatch.build(layout, ids, arena, offsets, to_host)
        for impl, fn in impls.items():
            for budget in (budgets if dispatch_name(impl) in ("triton", "cuda") else [0]):
                if to_host:
                    arena.fill_(POISON)
                else:
                    arena.copy_(expected)
                    for t in tensors:
                        t.fill_(POISON)
                seconds = time_it(lambda: fn(batch, budget), device, repeat)
                verified = torch.equal(arena, expected) if to_host else \
                    all(torch.equal(t, o) for t, o in zip(tensors, original))
                rows.append({"geometry": geo.name, "impl": impl, "direction": direction, "page_bytes": layout.segment_bytes,
                             "sm_budget": budget or "all", "gbps": batch.nbytes / seconds / 1e9,
                             "ceiling_gbps": ceiling, "verified": bool(verified)})
                rows[-1]["ratio"] = rows[-1]["gbps"] / ceiling
                bar.update(1)
        for t, o in zip(tensors, original):
            t.copy_(o)
    return rows


def best_dispatch(rows: list[dict]) -> dict[str, list[list]]:
    """Per direction and page size, the fastest verified dispatchable implementation at full SM budget."""
    table: dict[str, list[list]] = {}
    for direction in ("offload", "load"):
        best: dict[int, tuple[float, str]] = {}
        for r in rows:
            name = dispatch_name(r["impl"])
            if r["direction"] != direction or not r["verified"] or name not in DISPATCHABLE or r["sm_budget"] != "all":
                continue
            if r["page_bytes"] not in best or r["gbps"] > best[r["page_bytes"]][0]:
                best[r["page_bytes"]] = (r["gbps"], name)
        table[direction] = [[page, impl] for page, (_, impl) in sorted(best.items())]
        if table[direction]:
            table[direction][-1][0] = 2**62  # the largest measured page's pick covers everything above it
    return table


def target_rows(rows: list[dict]) -> list[dict]:
    """The figures the kernel targets are stated in, per direction and page size of the Llama-3-8B rows: the
    best kvtier kernel (Triton or CUDA C, all SMs) against the ceiling and against the per-page copy loop, and the
    best of them with an 8-SM budget against the ceiling."""
    out = []
    sel = [r for r in rows if r["geometry"].startswith("llama3-8b N=") and r["verified"]]
    for direction in ("offload", "load"):
        for page in sorted({r["page_bytes"] for r in sel}):
            here = [r for r in sel if r["direction"] == direction and r["page_bytes"] == page]
            ours = [r for r in here if r["impl"] in ("kvtier-triton", "kvtier-cuda")]
            full = [r for r in ours if r["sm_budget"] == "all"]
            if not full:
                continue
            best = max(full, key=lambda r: r["gbps"])
            loop = [r["gbps"] for r in here if r["impl"] == "cudaMemcpyAsync per page"]
            eight = [r["ratio"] for r in ours if r["sm_budget"] == 8]
            out.append({"direction": direction, "page_bytes": page, "best": best["impl"], "ratio": best["ratio"],
                        "x_per_page_loop": best["gbps"] / loop[0] if loop else None,
                        "ratio_8_sms": max(eight) if eight else None})
    return out


def plot(rows: list[dict], path: str, title: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, direction in zip(axes, ("offload", "load")):
        sel = [r for r in rows if r["direction"] == direction and r["geometry"].startswith("llama3-8b N=")
               and r["sm_budget"] == "all"]
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["page_bytes"], r["gbps"]) for r in sel if r["impl"] == impl)
            ax.plot([p / 1024 for p, _ in pts], [g for _, g in pts], marker="o", label=impl)
        ceil = sorted((r["page_bytes"], r["ceiling_gbps"]) for r in sel if r["impl"] == sel[0]["impl"]) if sel else []
        ax.plot([p / 1024 for p, _ in ceil], [g for _, g in ceil], "k--", label="contiguous copy (ceiling)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("page bytes per layer (KiB)")
        ax.set_title(f"{direction} ({'device->host' if direction == 'offload' else 'host->device'})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer page sizes, smaller transfers")
    parser.add_argument("--json", type=output_path, help="write the rows as JSON here")
    parser.add_argument("--plot", type=output_path, help="write a PNG of GB/s against page size here")
    parser.add_argument("--write-dispatch", type=output_path, help="write the dispatch table (fastest impl per page size) here")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    parser.add_argument("--total-mib", type=positive_int, help="bytes per transfer (default 1024 on GPU, 256 on CPU)")


def run(args: argparse.Namespace) -> int:

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    total = (args.total_mib or (1024 if on_gpu else (32 if args.quick else 256))) * 2**20
    repeat = 3 if args.quick else 5
    impls = implementations(device)
    budgets = [0] if not on_gpu else ([8, 0] if args.quick else [2, 4, 8, 16, 0])
    geos = geometries(args.quick, on_gpu)
    name = device_name(device)
    link = pcie_info(device)
    print(machine_line())
    print(f"device: {name}" + (f"; PCIe gen{link['gen']} x{link['width']} (theoretical {link['theoretical_gbps']:.1f} GB/s "
                                f"per direction)" if link else ""))
    per_case = sum(len(budgets) if dispatch_name(i) in ("triton", "cuda") else 1 for i in impls) * 2
    rows: list[dict] = []

    def payload(complete: bool) -> dict:
        return {"machine": machine_line(), "device": name, "pcie": link, "total_bytes": total, "complete": complete,
                "rows": rows, "targets": target_rows(rows)}

    with tqdm(total=per_case * len(geos), desc="transfers", unit="row") as bar:
        for geo in geos:
            rows += run_case(geo, total, device, impls, repeat, budgets, bar)
            if args.json:  # a run stopped by a time limit (a lent GPU's lease) keeps the rows it measured
                Path(args.json).write_text(json.dumps(payload(False)))

    columns = ["geometry", "impl", "direction", "page_bytes", "sm_budget", "gbps", "ceiling_gbps", "ratio", "verified"]
    print_table(rows, columns, f"transfer throughput on {name}, {total / GIB:.2f} GiB per transfer")
    print_table(target_rows(rows), ["direction", "page_bytes", "best", "ratio", "x_per_page_loop", "ratio_8_sms"],
                "kvtier's best kernel per page size: fraction of the ceiling, speed-up over a cudaMemcpyAsync per "
                "page, fraction of the ceiling with 8 SMs")
    failed = [r for r in rows if not r["verified"]]
    if failed:
        print(f"\n{len(failed)} rows FAILED verification")
    write_json(args.json, payload(True))
    if args.plot:
        plot(rows, args.plot, f"kvtier transfers on {name}")
    if args.write_dispatch:
        table = best_dispatch(rows)
        Path(args.write_dispatch).write_text(json.dumps(table, indent=2))
        print(f"wrote {args.write_dispatch}: {table}")
    return 1 if failed else 0

