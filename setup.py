"""Optional native parts of kvtier; a pure-Python install always works and a failed compile only warns.

- ``kvtier._block_index``: the router's hot block index in C (pure-Python fallback and oracle in
  ``kvtier/router/block_index.py``).
- The CUDA copy kernel, compiled ahead of time into a fatbin (sm_80, sm_90 + PTX) where ``nvcc`` exists, so
  the first transfer needs no NVRTC compile. ``KVTIER_BUILD_CUDA=0`` skips it.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CUDA_SOURCE = ROOT / "csrc" / "kvtier_copy.cu"
GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-gencode=arch=compute_90,code=compute_90"]


class OptionalBuildExt(build_ext):
    """Build each extension if possible; a failure is reported and skipped, never fatal."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler at all, etc.
            print(f"warning: kvtier native extensions not built ({exc}); using pure-Python fallbacks")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - one failed extension must not stop the install
            print(f"warning: kvtier extension {ext.name} not built ({exc}); using its pure-Python fallback")


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        editable = getattr(self, "editable_mode", False)
        kernels_dir = (ROOT if editable else Path(self.build_lib)) / "kvtier" / "kernels"
        kernels_dir.mkdir(parents=True, exist_ok=True)
        if not editable:  # wheels carry the source for NVRTC
            (kernels_dir / "_csrc").mkdir(exist_ok=True)
            shutil.copy2(CUDA_SOURCE, kernels_dir / "_csrc" / CUDA_SOURCE.name)
        self._build_fatbin(kernels_dir / "kvtier_copy.fatbin")

    @staticmethod
    def _build_fatbin(target: Path) -> None:
        nvcc = shutil.which("nvcc")
        if os.environ.get("KVTIER_BUILD_CUDA", "1") == "0" or nvcc is None:
            print("kvtier: skipping the CUDA fatbin (no nvcc or KVTIER_BUILD_CUDA=0); NVRTC compiles at first use")
            return
        try:
            subprocess.run([nvcc, "--fatbin", "-O3", *GENCODE, "-o", str(target), str(CUDA_SOURCE)],
                           check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as err:
            print(f"kvtier: CUDA fatbin build failed, continuing without it: {err}")


setup(
    ext_modules=[Extension("kvtier._block_index", ["csrc/block_index.c"], extra_compile_args=["-O3", "-std=c11"])],
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithKernels},
)
