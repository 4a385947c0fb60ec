"""Engine integration tests: vLLM 0.33 and SGLang 0.5.23 from requirements-engines.txt.

Each test module skips itself (``pytest.importorskip``) when its engine is not installed, so the
rest of the suite runs on a machine without the engines. Modules here import each other by their
top-level names (``vllm_harness``, ``host_copy_spec``): pytest puts this directory on sys.path.
"""

import os

# vLLM reads these at import time: never reach a model hub, keep block hashes reproducible.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ENGINES_MISSING = "engine not installed: pip install --no-deps -r requirements-engines.txt"
