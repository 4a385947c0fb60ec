"""kvtier's OffloadingSpec inside vLLM 0.33's real Scheduler and OffloadingConnector (CPU)."""

import pytest
from engines_env import ENGINES_MISSING

pytest.importorskip("vllm.v1.kv_offload.base", reason=ENGINES_MISSING)

import dataclasses
import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import build_offloading_config
from vllm.v1.kv_offload.base import ReqContext, make_offload_key
from vllm.v1.request import RequestStatus
from vllm_harness import VllmSchedulerHarness

from kvtier.cascade import G2, G3, SPARE_SLOTS
from kvtier.integrations.vllm.spec import KvtierOffloadingSpec
from kvtier.integrations.vllm.worker import KvtierOffloadingWorker
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
    salted = [harness(kvtier_spec(8, cache_salt=salt), model_dir=str(tmp_path)) for salt in ("a", "a", "b")]
    assert salted[0].manager.key(raw) == salted[1].manager.key(raw)  # one deployment's salt: shared
    assert len({salted[0].manager.key(raw), salted[2].manager.key(raw), one.manager.key(raw)}) == 3


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
    (kvtier_spec(0), "holds 0 chunks .* the smallest G2"),
    (kvtier_spec(8, host_capacity_byte=1), "unknown configuration key 'host_capacity_byte'"),
    (kvtier_spec(8, disk_paht="/tmp/x"), "did you mean 'disk_path'"),
    (kvtier_spec(8, policy="nope"), "policy"),
    (kvtier_spec(8, host_capacity_bytes="lots"), "host_capacity_bytes"),
    (kvtier_spec(8, disk_path="/dev/null/g3"), "disk_path=.*cannot be created or written"),
    (kvtier_spec(8, remote_url="http://127.0.0.1:1"), "remote_url expects a URL starting with redis://"),
    (kvtier_spec(8, disk_path="/tmp/g3", disk_capacity_bytes=-5), "disk_capacity_bytes"),
    (kvtier_spec(2, remote_url="redis://127.0.0.1:1"), "beside the 2 spare slots"),
])
def test_bad_configuration_fails_at_startup(extra, error):
    shm_before = set(Path("/dev/shm").glob("kvtier-*"))
    with pytest.raises(ValueError, match=error):
        VllmSchedulerHarness(extra)
    assert set(Path("/dev/shm").glob("kvtier-*")) == shm_before  # nothing left behind by a failed start


