"""Redis is an optional extra: the plug-ins import and run G2/G3 without it, and a G4 without it is one clear
start-up error naming the extra."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from engines_env import ENGINES_MISSING

pytest.importorskip("vllm.v1.kv_offload.base", reason=ENGINES_MISSING)
pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason=ENGINES_MISSING)

WITHOUT_REDIS = textwrap.dedent("""
    import sys

    class NoRedis:
        def find_spec(self, name, path=None, target=None):
            if name == "redis" or name.startswith("redis."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoRedis())
    import sglang_harness  # SGLang's import needs its torchvision stand-in here
    import kvtier.engine
    from kvtier.integrations import common, sglang
    from kvtier.integrations.vllm import spec as vllm

    for engine_keys in (vllm.VLLM_KEYS, sglang.SGLANG_KEYS):
        common.kvtier_config({"host_capacity_bytes": "1MiB", "disk_path": "/tmp/g3"}, engine_keys, "t")
    try:
        common.kvtier_config({"host_capacity_bytes": "1MiB", "remote_url": "redis://localhost:1"}, vllm.VLLM_KEYS,
                             "t")
    except ImportError as exc:
        print("ERROR:", exc)
    assert "redis" not in sys.modules
""")


def test_the_plugins_import_without_redis_and_a_remote_url_names_the_extra():
    result = subprocess.run([sys.executable, "-c", WITHOUT_REDIS], capture_output=True, text=True,
                            cwd=Path(__file__).parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (error,) = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert "pip install 'kvtier[redis]'" in error
