"""kvtier's HiCache storage backend created by SGLang 0.5.23's own factory over real host pools (CPU)."""

import pytest
from engines_env import ENGINES_MISSING

pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory", reason=ENGINES_MISSING)

import random
import time
import threading

import torch
from sglang_harness import (
    LAYOUTS,
    fill_pages,
    make_backend,
    make_host_pool,
    page_bytes,
    page_keys,
)

from kvtier.cascade import G2, G3, G4, SPARE_SLOTS

# a generous deadline for reads from disk or Redis: on a busy machine a late read would be a miss, not wrong bytes
KVTIER = {"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang",
          "class_name": "KvtierHiCacheStorage", "interface_v1": 1, "host_capacity_bytes": "1MiB",
          "lower_tier_deadline_ms": 60000}


@pytest.fixture
def backends():
    made = []

    def build(pool, extra, **kwargs):
        made.append(make_backend(pool, extra, **kwargs))
        return made[-1]

    yield build
    for backend in made:
        backend.close()


def stored_pages(pool, n, seed):
    tokens = list(range(100 + seed * 1000, 100 + seed * 1000 + n * pool.page_size))
    indices = pool.alloc(len(tokens))
    fill_pages(pool, indices, seed=seed)
    return page_keys(tokens, pool.page_size), indices, page_bytes(pool, indices)


def read_back(backend, pool, keys, seed=99):
    dst = pool.alloc(len(keys) * pool.page_size)
    fill_pages(pool, dst, seed=seed)
    got = backend.batch_get_v1(keys, dst)
    return got, page_bytes(pool, dst)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_v1_round_trip_is_bitwise(backends, kind, layout):
    pool = make_host_pool(kind, layout)
    backend = backends(pool, KVTIER)
    assert type(backend).__name__ == "KvtierHiCacheStorage"
    # kvtier's descriptor of the pool is exactly SGLang's own page pointers, in SGLang's order
    probe = pool.alloc(2 * pool.page_size)
    ptrs, sizes = pool.get_page_buffer_meta(probe)
    lay = backend.layout
    pages = (probe[::pool.page_size] // pool.page_size).tolist()
    ours = [lay.seg_ptrs[j] + p * lay.seg_block_strides[j] for p in pages for j in range(lay.num_segments)]
    if lay.num_segments == len(ptrs) // 2:
        assert ours == ptrs and set(sizes) == {lay.segment_bytes}
    else:  # segments that sit back to back were merged into one
        assert ours == ptrs[:: len(ptrs) // 2 // lay.num_segments] and sum(sizes) == 2 * lay.block_bytes
    pool.free(probe)

    keys, src, expected = stored_pages(pool, 4, seed=1)
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, src) == [True] * 4
    assert backend.batch_set_v1(keys[:2], src[: 2 * pool.page_size]) == [True] * 2  # already held
    assert backend.batch_exists(keys) == 4
    assert backend.batch_exists(keys[:2] + ["0" * 64] + keys[3:]) == 2
    assert backend.exists(keys[3]) and not backend.exists("f" * 64)

    got, data = read_back(backend, pool, keys)
    assert got == [True] * 4
    assert all(torch.equal(a, b) for a, b in zip(data, expected))
    got, _ = read_back(backend, pool, keys[:1] + ["e" * 64] + keys[2:3])
    assert got == [True, False, False]  # stops at the first miss


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_copying_interface_round_trips(backends, kind):
    pool = make_host_pool(kind, "page_first")
    backend = backends(pool, {k: v for k, v in KVTIER.items() if k != "interface_v1"})
    keys, src, expected = stored_pages(pool, 3, seed=3)
    starts = src[:: pool.page_size].tolist()
    assert backend.batch_set(keys, [pool.get_data_page(i) for i in starts])
    targets = [pool.get_dummy_flat_data_page() for _ in keys]
    out = backend.batch_get(keys, targets)
    assert all(o is t for o, t in zip(out, targets))
    for target, want in zip(targets, expected):
        assert torch.equal(target.contiguous().view(torch.uint8).flatten(), want)
    assert backend.get("d" * 64, pool.get_dummy_flat_data_page()) is None


def disk_config(path, pages_in_host):
    """``pages_in_host`` pages for the manager to keep in G2, beyond the slots pages in flight use; pages seen
    once are demoted (admission off: these tests are about where pages go, not which)."""
    return {**KVTIER, "host_capacity_bytes": (pages_in_host + SPARE_SLOTS) * 4096, "disk_path": str(path),
            "disk_capacity_bytes": "4MiB", "disk_fsync": False, "admission_min_hits": 1}


def lower_tiers(backend):
    return [tier for g, tier in sorted(backend.cascade.tiers.items()) if g > G2]


def test_disk_tier_serves_evicted_pages_and_survives_a_restart(backends, tmp_path):
    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, disk_config(tmp_path, 2))
    keys, src, expected = stored_pages(pool, 5, seed=5)
    assert backend.batch_set_v1(keys, src) == [True] * 5  # the host tier keeps the last two
    backend.flush()
    assert backend.stats("G2")["evictions"] >= 3
    assert backend.batch_exists(keys) == 5  # the rest from disk
    got, data = read_back(backend, pool, keys)
    assert got == [True] * 5 and all(torch.equal(a, b) for a, b in zip(data, expected))
    backend.close()

    # a new process (same model, rank, layout) finds the pages on disk; other namespaces do not
    again = backends(pool, disk_config(tmp_path, 2))
    assert again.batch_exists(keys) == 5
    got, data = read_back(again, pool, keys)
    assert got == [True] * 5 and all(torch.equal(a, b) for a, b in zip(data, expected))
    again.close()
    assert backends(pool, disk_config(tmp_path, 2), model_name="other-model").batch_exists(keys) == 0
    assert backends(pool, disk_config(tmp_path, 2), tp_rank=1, tp_size=2).batch_exists(keys) == 0