def test_preempted_requests_resume_by_loading_their_own_bytes(harness):
    """Too few GPU blocks for three decoding requests: vLLM preempts, then resumes from kvtier's G2."""
    h = harness(kvtier_spec(64), with_worker=True, num_gpu_blocks=14, max_model_len=192)
    req_ids = [f"r{i}" for i in range(3)]

    def expected(first_token: int, position: int, layer: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(first_token * 1000 + position * 10 + layer)
        return torch.randint(0, 256, (h.block_bytes(h.shape.layer_names()[0], 0).numel(),),
                             dtype=torch.uint8, generator=gen)

    def write_kv(block_id: int, position: int, rank: int) -> None:
        """Bytes of the request that owns the block (prompts differ from the first token on)."""
        owner = next(h.request(r) for r in req_ids if r in h.scheduler.requests
                     and block_id in h.scheduler.kv_cache_manager.get_block_ids(r)[0])
        for layer, name in enumerate(h.shape.layer_names()):
            h.kv_caches[name][block_id].view(torch.uint8).view(-1).copy_(
                expected(owner.prompt_token_ids[0], position, layer))

    h.write_kv = write_kv
    for i, req_id in enumerate(req_ids):
        h.add_request(req_id, [1000 * (i + 1) + t for t in range(4 * BLOCK)], max_tokens=3 * BLOCK)
    preempted, checked = set(), 0
    while h.scheduler.has_requests() or h.connector.has_pending_push_work():
        step = h.step()
        preempted |= step.preempted
        for job in step.load_jobs.values():
            first = h.request(job.req_id).prompt_token_ids[0]
            start = job.dst_spec.block_indices[0]
            for i, block_id in enumerate(job.dst_spec.block_ids):
                for layer, name in enumerate(h.shape.layer_names()):
                    assert torch.equal(h.block_bytes(name, int(block_id)), expected(first, start + i, layer))
                checked += 1
        assert len(h.steps) < 400
    assert preempted and checked
    assert all(h.request(r).is_finished() for r in req_ids)


# --- G3 / G4 through the shared G2 region ------------------------------------------------------------------------
OTHER = [5000 + t for t in PREFIX]


def tiered(**lower) -> dict:
    """G2 holds one prefix (plus the spare slots); every chunk seen once may go below. Promotions get 5 s
    unless a test says otherwise, so a loaded CI machine does not turn hits into misses."""
    return kvtier_spec(PREFIX_BLOCKS + SPARE_SLOTS, admission_min_hits=1, **{"lower_tier_deadline_ms": 5000, **lower})


def disk(tmp_path) -> dict:
    return {"disk_path": str(tmp_path / "g3"), "disk_capacity_bytes": 1 << 20}


def lower_tier(kind, tmp_path, request) -> tuple[dict, str]:
    if kind == "disk":
        return disk(tmp_path), "G3"
    return {"remote_url": request.getfixturevalue("redis_server").url, "remote_timeout_s": 0.2}, "G4"


def prefix_keys(h, req_id) -> list[int]:
    return [h.manager.key(make_offload_key(bh, 0)) for bh in h.request(req_id).block_hashes[:PREFIX_BLOCKS]]


def snapshot(h, block_ids, rank: int = 0) -> dict[str, list[torch.Tensor]]:
    return {n: [h.block_bytes(n, int(b), rank).clone() for b in block_ids] for n in h.shape.layer_names()}


def same_bytes(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(
        len(a[n]) == len(b[n]) and all(torch.equal(x, y) for x, y in zip(a[n], b[n])) for n in a)


def demote_prefix(h) -> list[dict[str, list[torch.Tensor]]]:
    """Store PREFIX's chunks in G2, then push them below with another prompt of the same length.

    Returns the stored bytes of each rank's worker (none without workers)."""
    h.add_request("a", PREFIX + [1])
    (store,) = jobs(h.run(), "store_jobs")
    written = [snapshot(h, store.src_spec.block_ids, rank) for rank in range(len(h.rank_workers))]
    h.add_request("other", OTHER + [2])
    h.run()
    h.manager.drain()
    return written


def forget_g1(h) -> None:
    for kv_caches in h.rank_kv_caches:
        for cache in kv_caches.values():
            cache.zero_()
    h.drop_gpu_prefix_cache()


@pytest.mark.parametrize("kind", ["disk", "remote"])
def test_chunks_only_below_g2_are_promoted_then_loaded_bitwise(harness, tmp_path, request, kind):
    extra, tier = lower_tier(kind, tmp_path, request)
    h = harness(tiered(**extra), with_worker=True)
    (written,) = demote_prefix(h)
    keys = prefix_keys(h, "a")
    assert set(keys) <= h.manager.held(tier) and not set(keys) & h.manager.held("G2")
    demotion_events = [e for step in h.steps[-3:] for e in step.stored_events if e.medium == "STORAGE"]
    assert sum(len(e.block_hashes) for e in demotion_events) == PREFIX_BLOCKS

    forget_g1(h)
    h.add_request("b", PREFIX + [3])
    steps = h.run()
    answers = [answer for step in steps for req, answer in step.lookups if req == "b"]
    assert answers[0] == "HIT_PENDING" and "HIT" in answers  # promotions started, vLLM asks again
    first_load = next(i for i, step in enumerate(steps) if step.load_jobs)
    assert any(answer == "HIT_PENDING" for step in steps[:first_load] for _, answer in step.lookups)
    assert hits(steps) == {"b": len(PREFIX)}
    (load,) = jobs(steps, "load_jobs")
    assert same_bytes(snapshot(h, load.dst_spec.block_ids), written)
    assert set(keys) <= h.manager.held("G2")  # promoted, and still below too (write once, read many)
    assert set(keys) <= h.manager.held(tier)
    assert any(e.medium == "CPU" for step in steps for e in step.stored_events)


def corrupt_extents(root) -> None:
    """Flip a byte in every 4 KiB page of every slab file: each extent's header or payload fails its checksum."""
    for path in root.rglob("*"):
        if path.is_file() and path.stat().st_size:
            data = bytearray(path.read_bytes())
            for at in range(100, len(data), 4096):
                data[at] ^= 0xFF
            path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["disk", "remote"])
def test_a_damaged_or_lost_lower_tier_is_a_miss_and_the_prefix_is_recomputed(harness, tmp_path, request, kind):
    extra, tier = lower_tier(kind, tmp_path, request)
    h = harness(tiered(**extra, lower_tier_deadline_ms=10_000), with_worker=True)  # a failure, not a late read
    demote_prefix(h)
    keys = prefix_keys(h, "a")
    assert set(keys) <= h.manager.held(tier)
    if kind == "disk":
        corrupt_extents(tmp_path / "g3")
    else:
        request.getfixturevalue("redis_server").kill()

    forget_g1(h)
    h.add_request("b", PREFIX + [3])
    steps = h.run()
    assert hits(steps) == {} and not jobs(steps, "load_jobs")
    assert sum(step.scheduled_tokens.get("b", 0) for step in steps) == len(PREFIX) + 1  # all recomputed
    answers = [answer for step in steps for req, answer in step.lookups if req == "b"]
    assert "HIT_PENDING" in answers and answers[-1] == "MISS"
    h.manager.drain()  # promotions of chunks behind the first miss may still be failing in the background
    # every chunk that was read is forgotten where it was damaged, and reported so; chunks vLLM never asked
    # about again after the first miss (or that found G2 without a free slot) were never read, so stay listed
    forgotten = set(keys) - h.manager.held(tier)
    assert forgotten
    steps += h.run()   # the removal events of late failures go out with the next step
    removed = [e for step in steps for e in step.removed_events if e.medium == "STORAGE"]
    assert sum(len(e.block_hashes) for e in removed) >= len(forgotten) * (PREFIX_BLOCKS // len(keys))
    assert h.manager.metrics.errors.labels(tier, "get")._value.get() >= 1


def delay(tier, method: str, delay_s: float) -> None:
    """Make a tier's ``get_async`` or ``put_async`` answer ``delay_s`` late (a busy disk or server)."""
    call = getattr(tier, method)

    def late(keys, buffers):
        out = Future()
        threading.Timer(delay_s, lambda: out.set_result(call(keys, buffers).result())).start()
        return out

    setattr(tier, method, late)


def test_a_promotion_past_the_deadline_is_a_miss_but_still_lands_in_g2(harness, tmp_path):
    h = harness(tiered(**disk(tmp_path), lower_tier_deadline_ms=50))
    demote_prefix(h)
    delay(h.manager.tiers[G3], "get_async", 0.3)
    forget_g1(h)
    h.add_request("b", PREFIX + [3])
    steps = h.run()
    assert hits(steps) == {}
    answers = [answer for step in steps for req, answer in step.lookups if req == "b"]
    assert answers[0] == "HIT_PENDING" and answers[-1] == "MISS"
    assert sum(step.scheduled_tokens.get("b", 0) for step in steps) == len(PREFIX) + 1
    h.manager.drain()
    assert set(prefix_keys(h, "a")) <= h.manager.held("G2")


@pytest.mark.parametrize("returns", [True, False])
def test_a_session_that_says_it_returns_finds_its_chunks_prefetched_into_g2(harness, tmp_path, returns):
    h = harness(tiered(**disk(tmp_path)))
    hints = {"agent_hints": {"session_id": "agent-1", "next_call_delay_s": 3.0}} if returns else {}
    h.add_request("a", PREFIX + [1], max_tokens=12, kv_transfer_params=hints)  # decodes while...
    for _ in range(2):
        h.step()
    h.add_request("other", OTHER + [2])  # ...another prompt pushes its chunks below G2
    while "other" not in h.steps[-1].scheduled_tokens:
        h.step()
    h.step()  # other's store job
    h.manager.drain()
    keys = prefix_keys(h, "a")
    assert set(keys) <= h.manager.held("G3") and not set(keys) & h.manager.held("G2")
    assert not h.request("a").is_finished()
    h.run()  # "a" finishes
    h.manager.drain()
    assert (set(keys) <= h.manager.held("G2")) == returns

    forget_g1(h)
    h.add_request("b", PREFIX + [3])
    steps = h.run()
    answers = [answer for step in steps for req, answer in step.lookups if req == "b"]
    assert (answers[0] == "HIT") == returns and hits(steps) == {"b": len(PREFIX)}


def test_self_describing_storage_removals_name_every_block_of_a_chunk(harness, tmp_path):
    """2 blocks per chunk: a chunk's STORAGE removal (G3 full) comes after its CPU removal (the demotion);
    vLLM keeps the block metadata for it because the STORAGE store said a removal would follow."""
    chunks = PREFIX_BLOCKS // 2
    h = harness(kvtier_spec(chunks + SPARE_SLOTS, blocks_per_chunk=2, admission_min_hits=1,
                            self_describing_kv_events=True, disk_path=str(tmp_path),
                            disk_capacity_bytes=(chunks + SPARE_SLOTS) * 4096))
    for i in range(3):
        h.add_request(f"r{i}", [5000 * i + t for t in PREFIX] + [1])
        h.run()
        h.manager.drain()
    h.step()
    removed = [e for step in h.steps for e in step.removed_events if e.medium == "STORAGE"]
    assert removed and all(len(e.block_hashes) % 2 == 0 for e in removed)


def test_a_reset_with_a_store_in_flight_neither_stalls_nor_leaks(harness):
    """vLLM never completes the jobs in flight at a reset: their chunks are misses until it reports them
    flushed, then forgotten with their readers."""
    h = harness(kvtier_spec(32), with_worker=True)
    h.add_request("a", PREFIX + [1])
    while not h.steps or not h.steps[-1].store_jobs:
        h.step()
    assert h.scheduler.reset_prefix_cache(reset_connector=True)  # the store job is still in flight
    h.run()
    h.drop_gpu_prefix_cache()
    h.add_request("b", PREFIX + [2])
    h.run(idle_timeout_s=5)
    assert h.request("b").is_finished()
    with h.manager.lock:
        assert not h.manager.cascade.writing(G2) and not h.manager.manager._busy


def test_a_reset_during_a_load_releases_its_readers(harness):
    """With asynchronous scheduling the reset can fall between schedule() and update_from_output()."""
    h = harness(kvtier_spec(32), with_worker=True)
    h.add_request("a", PREFIX + [1])
    h.run()
    h.drop_gpu_prefix_cache()
    h.add_request("b", PREFIX + [2], max_tokens=4)
    schedule, reset_during = h.scheduler.schedule, []

    def schedule_then_reset():
        out = schedule()
        if out.kv_connector_metadata.load_jobs and not reset_during:
            reset_during.append(len(h.manager.manager._busy))
            h.scheduler.reset_connector_cache()
        return out

    h.scheduler.schedule = schedule_then_reset
    h.run()
    assert reset_during == [PREFIX_BLOCKS] and not h.manager.manager._busy


def test_chunks_stored_between_a_reset_and_its_flush_survive_the_flush(harness):
    h = harness(kvtier_spec(32), with_worker=True)
    h.add_request("a", PREFIX + [1])
    while not h.steps or not h.steps[-1].store_jobs:
        h.step()
    assert h.scheduler.reset_prefix_cache(reset_connector=True)  # the store job is in flight: fenced
    late, ctx = make_offload_key(b"\x01" * 32, 0), ReqContext("late")
    with h.manager.lock:  # stored after the reset, before the workers report the old job
        h.manager.on_new_request(ctx)
        h.manager.complete_store(h.manager.prepare_store([late], ctx).keys_to_store, ctx)
    h.run()  # the flush comes in
    assert h.manager.held("G2") == {h.manager.key(late)}


def test_a_promotion_in_flight_at_a_reset_is_never_served(harness, tmp_path):
    """reset_prefix_cache after a weight update must not let pre-reset KV back in through a read in flight."""
    h = harness(tiered(**disk(tmp_path)))
    demote_prefix(h)
    delay(h.manager.tiers[G3], "get_async", 0.3)
    forget_g1(h)
    h.add_request("b", PREFIX + [3])
    h.step()  # promotions started
    assert h.manager.has_pending_work()
    h.scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    h.step()
    assert h.scheduler.reset_prefix_cache(reset_connector=True)
    h.manager.drain()
    keys = set(prefix_keys(h, "a"))
    assert not keys & (h.manager.held("G2") | h.manager.held("G3"))
    h.drop_gpu_prefix_cache()
    h.add_request("c", PREFIX + [4])
    assert hits(h.run()) == {}


def test_a_chunk_whose_demotion_write_is_stuck_is_recomputed_after_the_deadline(harness, tmp_path):
    h = harness(tiered(**disk(tmp_path), lower_tier_deadline_ms=50))
    g3, gate = h.manager.tiers[G3], threading.Event()
    put = g3.put
    g3.put = lambda keys, views: gate.wait(10) and put(keys, views)  # a stuck disk holds the mover
    try:
        demote_prefix(h)
        forget_g1(h)
        h.add_request("b", PREFIX + [3])
        start = time.monotonic()
        while not any(step.scheduled_tokens.get("b") for step in h.steps):
            assert time.monotonic() - start < 5
            h.step()
        answers = [answer for step in h.steps for req, answer in step.lookups if req == "b"]
        assert answers[0] == "HIT_PENDING" and answers[-1] == "MISS"
    finally:
        gate.set()
    h.run()
    assert sum(step.scheduled_tokens.get("b", 0) for step in h.steps) == len(PREFIX) + 1


def long_prefix_only_in_g3(h) -> tuple[list[int], list[int]]:
    """A 16-chunk prompt whose chunks all sit in G3 only, twice the chunks G2 holds."""
    long = list(range(1, 16 * BLOCK + 1))

    def push_down(i):
        h.add_request(f"o{i}", [7000 + 1000 * i + t for t in range(8 * BLOCK)] + [3])
        h.run()
        h.manager.drain()

    h.add_request("x", long[:8 * BLOCK] + [1])
    h.run()
    push_down(0)
    h.drop_gpu_prefix_cache()
    h.add_request("y", long + [2])
    h.run()
    h.manager.drain()
    push_down(1)
    keys = [h.manager.key(make_offload_key(bh, 0)) for bh in h.request("y").block_hashes[:16]]
    assert set(keys) <= h.manager.held("G3")
    h.drop_gpu_prefix_cache()
    return long, keys


def test_a_prefix_twice_the_size_of_g2_loads_what_fits_without_thrashing(harness, tmp_path):
    """Chunks answered HIT are held until their load is planned: later promotions cannot evict them."""
    h = harness(tiered(**disk(tmp_path)))
    long, _ = long_prefix_only_in_g3(h)
    promoted = h.manager.metrics.bytes_moved.labels("promote_G3")
    before = promoted._value.get()
    h.add_request("z", long + [4])
    steps = h.run()
    assert hits(steps).get("z", 0) >= 8 * BLOCK
    assert (promoted._value.get() - before) / h.manager.chunk_bytes <= 16


def test_a_promotion_without_a_free_slot_after_evicting_is_a_miss_not_an_error(harness, tmp_path):
    h = harness(tiered(**disk(tmp_path)))
    long, keys = long_prefix_only_in_g3(h)
    h.add_request("x2", long[:8 * BLOCK] + [5])  # chunks 0..7 back in G2
    h.run()
    h.manager.drain()
    assert set(keys[:8]) <= h.manager.held("G2")
    h.drop_gpu_prefix_cache()
    pool, try_alloc = h.manager.host.pool, h.manager.host.pool.try_alloc
    pool.try_alloc = lambda n: None  # as when the mover's G3 -> G4 copy just took the last free slot
    h.add_request("z", long + [4])
    h.step()
    pool.try_alloc = try_alloc
    steps = h.run()
    assert hits(h.steps[-len(steps) - 1:]).get("z", 0) >= 8 * BLOCK


def test_a_chunk_looked_up_before_its_demotion_is_written_is_not_lost(harness, tmp_path):
    h = harness(tiered(**disk(tmp_path)))
    delay(h.manager.tiers[G3], "put_async", 0.3)  # a disk busy with other writes
    h.add_request("a", PREFIX + [1])
    h.run()
    h.add_request("other", OTHER + [2])
    h.run()  # a's chunks are on their way to G3
    keys = prefix_keys(h, "a")
    assert set(keys) <= h.manager.held("G3")
    h.drop_gpu_prefix_cache()
    h.add_request("b", PREFIX + [3])
    steps = h.run()
    answers = [answer for step in steps for req, answer in step.lookups if req == "b"]
    assert answers[0] == "HIT_PENDING" and hits(steps) == {"b": len(PREFIX)}


def test_chunks_the_policy_declines_are_an_empty_answer_and_leave_no_state(harness):
    """TinyLFU declines chunks seen once against frequent ones: vLLM must not retry them every step, and the
    manager keeps no key mapping for chunks no tier holds."""
    h = harness(kvtier_spec(PREFIX_BLOCKS, policy="tinylfu"))
    h.add_request("a", PREFIX + [1])
    h.run()
    for i in range(2):  # loaded twice: frequent
        h.drop_gpu_prefix_cache()
        h.add_request(f"b{i}", PREFIX + [2 + i])
        h.run()
    prepare_store, answers = h.manager.prepare_store, []
    h.manager.prepare_store = lambda keys, ctx: answers.append(prepare_store(keys, ctx)) or answers[-1]
    for i in range(5):
        h.add_request(f"n{i}", [5000 + 1000 * i + t for t in PREFIX] + [9], max_tokens=24)
        h.run()
    assert answers and all(a is not None and not a.keys_to_store for a in answers)
    assert len(h.manager._offload_key) == PREFIX_BLOCKS


def test_data_parallel_engines_get_a_disk_directory_each(harness, tmp_path):
    h = harness(tiered(**disk(tmp_path)))
    base = build_offloading_config(h.vllm_config, h.kv_cache_config)

    def engine(dp_index: int):
        config = dataclasses.replace(base, engine_id=f"dp-{uuid.uuid4()}", parallel=dataclasses.replace(
            base.parallel, data_parallel_index=dp_index, data_parallel_size=3))
        return KvtierOffloadingSpec(config).get_manager()

    managers = [engine(1), engine(2)]  # the harness's own engine is DP index 0
    try:
        assert {p.name for p in (tmp_path / "g3").iterdir()} == {"dp0", "dp1", "dp2"}
        with pytest.raises(ValueError, match="its own disk_path"):
            engine(1)
    finally:
        for manager in managers:
            manager.shutdown()


def test_ephemeral_and_unadmitted_chunks_never_go_below_g2(harness, tmp_path):
    h = harness(kvtier_spec(PREFIX_BLOCKS + SPARE_SLOTS, admission_min_hits=2, **disk(tmp_path)))
    ephemeral = {"agent_hints": {"ephemeral": [{"start": 0, "end": len(PREFIX)}]}}
    h.add_request("a", PREFIX + [1], kv_transfer_params=ephemeral)
    h.run()
    h.add_request("other", OTHER + [2])  # seen once: below the admission floor
    h.run()
    h.add_request("third", [9000 + t for t in PREFIX] + [3])
    h.run()
    h.manager.drain()
    assert not h.manager.held("G3")
    assert h.manager.stats("G3")["refused"] == PREFIX_BLOCKS  # "other", seen once; "a" is not even offered


def shm_names(h) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"kvtier-{h.vllm_config.kv_transfer_config.engine_id}-*"))


