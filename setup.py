"""Optional native build. A pure-Python install always works; where `nvcc` exists the CUDA copy kernel is
compiled ahead of time into a fatbin (sm_80, sm_90 + PTX) so the first transfer needs no NVRTC compile.
Set KVTIER_BUILD_CUDA=0 to skip it; a failed compile is reported and skipped, never fatal."""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CUDA_SOURCE = ROOT / "csrc" / "kvtier_copy.cu"
GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-gencode=arch=compute_90,code=compute_90"]


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        kernels_dir = (ROOT if getattr(self, "editable_mode", False) else Path(self.build_lib)) / "kvtier" / "kernels"
        kernels_dir.mkdir(parents=True, exist_ok=True)
        if not getattr(self, "editable_mode", False):  # wheels carry the source for NVRTC
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


setup(cmdclass={"build_py": BuildPyWithKernels})