def test_mla_ranks_alive_together_share_pages_through_the_remote_tier(backends, tmp_path, redis_server):
    # admission would keep pages seen once off G4; the readers need every page there: the writer writes through
    extra = {**disk_config(tmp_path, 4), "remote_url": redis_server.url, "admission_min_hits": 2}
    pools = [make_host_pool("mla", "page_first_direct") for _ in range(2)]
    writer = backends(pools[0], extra, tp_rank=0, tp_size=2)
    reader = backends(pools[1], extra, tp_rank=1, tp_size=2)  # TP workers run at the same time
    assert [type(t).__name__ for t in lower_tiers(reader)] == ["RemoteTier"]  # a reader rank has no disk of its own
    keys, src, expected = stored_pages(pools[0], 2, seed=7)
    assert writer.batch_set_v1(keys, src) == [True, True]
    writer.flush()
    assert min(writer.batch_exists(keys), reader.batch_exists(keys)) == 2  # SGLang's TP-synced hit count
    got, data = read_back(reader, pools[1], keys)
    assert got == [True, True] and all(torch.equal(a, b) for a, b in zip(data, expected))
    assert reader.batch_set_v1(keys, src) == [True, True]  # not the writer rank: nothing written
    with pytest.raises(ValueError, match="set remote_url"):
        make_backend(pools[0], disk_config(tmp_path, 4), tp_rank=0, tp_size=2)


def test_dp_ranks_get_their_own_disk_directory_and_one_directory_one_process(backends, tmp_path):
    pools = [make_host_pool("mha", "page_first") for _ in range(2)]
    ranks = [backends(pool, disk_config(tmp_path, 2), dp_rank=r) for r, pool in enumerate(pools)]
    assert ranks[0].namespace == ranks[1].namespace  # same heads: pages are interchangeable
    assert {p.name for p in tmp_path.iterdir()} == {"dp0", "dp1"}
    with pytest.raises(ValueError, match="its own disk_path"):  # e.g. two --dp-size replicas, dp_rank 0 both
        make_backend(pools[0], disk_config(tmp_path, 2))


def test_clear_forgets_pages_in_every_tier(backends, tmp_path, redis_server):
    pool = make_host_pool("mha", "page_first")
    extra = {**disk_config(tmp_path, 2), "remote_url": redis_server.url, "write_through": True}
    backend = backends(pool, extra)
    keys, src, _ = stored_pages(pool, 3, seed=11)
    assert backend.batch_set_v1(keys, src) == [True] * 3
    backend.flush()
    assert [t.contains(keys_of(backend, keys)) for t in lower_tiers(backend)] == [[True] * 3] * 2
    backend.clear()
    assert backend.batch_exists(keys) == 0
    assert [t.contains(keys_of(backend, keys)) for t in lower_tiers(backend)] == [[False] * 3] * 2
    assert backend.batch_set_v1(keys, src) == [True] * 3 and backend.batch_exists(keys) == 3  # usable after


def keys_of(backend, keys):
    return [backend._key(k) for k in keys]