def test_shared_region_names_are_released(harness):
    h = harness(kvtier_spec(8), with_worker=True)
    assert shm_names(h) == []  # scheduler and worker both mapped it: the name is gone, the memory is not
    h.add_request("a", PREFIX + [1])
    assert jobs(h.run(), "store_jobs")
    alone = VllmSchedulerHarness(kvtier_spec(8))  # no worker ever joins
    assert len(shm_names(alone)) == 1
    alone.close()
    assert shm_names(alone) == []


def test_tensor_parallel_ranks_each_get_their_own_bytes_back_through_one_scheduler(harness, tmp_path):
    """tensor_parallel_size=2 in vLLM's own ParallelConfig: one scheduler-side manager, a worker per rank."""
    h = harness(tiered(**disk(tmp_path)), with_worker=True, tensor_parallel_size=2)
    assert h.manager.namespace.tp_size == 2 and len(h.manager.tiers[G3].ranks) == 2
    written_by_rank = demote_prefix(h)
    keys = prefix_keys(h, "a")
    assert set(keys) <= h.manager.held("G3")
    assert h.manager.tiers[G3].stats().puts == 2 * PREFIX_BLOCKS  # one entry per rank for each chunk

    forget_g1(h)
    h.add_request("b", PREFIX + [3])
    steps = h.run()
    assert hits(steps) == {"b": len(PREFIX)}
    (load,) = jobs(steps, "load_jobs")
    for rank, written in enumerate(written_by_rank):
        assert same_bytes(snapshot(h, load.dst_spec.block_ids, rank), written)
    assert not same_bytes(*written_by_rank)
    engine_id = h.vllm_config.kv_transfer_config.engine_id
    h.close()
    assert not list(Path("/dev/shm").glob(f"kvtier-{engine_id}-*"))


