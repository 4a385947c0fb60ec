"""Prove the vLLM harness against vLLM's own offloading specs (kvtier's spec plugs in the same way)."""

import pytest

from engines_env import ENGINES_MISSING

pytest.importorskip("vllm.v1.kv_offload.cpu.spec", reason=ENGINES_MISSING)

import torch  # noqa: E402

from vllm_harness import VllmSchedulerHarness  # noqa: E402

PREFIX = list(range(1, 129))  # 8 full blocks of 16 tokens
PREFIX_BLOCKS = len(PREFIX) // 16


def cpu_spec(cpu_bytes: int) -> dict:
    return {"spec_name": "CPUOffloadingSpec", "cpu_bytes_to_use": cpu_bytes}


def test_store_jobs_then_prefix_hits_and_load_jobs(harness):
    h = harness(cpu_spec(1 << 20))
    h.add_request("a", PREFIX + [900, 901, 902])
    first = h.run()
    store_jobs = [job for step in first for job in step.store_jobs.values()]
    assert [job.req_id for job in store_jobs] == ["a"]
    assert len(store_jobs[0].src_spec.block_ids) == PREFIX_BLOCKS  # full blocks only
    assert not any(step.load_jobs for step in first)
    cpu_stored = [e for step in first for e in step.stored_events if e.medium == "CPU"]
    assert len(cpu_stored) == PREFIX_BLOCKS

    h.drop_gpu_prefix_cache()
    for i, tail in enumerate(([910, 911], [920, 921, 922, 923])):
        h.add_request(f"b{i}", PREFIX + tail)
        steps = h.run()
        hits = {k: v for step in steps for k, v in step.offload_hits.items()}
        loads = [job for step in steps for job in step.load_jobs.values()]
        if i == 0:
            assert hits == {"b0": len(PREFIX)}
            assert [job.req_id for job in loads] == ["b0"]
            assert sorted(loads[0].src_spec.block_ids) == sorted(store_jobs[0].dst_spec.block_ids)
        else:  # the loaded prefix is now in vLLM's GPU prefix cache again: no second load
            assert hits == {} and loads == []
            assert steps[0].local_hits == {"b1": len(PREFIX)}
        # the shared prefix is never stored twice
        assert not any(step.store_jobs for step in steps)


def test_concurrent_requests_share_one_load(harness):
    h = harness(cpu_spec(1 << 20))
    h.add_request("a", PREFIX + [1])
    h.run()
    h.drop_gpu_prefix_cache()
    for i in range(3):
        h.add_request(f"c{i}", PREFIX + [10 + i, 20 + i])
    steps = h.run()
    loads = [job for step in steps for job in step.load_jobs.values()]
    assert [job.req_id for job in loads] == ["c0"]  # c1, c2 wait for it, then hit the GPU cache
    local = {k: v for step in steps for k, v in step.local_hits.items()}
    assert local == {"c0": 0, "c1": len(PREFIX), "c2": len(PREFIX)}


def test_small_capacity_evicts(harness):
    h = harness(cpu_spec(1 << 20))
    (info,) = h.manager.config_info()
    chunk_bytes = info["cpu_kv_cache_size_bytes"] // info["cpu_num_chunks"]
    h.close()
    h = harness(cpu_spec(chunk_bytes * PREFIX_BLOCKS))  # room for exactly one prefix
    h.add_request("a", PREFIX + [1])
    h.run()
    h.add_request("c", [5000 + t for t in PREFIX] + [2])
    steps = h.run()
    removed = [e for step in steps for e in step.removed_events if e.medium == "CPU"]
    assert sum(len(e.block_hashes) for e in removed) == PREFIX_BLOCKS
    h.drop_gpu_prefix_cache()
    h.add_request("a2", PREFIX + [3])
    assert not any(step.offload_hits for step in h.run())


def test_worker_side_round_trips_pages_bitwise(harness):
    h = harness(
        {"spec_name": "HostCopyOffloadingSpec", "spec_module_path": "host_copy_spec",
         "num_chunks": 32},
        with_worker=True,
    )
    layer = h.shape.layer_names()[0]
    cache = h.kv_caches[layer]
    # vLLM 0.33 hands each layer a [B, H, N, C] view of one [L, B, H, N, C] allocation (LBHNC).
    assert h.kv_cache_layout.name == "LBHNC"
    assert cache.shape == (64, h.shape.num_kv_heads, 16, 2 * h.shape.head_size)
    assert cache.stride()[:1] == (h.shape.num_kv_heads * 16 * 2 * h.shape.head_size,)

    h.add_request("a", PREFIX + [1, 2])
    (store,) = [job for step in h.run() for job in step.store_jobs.values()]
    written = {
        name: [h.block_bytes(name, int(b)).clone() for b in store.src_spec.block_ids]
        for name in h.shape.layer_names()
    }
    assert all(w.any() for ws in written.values() for w in ws)

    for name in h.shape.layer_names():
        h.kv_caches[name].zero_()
    h.drop_gpu_prefix_cache()
    h.add_request("b", PREFIX + [3, 4])
    steps = h.run()
    (load,) = [job for step in steps for job in step.load_jobs.values()]
    assert len(load.dst_spec.block_ids) == PREFIX_BLOCKS
    for name in h.shape.layer_names():
        for i, block_id in enumerate(load.dst_spec.block_ids):
            assert torch.equal(h.block_bytes(name, int(block_id)), written[name][i])


@pytest.mark.parametrize(
    "extra_config, error",
    [
        ({"spec_name": "NoSuchSpec"}, "Unsupported spec type"),
        ({"spec_name": "HostCopyOffloadingSpec", "spec_module_path": "host_copy_spec",
          "num_chunks": 0}, "num_chunks"),
        ({"spec_name": "CPUOffloadingSpec", "cpu_bytes_to_use": 1 << 20, "blocks_per_chunk": 0},
         "blocks_per_chunk"),
    ],
)
def test_bad_spec_config_fails_at_startup(extra_config, error):
    # The spec is built when the Scheduler builds its connector: bad config stops start-up.
    with pytest.raises(ValueError, match=error):
        VllmSchedulerHarness(extra_config)