def test_a_page_being_written_into_g2_counts_as_stored(backends):
    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, KVTIER)
    keys, src, _ = stored_pages(pool, 1, seed=12)
    (key,) = keys_of(backend, keys)
    with backend.lock:  # another thread (a promotion, a store) has reserved the page's G2 slot
        assert key in backend.cascade.prepare_store([key]).store and backend.cascade.reserve_slot(key) is not None
    assert backend.batch_set_v1(keys, src) == [True] and backend.batch_exists(keys) == 1
    backend.cascade.host.abort(key)
    backend.cascade.complete_store(key, ok=False)


def test_hybrid_sidecar_pools_fail_the_attach(backends):
    from sglang.srt.mem_cache.hicache_storage import PoolName

    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, KVTIER)
    backend.register_mem_host_pool_v2(pool, PoolName.KV)
    backend.on_host_pools_registered()  # the KV pool alone is fine
    backend.register_mem_host_pool_v2(make_host_pool("mha", "page_first"), PoolName.SWA)
    with pytest.raises(ValueError, match="swa"):
        backend.on_host_pools_registered()


def test_pools_with_bytes_outside_kv_buffer_fail_the_attach():
    from sglang.srt.mem_cache.pool_host.mha_mxfp8 import MHATokenToKVPoolMXFP8Host

    real = make_host_pool("mha", "page_first")
    mxfp8 = MHATokenToKVPoolMXFP8Host.__new__(MHATokenToKVPoolMXFP8Host)  # its scales live in k/v_scale_host
    mxfp8.__dict__.update(real.__dict__)
    with pytest.raises(ValueError, match="no storage page format"):
        make_backend(mxfp8, KVTIER)
    real.kv_buffer = (real.kv_buffer[0], real.kv_buffer[1])  # separate K and V buffers
    with pytest.raises(ValueError, match="separate buffers"):
        make_backend(real, KVTIER)


def test_remote_tier_round_trip_and_outage_is_a_miss(backends, redis_server):
    pool = make_host_pool("mha", "layer_first")
    extra = {**KVTIER, "host_capacity_bytes": (1 + SPARE_SLOTS) * 4096, "remote_url": redis_server.url,
             "remote_timeout_s": 2.0, "admission_min_hits": 1}
    backend = backends(pool, extra)
    keys, src, expected = stored_pages(pool, 3, seed=9)
    assert backend.batch_set_v1(keys, src) == [True] * 3  # through a one-page host tier
    backend.flush()
    assert backend.batch_exists(keys) == 3
    got, data = read_back(backend, pool, keys)
    assert got == [True] * 3 and all(torch.equal(a, b) for a, b in zip(data, expected))

    redis_server.kill()
    more, more_src, _ = stored_pages(pool, 2, seed=10)
    backend.batch_set_v1(more, more_src)
    backend.flush()
    assert backend.batch_exists(more[:1]) == 0  # evicted from the host, never reached the dead server
    got, _ = read_back(backend, pool, more[:1])
    assert got == [False]


def test_a_page_read_while_its_demotion_is_being_written_waits_for_the_write(backends, redis_server, monkeypatch):
    """A read of a page evicted a moment ago, whose write into Redis has not ended, waits for that write and
    promotes the page (under a busy machine this happened in CI and the page was a miss)."""
    pool = make_host_pool("mha", "layer_first")
    extra = {**KVTIER, "host_capacity_bytes": (1 + SPARE_SLOTS) * 4096, "remote_url": redis_server.url,
             "remote_timeout_s": 30.0}
    backend = backends(pool, extra)
    keys, src, expected = stored_pages(pool, 2, seed=11)
    cascade, remote = backend.cascade, backend.cascade.tiers[G4]
    gate, real_put = threading.Event(), remote.put

    def put_after_gate(ks, views):
        gate.wait(60)
        return real_put(ks, views)

    class OpensTheGateWhenWaitedOn(type(cascade._landed)):
        def wait(self, timeout=None):
            gate.set()  # someone waits for the write: only now may it end
            return super().wait(timeout)

    monkeypatch.setattr(remote, "put", put_after_gate)
    monkeypatch.setattr(cascade, "_landed", OpensTheGateWhenWaitedOn(cascade.lock))
    assert backend.batch_set_v1(keys, src) == [True, True]  # the second evicts the first: its write waits
    with cascade.lock:
        assert cascade.is_landing(backend._key(keys[0]), G4) and not gate.is_set()
    got, data = read_back(backend, pool, keys[:1])
    assert got == [True] and torch.equal(data[0], expected[0])