# --- a random workload through everything at once ----------------------------------------------------------------
@pytest.mark.parametrize("seed, with_redis, write_through", [(1, False, False), (2, False, False), (3, True, False),
                                                            (4, True, False), (5, False, True), (6, True, True)])
def test_random_sessions_with_preemption_aborts_and_resets_load_only_their_own_bytes(harness, tmp_path, request,
                                                                                    seed, with_redis, write_through):
    """Shared prefixes, a G2 of 12 chunks over G3 (and a 16-chunk G3 over Redis), 40 GPU blocks (preemption and GPU
    prefix-cache evictions), random aborts and connector resets. Every load must bring back exactly the bytes
    computed for that prefix, and at the end nothing may stay held, pending, landing or mapped."""
    rng = random.Random(seed)
    lower = disk(tmp_path)
    if with_redis:  # G3 overflows into G4 through the mover's G3 -> G4 moves
        lower = {**lower, "disk_capacity_bytes": (16 + SPARE_SLOTS) * 4096,
                 "remote_url": request.getfixturevalue("redis_server").url}
    h = harness(kvtier_spec(12 + SPARE_SLOTS, admission_min_hits=1, lower_tier_deadline_ms=5000,
                            write_through=write_through, **lower),
                with_worker=True, num_gpu_blocks=40, max_model_len=256)
    page = h.block_bytes(h.shape.layer_names()[0], 0).numel()
    live: list[str] = []

    def expected(block_hash: bytes | None, layer: int) -> torch.Tensor:
        """The bytes of a block depend only on the prefix up to it (its hash), as real KV does."""
        seed_of = int.from_bytes(block_hash[:7], "little") if block_hash else 0
        return torch.randint(0, 256, (page,), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(seed_of * 4 + layer))

    def hash_at(req_id: str, position: int) -> bytes | None:
        hashes = h.request(req_id).block_hashes
        return bytes(hashes[position]) if position < len(hashes) else None

    def write_kv(block_id: int, position: int, rank: int) -> None:
        owner = next(r for r in live if r in h.scheduler.requests
                     and block_id in h.scheduler.kv_cache_manager.get_block_ids(r)[0])
        for layer, name in enumerate(h.shape.layer_names()):
            h.kv_caches[name][block_id].view(torch.uint8).view(-1).copy_(expected(hash_at(owner, position), layer))

    h.write_kv = write_kv
    prefixes = [[1000 * (p + 1) + t for t in range(rng.choice([2, 4, 6]) * BLOCK)] for p in range(10)]
    loaded = 0

    def check_loads(step) -> None:
        """Every block a step loaded holds its prefix's bytes; counted wherever it happens (on a loaded machine
        promotions and Redis probes land later, and the loads with them: in the final run)."""
        nonlocal loaded
        for job in step.load_jobs.values():
            start = job.dst_spec.block_indices[0]
            for i, block_id in enumerate(job.dst_spec.block_ids):
                want = hash_at(job.req_id, start + i)
                for layer, name in enumerate(h.shape.layer_names()):
                    assert torch.equal(h.block_bytes(name, int(block_id)), expected(want, layer))
                loaded += 1

    for n in range(60):
        req_id = f"r{n}"
        suffix = [rng.randrange(50_000, 60_000) for _ in range(rng.randrange(1, 2 * BLOCK))]
        h.add_request(req_id, rng.choice(prefixes) + suffix, max_tokens=rng.randrange(1, 48))
        live.append(req_id)
        for _ in range(rng.randrange(1, 4)):
            check_loads(h.step())
        running = [r for r in live if r in h.scheduler.requests]
        if running and rng.random() < 0.1:
            h.scheduler.finish_requests([rng.choice(running)], RequestStatus.FINISHED_ABORTED)
        if rng.random() < 0.04:
            h.scheduler.reset_connector_cache()  # jobs may be in flight; vLLM never completes them
    h.run(max_steps=400, each_step=check_loads)
    h.manager.drain()
    h.step()  # promotions that landed after the last lookup settle; nothing is left to schedule
    m = h.manager
    with m.lock:
        m.manager.check_invariants()
        assert not m._protected and not m._job_readers
        assert not m.cascade.promotions_in_flight() and not m.cascade.demotions_in_flight()
        assert not m._fenced_readers and not m._fenced_stores
        assert not m.manager._busy
        assert not any(t.pending for t in m.manager.tiers)
        held = set().union(*(t.sizes for t in m.manager.tiers))
        assert set(m._offload_key) == held
    assert loaded > 0 and any(step.preempted for step in h.steps)
    assert m.tiers[G3].stats().put_skipped == 0  # the manager made room (and demoted) before the disk was full
    if with_redis:
        assert m.metrics.demotions.labels("G2" if write_through else "G3", "G4")._value.get() > 0


