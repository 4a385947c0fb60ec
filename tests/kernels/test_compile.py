"""The GPU code compiles for Ampere and Hopper without a GPU: csrc/ through nvcc, the Triton kernel to PTX
with 16-byte vector accesses when addresses are aligned."""

import re
import shutil
import subprocess

import pytest

from kvtier.kernels.cuda_copy import KERNEL_NAME, source_path

ARCHS = ["sm_80", "sm_90"]


@pytest.mark.parametrize("arch", ARCHS)
def test_csrc_compiles_with_nvcc(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    assert nvcc, "nvcc is required by the test suite (CI machines have it)"
    out = tmp_path / f"k_{arch}.cubin"
    subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-o", str(out), str(source_path())], check=True)
    assert KERNEL_NAME.encode() in out.read_bytes()


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("align,vector", [(16, True), (1, False)])
def test_triton_kernel_compiles_to_ptx(arch, align, vector):
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from kvtier.kernels.triton_copy import _copy_segments

    fn = JITFunction(getattr(_copy_segments, "fn", _copy_segments))  # the interpreter wraps the function
    signature = {name: "*i64" for name in ("seg_ptrs", "seg_strides", "block_ids", "host_ptrs")}
    signature |= {name: "i32" for name in ("num_items", "num_segs", "tiles_per_seg")}
    constants = {"SEG_BYTES": 16389, "BODY_ELEMS": 4096 if align == 16 else 16389, "TAIL_BYTES": 5 if align == 16 else 0,
                 "ELEM": tl.int32 if align == 16 else tl.uint8, "ALIGN": align, "BLOCK": 2048, "TO_HOST": True}
    signature |= {name: "constexpr" for name in constants}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    accesses = set(re.findall(r"(?:ld|st)\.global[.\w]*", kernel.asm["ptx"]))
    assert any("v4.b32" in a for a in accesses) == vector, accesses