@pytest.mark.parametrize("extra, error", [
    ({k: v for k, v in KVTIER.items() if k != "host_capacity_bytes"}, "host_capacity_bytes"),
    ({**KVTIER, "host_capacity_bytes": 0}, "host_capacity_bytes must be positive"),
    ({**KVTIER, "host_capacity_bytes": 16}, "holds 0 pages"),
    ({**KVTIER, "disk_pth": "/tmp/x"}, "unknown configuration key 'disk_pth'"),
    ({**KVTIER, "remote_timeout_s": "soon"}, "remote_timeout_s"),
    ({**KVTIER, "file_storage_path": "/tmp/hicache", "host_capacity_bytes": 0}, "must be positive"),  # SGLang's key is fine
])
def test_bad_configuration_fails_when_attached(extra, error):
    pool = make_host_pool("mha", "page_first")
    with pytest.raises(ValueError, match=error):
        make_backend(pool, extra)


def test_unsupported_pool_layout_fails_when_attached():
    pool = make_host_pool("mha", "page_first")
    pool.layout = "page_head"
    with pytest.raises(ValueError, match="unsupported SGLang host layout"):
        make_backend(pool, KVTIER)


def test_prefetch_and_backup_threads_at_once_never_read_wrong_bytes(backends, tmp_path):
    """SGLang stores from its backup thread while its prefetch thread reads; with a 4-page host tier over disk
    every call evicts, demotes or promotes. A page read back is always the page stored under that key."""
    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, disk_config(tmp_path, 4))
    docs = 12
    tokens = [list(range(10_000 * (d + 1), 10_000 * (d + 1) + 3 * pool.page_size)) for d in range(docs)]
    keys = [page_keys(t, pool.page_size) for t in tokens]
    src, dst = pool.alloc(3 * pool.page_size), pool.alloc(3 * pool.page_size)
    expected = []
    for d in range(docs):
        fill_pages(pool, src, seed=d)
        expected.append(page_bytes(pool, src))
    errors, wrong, hits = [], [], [0]

    def backup() -> None:
        rng = random.Random(1)
        for _ in range(300):
            d = rng.randrange(docs)
            fill_pages(pool, src, seed=d)  # the page bytes of document d
            backend.batch_set_v1(keys[d], src)

    def prefetch() -> None:
        rng = random.Random(2)
        for _ in range(300):
            d = rng.randrange(docs)
            got = backend.batch_get_v1(keys[d], dst)
            assert got == sorted(got, reverse=True)  # a prefix of hits
            data = page_bytes(pool, dst)
            hits[0] += sum(got)
            wrong.extend((d, i) for i, ok in enumerate(got) if ok and not torch.equal(data[i], expected[d][i]))

    def guarded(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in (backup, prefetch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not wrong and hits[0] > 0
    backend.flush()
    assert backend.stats("G2")["evictions"] > 0


# --- the whole block manager under SGLang: the engine's retention rules, through SGLang's own factory ----------

def flood(backend, pool, docs, first_seed=200):
    """Store ``docs`` one-page documents nobody hinted: each evicts what the policy offers first."""
    for d in range(docs):
        keys, src, _ = stored_pages(pool, 1, seed=first_seed + d)
        assert backend.batch_set_v1(keys, src) == [True]


def test_pinned_pages_survive_a_flood_that_evicts_their_neighbours(backends):
    from kvtier.hints import AgentHints, Pin, TokenRange

    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, {**KVTIER, "host_capacity_bytes": 6 * 4096, "policy": "lru"})
    system, src, expected = stored_pages(pool, 2, seed=30)     # system prompt + tools: two pages
    assert backend.batch_set_v1(system, src) == [True, True]
    other, other_src, _ = stored_pages(pool, 2, seed=31)
    assert backend.batch_set_v1(other, other_src) == [True, True]
    hints = AgentHints(pins=[Pin(range=TokenRange(0, 2 * pool.page_size), lease_s=600)])
    assert len(backend.apply_hints(system, hints).pinned) == 2
    flood(backend, pool, 12)
    assert backend.batch_exists(system) == 2 and backend.batch_exists(other) == 0
    got, data = read_back(backend, pool, system)
    assert got == [True, True] and all(torch.equal(a, b) for a, b in zip(data, expected))
    assert backend.stats("G2")["evictions"] == 10  # 14 unpinned pages through the 4 slots the pins leave


def test_ephemeral_pages_go_first_and_never_below_g2(backends, tmp_path):
    from kvtier.hints import AgentHints, TokenRange

    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, {**disk_config(tmp_path, 4), "write_through": True, "policy": "lru"})
    keys, src, _ = stored_pages(pool, 3, seed=40)  # context, context, reasoning
    assert backend.batch_set_v1(keys[:2], src[:2 * pool.page_size]) == [True, True]
    backend.apply_hints(keys, AgentHints(ephemeral=[TokenRange(2 * pool.page_size, 3 * pool.page_size)]))
    assert backend.batch_set_v1(keys, src) == [True] * 3  # the reasoning page is stored after the hint
    backend.apply_hints(keys, AgentHints(ephemeral=[TokenRange(2 * pool.page_size, 3 * pool.page_size)]))
    backend.flush()
    disk = lower_tiers(backend)[0]
    assert disk.contains(keys_of(backend, keys)) == [True, True, False]  # written through, but not the scratch
    flood(backend, pool, 2)  # one page over the four G2 keeps: the ephemeral page is the one evicted
    assert backend.batch_exists(keys) == 2