def test_stores_wait_for_slots_held_by_demotions_so_every_request_is_offloaded(harness, tmp_path):
    """G2 holds one prompt; each next prompt evicts it, and its demotions hold every free slot until the disk
    wrote them. The disk writes only once a store is waiting for a slot (or the step ended): a store refused
    in the step its one-token request ends is never offered again."""
    h = harness(tiered(**disk(tmp_path)))
    m, disk_ready = h.manager, threading.Event()
    put_async, schedule_end = m.tiers[G3].put_async, m.on_schedule_end

    def slow_put(keys, buffers):
        out = Future()
        threading.Thread(target=lambda: (disk_ready.wait(), out.set_result(put_async(keys, buffers).result()))).start()
        return out

    class WaitingOpensTheDisk:
        def __init__(self, landed):
            self.landed = landed

        def wait(self, timeout=None):
            disk_ready.set()
            return self.landed.wait(timeout)

        def notify_all(self):
            self.landed.notify_all()

    def step_ended(context):
        disk_ready.set()
        schedule_end(context)

    m.tiers[G3].put_async, m.on_schedule_end = slow_put, step_ended
    m._landed = WaitingOpensTheDisk(getattr(m, "_landed", None))
    prompts = {f"r{i}": [10_000 * (i + 1) + t for t in PREFIX] + [1] for i in range(4)}
    try:
        for req_id, prompt in prompts.items():
            disk_ready.clear()
            h.add_request(req_id, prompt)
            h.run()
    finally:
        disk_ready.set()  # demotions queued after the last step's end write now
    m.drain()
    held = m.held("G2") | m.held("G3")
    assert {r: set(prefix_keys(h, r)) <= held for r in prompts} == {r: True for r in prompts}


