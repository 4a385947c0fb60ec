"""kvtier's HiCache storage backend created by SGLang 0.5.23's own factory over real host pools (CPU)."""

import pytest
from engines_env import ENGINES_MISSING

pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory", reason=ENGINES_MISSING)

import random
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

KVTIER = {"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang",
          "class_name": "KvtierHiCacheStorage", "interface_v1": 1, "host_capacity_bytes": "1MiB"}


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
    return {**KVTIER, "host_capacity_bytes": pages_in_host * 4096, "disk_path": str(path),
            "disk_capacity_bytes": "4MiB", "disk_fsync": False}


def test_disk_tier_serves_evicted_pages_and_survives_a_restart(backends, tmp_path):
    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, disk_config(tmp_path, 2))
    keys, src, expected = stored_pages(pool, 5, seed=5)
    assert backend.batch_set_v1(keys, src) == [True] * 5  # the host tier keeps the last two
    backend.flush()
    assert backend.host.stats().evictions >= 3
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
    extra = {**disk_config(tmp_path, 4), "remote_url": redis_server.url}
    pools = [make_host_pool("mla", "page_first_direct") for _ in range(2)]
    writer = backends(pools[0], extra, tp_rank=0, tp_size=2)
    reader = backends(pools[1], extra, tp_rank=1, tp_size=2)  # TP workers run at the same time
    assert [type(t).__name__ for t in reader.lower] == ["RemoteTier"]  # a reader rank has no disk of its own
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
    extra = {**disk_config(tmp_path, 2), "remote_url": redis_server.url}
    backend = backends(pool, extra)
    keys, src, _ = stored_pages(pool, 3, seed=11)
    assert backend.batch_set_v1(keys, src) == [True] * 3
    backend.flush()
    assert [t.contains(keys_of(backend, keys)) for t in backend.lower] == [[True] * 3] * 2
    backend.clear()
    assert backend.batch_exists(keys) == 0
    assert [t.contains(keys_of(backend, keys)) for t in backend.lower] == [[False] * 3] * 2
    assert backend.batch_set_v1(keys, src) == [True] * 3 and backend.batch_exists(keys) == 3  # usable after


def keys_of(backend, keys):
    return [backend._key(k) for k in keys]


def test_a_page_being_promoted_counts_as_stored(backends):
    pool = make_host_pool("mha", "page_first")
    backend = backends(pool, KVTIER)
    keys, src, _ = stored_pages(pool, 1, seed=12)
    (key,) = keys_of(backend, keys)
    assert backend.host.reserve(key, backend.layout.block_bytes) is not None  # a read on the prefetch thread
    assert backend.batch_set_v1(keys, src) == [True]
    backend.host.commit(key)


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
    extra = {**KVTIER, "host_capacity_bytes": 4096, "remote_url": redis_server.url, "remote_timeout_s": 0.2}
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


@pytest.mark.parametrize("extra, error", [
    ({k: v for k, v in KVTIER.items() if k != "host_capacity_bytes"}, "host_capacity_bytes"),
    ({**KVTIER, "host_capacity_bytes": 0}, "host_capacity_bytes must be positive"),
    ({**KVTIER, "host_capacity_bytes": 16}, "holds no page"),
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
    assert backend.host.stats().evictions > 0