def test_a_priority_holds_until_its_duration_ends(backends):
    from kvtier.hints import AgentHints, PriorityRange, TokenRange

    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, {**KVTIER, "host_capacity_bytes": 4 * 4096, "policy": "lru"})
    kept, src, _ = stored_pages(pool, 1, seed=50)
    assert backend.batch_set_v1(kept, src) == [True]
    backend.apply_hints(kept, AgentHints(priorities=[PriorityRange(TokenRange(0, pool.page_size), 90, 60.0)]))
    flood(backend, pool, 6, first_seed=300)
    assert backend.batch_exists(kept) == 1  # the oldest page, yet kept over six newer ones
    with backend.lock:
        backend.cascade.manager.tick(now=time.monotonic() + 61)  # the duration is over: back to the policy's order
    flood(backend, pool, 4, first_seed=400)
    assert backend.batch_exists(kept) == 0


def test_admission_keeps_pages_read_too_rarely_off_disk(backends, tmp_path):
    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, {**disk_config(tmp_path, 2), "admission_min_hits": 2, "policy": "lru"})
    once, src, _ = stored_pages(pool, 1, seed=60)
    twice, twice_src, _ = stored_pages(pool, 1, seed=61)
    assert backend.batch_set_v1(once, src) == [True] and backend.batch_set_v1(twice, twice_src) == [True]
    for _ in range(2):  # read back as often as admission_min_hits asks
        assert read_back(backend, pool, twice)[0] == [True]
    flood(backend, pool, 4, first_seed=500)
    backend.flush()
    disk = lower_tiers(backend)[0]
    assert disk.contains(keys_of(backend, once + twice)) == [False, True]


def test_a_prefetch_hint_brings_a_sequence_back_into_g2(backends, tmp_path):
    from kvtier.hints import AgentHints

    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, {**disk_config(tmp_path, 2), "policy": "lru"})
    keys, src, expected = stored_pages(pool, 2, seed=70)
    assert backend.batch_set_v1(keys, src) == [True, True]
    flood(backend, pool, 2, first_seed=600)
    backend.flush()
    ks = set(keys_of(backend, keys))
    with backend.lock:
        assert not ks & set(backend.cascade.held(G2)) and ks <= set(backend.cascade.held(G3))
    backend.apply_hints(keys, AgentHints(prefetch=True))
    backend.flush()
    with backend.lock:
        assert ks <= set(backend.cascade.held(G2))
    got, data = read_back(backend, pool, keys)
    assert got == [True, True] and all(torch.equal(a, b) for a, b in zip(data, expected))


def test_deployments_with_different_cache_salts_never_share_pages(backends, redis_server):
    pools = [make_host_pool("mha", "page_first") for _ in range(3)]
    extra = {**KVTIER, "host_capacity_bytes": 8 * 4096, "remote_url": redis_server.url, "write_through": True,
             "admission_min_hits": 1}
    tenant_a = backends(pools[0], {**extra, "cache_salt": "tenant-a"})
    keys, src, _ = stored_pages(pools[0], 2, seed=80)
    assert tenant_a.batch_set_v1(keys, src) == [True, True]
    tenant_a.flush()
    assert backends(pools[1], {**extra, "cache_salt": "tenant-a"}).batch_exists(keys) == 2  # same salt: shared
    assert backends(pools[2], {**extra, "cache_salt": "tenant-b"}).batch_exists(keys) == 0