def z_lookups(h) -> tuple[list, ReqContext]:
    """The offload keys of the 16-chunk prompt ``long_prefix_only_in_g3`` left in G3, and a request for them."""
    long, _ = long_prefix_only_in_g3(h)
    ctx = ReqContext("z")
    with h.manager.lock:
        h.manager.on_new_request(ctx)
    return [make_offload_key(bh, 0) for bh in h.request("y").block_hashes[:16]], ctx


def test_a_chunk_promoted_for_a_request_is_not_evicted_by_its_next_promotion(harness, tmp_path):
    """vLLM takes the manager's lock per call, so a promotion answered HIT_PENDING may land in G2 before the same
    lookup pass reaches its next chunk: that chunk's promotion must not evict it (and promote it again later)."""
    h = harness(tiered(**disk(tmp_path)))
    offload, ctx = z_lookups(h)
    m, answers = h.manager, []
    for key in offload[:9]:  # G2 holds 8: the first 8 promotions evict o1's chunks
        with m.lock:
            answers.append(m.lookup(key, ctx).name)
        m.drain()  # the promotion landed (and the demotion it caused was written) before the pass goes on
    assert answers == ["HIT_PENDING"] * 8 + ["MISS"]
    assert {m.key(key) for key in offload[:8]} <= m.held("G2")


