"""kvtier's OffloadingSpec inside vLLM 0.33's real Scheduler and OffloadingConnector (CPU)."""

import pytest
from engines_env import ENGINES_MISSING

pytest.importorskip("vllm.v1.kv_offload.base", reason=ENGINES_MISSING)

import torch
from vllm_harness import VllmSchedulerHarness

from kvtier.integrations.vllm import KvtierOffloadingWorker
from kvtier.layout import vllm_layout

BLOCK = 16
PREFIX = list(range(1, 8 * BLOCK + 1))  # 8 full blocks
PREFIX_BLOCKS = len(PREFIX) // BLOCK
SLOT = 4096  # 2 layers x 1 KiB pages = 2 KiB per block, a host slot rounds to 4 KiB


def kvtier_spec(slots: int, **extra) -> dict:
    return {"spec_name": "KvtierOffloadingSpec", "spec_module_path": "kvtier.integrations.vllm",
            "host_capacity_bytes": slots * SLOT, **extra}


def jobs(steps, kind):
    return [job for step in steps for job in getattr(step, kind).values()]


def hits(steps):
    return {k: v for step in steps for k, v in step.offload_hits.items()}


def test_stores_new_blocks_then_hits_and_loads_the_shared_prefix(harness):
    h = harness(kvtier_spec(32))
    assert type(h.manager).__name__ == "KvtierOffloadingManager"
    h.add_request("a", PREFIX + [900, 901, 902])
    first = h.run()
    (store,) = jobs(first, "store_jobs")
    assert store.req_id == "a" and len(store.src_spec.block_ids) == PREFIX_BLOCKS
    assert not jobs(first, "load_jobs")
    stored = [e for step in first for e in step.stored_events if e.medium == "CPU"]
    assert sum(len(e.block_hashes) for e in stored) == PREFIX_BLOCKS
    assert h.manager.stats()["chunks"] == PREFIX_BLOCKS

    h.drop_gpu_prefix_cache()
    for i, tail in enumerate(([910, 911], [920, 921, 922])):
        h.add_request(f"b{i}", PREFIX + tail)
        steps = h.run()
        if i == 0:
            assert hits(steps) == {"b0": len(PREFIX)}
            (load,) = jobs(steps, "load_jobs")
            assert sorted(load.src_spec.block_ids) == sorted(store.dst_spec.block_ids)
        else:  # now in vLLM's GPU prefix cache again
            assert hits(steps) == {} and not jobs(steps, "load_jobs")
        assert not jobs(steps, "store_jobs")  # never stored twice

    # a request sharing only part of the prefix hits exactly the shared chunks
    h.drop_gpu_prefix_cache()
    h.add_request("c", PREFIX[: 3 * BLOCK] + [7000 + t for t in range(3 * BLOCK)])
    steps = h.run()
    assert hits(steps) == {"c": 3 * BLOCK}
    assert len(jobs(steps, "store_jobs")[0].src_spec.block_ids) == 3  # only the new chunks


def test_small_capacity_evicts_and_reports_removals(harness):
    h = harness(kvtier_spec(PREFIX_BLOCKS))  # room for exactly one prefix
    h.add_request("a", PREFIX + [1])
    h.run()
    h.add_request("other", [5000 + t for t in PREFIX] + [2])
    steps = h.run()
    removed = [e for step in steps for e in step.removed_events if e.medium == "CPU"]
    assert sum(len(e.block_hashes) for e in removed) == PREFIX_BLOCKS
    assert h.manager.stats()["evictions"] == PREFIX_BLOCKS
    h.drop_gpu_prefix_cache()
    h.add_request("a2", PREFIX + [3])
    assert hits(h.run()) == {}


def pinned(lease_s=60.0):
    return {"agent_hints": {"pins": [{"range": {"start": 0, "end": len(PREFIX)}, "lease_s": lease_s}]}}


@pytest.mark.parametrize("with_hints", [True, False])
def test_agent_hints_from_kv_transfer_params_pin_the_prefix(harness, with_hints):
    h = harness(kvtier_spec(12, pin_budget_frac=1.0))
    h.add_request("a", PREFIX + [1], kv_transfer_params=pinned() if with_hints else None)
    h.run()
    h.add_request("other", [5000 + t for t in PREFIX] + [2])  # 8 more chunks into 12 slots
    h.run()
    h.drop_gpu_prefix_cache()
    h.add_request("a2", PREFIX + [3])
    got = hits(h.run()).get("a2", 0)
    if with_hints:
        assert got == len(PREFIX)
    else:  # plain LRU-like policy: the older prefix lost its first chunks
        assert got < len(PREFIX)


