"""The vLLM and SGLang plug-ins read kvtier's settings from their extra config through kvtier's one loader:
both take every ``KvtierConfig`` key and nothing else, and refuse a bad key or value with the same line."""

import pytest
from engines_env import ENGINES_MISSING

pytest.importorskip("vllm.v1.kv_offload.base", reason=ENGINES_MISSING)
pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory", reason=ENGINES_MISSING)

import dataclasses

import sglang_harness
from vllm_harness import VllmSchedulerHarness

from kvtier.config import ConfigError, KvtierConfig
from kvtier.integrations import sglang
from kvtier.integrations.vllm import spec as vllm
from kvtier.manager import ONLINE_POLICIES

VLLM = {"spec_name": "KvtierOffloadingSpec", "spec_module_path": "kvtier.integrations.vllm"}
SGLANG = {"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang", "class_name": "KvtierHiCacheStorage",
          "interface_v1": 1}
# every key of the schema, each away from its default except those that would open a disk or remote tier
NEED_A_TIER = {"disk_path", "remote_url", "remote_tls_ca_file", "remote_tls_cert_file", "remote_tls_key_file"}
EVERY_KEY = dataclasses.asdict(KvtierConfig(
    block_size=32, chunk_blocks=4, cache_salt="tenant", model_name="m", transfer_impl="torch", sm_budget=4,
    host_capacity_bytes=2**20, disk_capacity_bytes=2**30, disk_io_threads=2, disk_use_direct_io=False,
    disk_fsync=True, disk_max_pending_bytes=2**20, remote_password="pw", remote_username="user", remote_ttl_s=60,
    remote_timeout_s=1.0, remote_part_bytes=2**20, remote_connections=2, policy="lru", pin_budget_frac=0.25, tenant_pin_budget_frac=0.5,
    pin_lease_s=5.0, admission_min_hits=3, write_through=True, lower_tier_deadline_ms=50.0, layerwise_load=True,
    events_endpoint="tcp://127.0.0.1:1", events_replay_endpoint="tcp://127.0.0.1:2"))


def vllm_config(extra: dict) -> KvtierConfig:
    harness = VllmSchedulerHarness({**VLLM, **extra})
    try:
        return harness.manager.config
    finally:
        harness.close()


def sglang_config(extra: dict) -> KvtierConfig:
    pool = sglang_harness.make_host_pool("mha", "page_first")
    backend = sglang_harness.make_backend(pool, {**SGLANG, **extra})
    try:
        return backend.cfg
    finally:
        backend.close()


def test_both_plugins_take_every_key_of_the_schema_as_the_loader_reads_it():
    assert set(EVERY_KEY) == {field.name for field in dataclasses.fields(KvtierConfig)}
    assert {k for k, v in EVERY_KEY.items() if v == getattr(KvtierConfig(), k)} == NEED_A_TIER
    for read, engine_keys in ((vllm_config, vllm.VLLM_KEYS), (sglang_config, sglang.SGLANG_KEYS)):
        ours = {k: v for k, v in EVERY_KEY.items() if k not in engine_keys}  # vLLM's block_size is vLLM's own
        assert read(EVERY_KEY) == KvtierConfig.from_mapping(ours)


@pytest.mark.parametrize("extra, line", [
    ({"host_capacity_bytes": "1MiB", "polcy": "lru"}, "unknown configuration key 'polcy' (did you mean 'policy'?)"),
    ({"host_capacity_bytes": "4XB"}, 'host_capacity_bytes expects a byte size (an integer, or like "4GiB", '
                                     "\"512MB\"), got '4XB'"),
    ({"host_capacity_bytes": "1MiB", "policy": "belady"}, f"policy expects one of {', '.join(ONLINE_POLICIES)}, "
                                                          "got 'belady'"),
    ({"host_capacity_bytes": "1MiB", "remote_url": "http://h:1"}, "remote_url expects a URL starting with "
     "redis://, rediss://, redis+cluster://, rediss+cluster://, unix:// (empty: no remote tier), got 'http://h:1'"),
    ({"disk_path": "/tmp/g3"}, "the extra config needs host_capacity_bytes (kvtier's host tier per process, "
                               "e.g. \"8GiB\")"),
])
def test_both_plugins_refuse_a_bad_key_or_value_with_the_loaders_line(extra, line):
    with pytest.raises(ConfigError) as caught:
        VllmSchedulerHarness({**VLLM, **extra})
    assert str(caught.value) == f"KvtierOffloadingSpec: {line}"
    with pytest.raises(ConfigError) as caught:
        sglang_config(extra)
    assert str(caught.value) == f"KvtierHiCacheStorage: {line}"
