"""Engine plug-ins: vLLM 0.33 (``kvtier.integrations.vllm``) and SGLang 0.5.23 (``kvtier.integrations.sglang``).

Each module imports its engine at import time; this package imports neither.
"""