def test_bad_agent_hints_are_ignored_not_raised(harness):
    h = harness(kvtier_spec(32))
    h.add_request("a", PREFIX + [1], kv_transfer_params={"agent_hints": {"pins": "everything"}})
    assert len(jobs(h.run(), "store_jobs")) == 1


def test_keys_are_namespaced_and_stable_across_instances(harness, tmp_path):
    raw = bytes(range(32)) + (0).to_bytes(4, "big")
    one, two = harness(kvtier_spec(8), model_dir=str(tmp_path)), harness(kvtier_spec(8), model_dir=str(tmp_path))
    assert one.manager.key(raw) == two.manager.key(raw)  # another process, same model: same key
    assert one.manager.key(raw) != one.manager.key(raw[:-1] + b"\x01")
    other_model = harness(kvtier_spec(8, model_name="another-model"), model_dir=str(tmp_path))
    assert other_model.manager.key(raw) != one.manager.key(raw)
    assert other_model.manager.namespace.prefix.startswith("kvtier/another-model/")


def test_worker_moves_pages_bitwise_through_kvtier_kernels(harness):
    h = harness(kvtier_spec(32), with_worker=True)
    worker = h.worker_connector.connector_worker.worker
    assert isinstance(worker, KvtierOffloadingWorker)
    # the worker's descriptors are those of vLLM's [L, B, H, N, C] allocation in LBHNC order
    names = h.shape.layer_names()
    first = h.kv_caches[names[0]]
    layer_stride = (h.kv_caches[names[1]].data_ptr() - first.data_ptr()) // first.element_size()
    lbhnc = first.as_strided((len(names), *first.shape), (layer_stride, *first.stride()))
    reference = vllm_layout(lbhnc, "LBHNC")
    assert worker.layout.seg_ptrs == reference.seg_ptrs
    assert worker.layout.seg_block_strides == reference.seg_block_strides
    assert worker.layout.block_bytes == reference.block_bytes

    h.add_request("a", PREFIX + [1, 2])
    (store,) = jobs(h.run(), "store_jobs")
    written = {n: [h.block_bytes(n, int(b)).clone() for b in store.src_spec.block_ids] for n in names}
    for n in names:
        h.kv_caches[n].zero_()
    h.drop_gpu_prefix_cache()
    h.add_request("b", PREFIX + [3, 4])
    (load,) = jobs(h.run(), "load_jobs")
    assert len(load.dst_spec.block_ids) == PREFIX_BLOCKS
    for n in names:
        for i, block_id in enumerate(load.dst_spec.block_ids):
            assert torch.equal(h.block_bytes(n, int(block_id)), written[n][i])


def test_chunks_of_several_blocks_round_trip(harness):
    h = harness(kvtier_spec(16, blocks_per_chunk=2), with_worker=True)
    names = h.shape.layer_names()
    h.add_request("a", PREFIX + [1])
    (store,) = jobs(h.run(), "store_jobs")
    assert len(store.dst_spec.block_ids) == PREFIX_BLOCKS // 2
    written = {n: [h.block_bytes(n, int(b)).clone() for b in store.src_spec.block_ids] for n in names}
    for n in names:
        h.kv_caches[n].zero_()
    h.drop_gpu_prefix_cache()
    h.add_request("b", PREFIX + [2])
    (load,) = jobs(h.run(), "load_jobs")
    for n in names:
        for i, block_id in enumerate(load.dst_spec.block_ids):
            assert torch.equal(h.block_bytes(n, int(block_id)), written[n][i])


@pytest.mark.parametrize("extra, error", [
    ({"spec_name": "KvtierOffloadingSpec"}, "Unsupported spec type"),
    ({"spec_name": "KvtierOffloadingSpec", "spec_module_path": "kvtier.integrations.vllm"}, "host_capacity_bytes"),
    (kvtier_spec(0), "holds no chunk"),
    (kvtier_spec(8, host_capacity_byte=1), "unsupported key"),
    (kvtier_spec(8, disk_paht="/tmp/x"), "unsupported key"),
    (kvtier_spec(8, policy="nope"), "policy"),
    (kvtier_spec(8, host_capacity_bytes="lots"), "host_capacity_bytes"),
])
def test_bad_configuration_fails_at_startup(extra, error):
    with pytest.raises(ValueError, match=error):
        VllmSchedulerHarness(extra)
