"""Engine integration tests: vLLM 0.33 and SGLang 0.5.23 from requirements-engines.txt.

Each test module skips itself (``pytest.importorskip``) when its engine is not installed, so the
rest of the suite runs on a machine without the engines. Modules here import each other by their
top-level names (``vllm_harness``, ``host_copy_spec``, ...): pytest puts this directory on sys.path.
"""

import engines_env  # noqa: F401  (sets the offline environment before any engine import)
