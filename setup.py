"""Optional native parts of kvtier. Everything has a pure-Python fallback, so a failed compile only warns:
``pip install`` must succeed on machines without a compiler."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


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


setup(
    ext_modules=[
        Extension("kvtier._block_index", ["csrc/block_index.c"], extra_compile_args=["-O3", "-std=c11"]),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
