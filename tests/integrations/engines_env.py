"""Shared by the engine integration tests; imports no engine, so it works where none is installed."""

import os

# vLLM and transformers read these at import time: never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ENGINES_MISSING = "engine not installed: pip install --no-deps -r requirements-engines.txt"