def test_a_request_short_of_slots_retries_its_later_chunks_too(harness, tmp_path):
    """A pass that answered RETRY (no free slot) must not promote the request's later chunks when the mover frees
    a slot meanwhile: they would take the room of the chunks before them, and be evicted for those next pass."""
    h = harness(tiered(**disk(tmp_path)))
    offload, ctx = z_lookups(h)
    m, pool = h.manager, h.manager.host.pool
    taken = pool.try_alloc(pool.free_slots)  # as while demotions hold every free slot
    with m.lock:
        answers = [m.lookup(offload[0], ctx).name]
        pool.free(taken)  # the mover wrote them
        answers.append(m.lookup(offload[1], ctx).name)
    assert answers == ["RETRY", "RETRY"] and not m.has_pending_work()
    h.add_request("z", list(range(1, 16 * BLOCK + 1)) + [4])
    assert hits(h.run()).get("z") == 8 * BLOCK  # the next passes promote chunks 0..7, in order


def test_a_store_still_short_of_slots_after_the_wait_is_refused_and_counted_busy(harness, tmp_path, monkeypatch):
    """The disk never writes here: the wait for the demotions' slots ends at lower_tier_deadline_ms (the subject,
    so short), and the refusal shows in vllm:kvtier_refused_store_chunks{reason="busy"}."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats

    from kvtier.integrations.vllm.scheduler import REFUSED_STORES

    h = harness(tiered(**disk(tmp_path), lower_tier_deadline_ms=50))
    g3, gate, counted = h.manager.tiers[G3], threading.Event(), Counter()
    put, increase = g3.put, OffloadingConnectorStats.increase_counter
    g3.put = lambda keys, views: gate.wait() and put(keys, views)  # a stuck disk holds the mover

    def count(stats, name, value=1, labels=()):
        counted[name, tuple(labels)] += value
        return increase(stats, name, value, labels)

    monkeypatch.setattr(OffloadingConnectorStats, "increase_counter", count)
    try:
        h.add_request("a", PREFIX + [1])
        h.run()
        h.add_request("other", OTHER + [2])  # evicts a's chunks: their demotions hold every free slot
        h.run()
    finally:
        gate.set()
    assert counted[REFUSED_STORES, ("busy",)] >= PREFIX_BLOCKS
    assert not set(prefix_keys(h, "other")) & h.manager.held("G2")


def test_interleaved_requests_of_several_sessions_store_each_chunk_for_its_own_session(harness, monkeypatch):
    """Three sessions' requests are scheduled in the same steps (vLLM interleaves them): every chunk is recorded
    for the session of the request that stored it, and vLLM's /metrics counts requests with a session, pins and
    the sessions whose chunks kvtier holds."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats

    from kvtier.integrations.vllm.scheduler import PINNED_CHUNKS, REQUESTS, SESSIONS

    counted, gauges = Counter(), {}
    increase, set_gauge = OffloadingConnectorStats.increase_counter, OffloadingConnectorStats.set_gauge

    def count(stats, name, value=1, labels=()):
        counted[name, tuple(labels)] += value
        return increase(stats, name, value, labels)

    def gauge(stats, name, value, labels=()):
        gauges[name, tuple(labels)] = value
        return set_gauge(stats, name, value, labels)

    monkeypatch.setattr(OffloadingConnectorStats, "increase_counter", count)
    monkeypatch.setattr(OffloadingConnectorStats, "set_gauge", gauge)
    h = harness(kvtier_spec(64, pin_budget_frac=1.0))
    prompts = {s: [10_000 * (i + 1) + t for t in PREFIX] + [1] for i, s in enumerate(("s0", "s1", "s2"))}
    for s, prompt in prompts.items():
        pins = [{"range": {"start": 0, "end": BLOCK}}] if s == "s0" else []
        h.add_request(f"req-{s}", prompt, kv_transfer_params={"agent_hints": {"session_id": s, "pins": pins}})
    h.add_request("anonymous", [90_000 + t for t in PREFIX] + [1])
    steps = h.run()
    assert {job.req_id for step in steps for job in step.store_jobs.values()} >= {f"req-{s}" for s in prompts}
    for s in prompts:
        assert {h.manager.manager.entry(k).session for k in prefix_keys(h, f"req-{s}")} == {s}
    assert {h.manager.manager.entry(k).session for k in prefix_keys(h, "anonymous")} == {None}
    h.manager.get_stats()
    assert counted[REQUESTS, ("session",)] == 3 and counted[REQUESTS, ("no_session",)] == 1
    assert counted[PINNED_CHUNKS, ("pinned",)] == 1
    assert gauges[SESSIONS, ()] == 3
