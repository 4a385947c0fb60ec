"""Engine integration tests: vLLM 0.33 and SGLang 0.5.23 from requirements-engines.txt.

Each test module skips itself (``pytest.importorskip``) when its engine is not installed, so the
rest of the suite runs on a machine without the engines. Modules here import each other by their
top-level names (``vllm_harness``, ``host_copy_spec``, ...): pytest puts this directory on sys.path.
"""

import engines_env  # noqa: F401  (sets the offline environment before any engine import)

import pytest  # noqa: E402


@pytest.fixture
def harness():
    """``harness(extra_config, **kwargs)`` builds a ``VllmSchedulerHarness``; all are closed afterwards."""
    from vllm_harness import VllmSchedulerHarness  # only where vLLM is installed

    made = []

    def build(extra_config, **kwargs):
        made.append(VllmSchedulerHarness(extra_config, **kwargs))
        return made[-1]

    yield build
    for h in made:
        h.close()
