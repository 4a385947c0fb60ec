"""G4: the remote tier against real redis-server processes (started and stopped by the tests)."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from kvtier.chunk import HEADER_BYTES, ChunkHeader
from kvtier.config import KvtierConfig
from kvtier.hashing import Namespace
from kvtier.tiers.base import TierClosedError
from kvtier.tiers.breaker import CircuitBreaker
from kvtier.tiers.remote import INLINE_FLAG, MANIFEST_BYTES, RemoteTier, connect
from tests.conftest import requires_redis
from kvtier.testing.redis_server import RedisClusterServers, RedisServer
from tests.tiers.helpers import NS, SIZES, open_fds, payloads

pytestmark = requires_redis
PART = 64 << 10  # small parts so that several chunks of SIZES are multi-part


def make_tier(server: RedisServer, **kwargs) -> RemoteTier:
    kwargs.setdefault("part_bytes", PART)
    kwargs.setdefault("breaker", CircuitBreaker(failure_threshold=2, base_backoff_s=0.05, max_backoff_s=0.2))
    return RemoteTier(NS, connect(server.url, password=server.password or "", timeout_s=0.3), **kwargs)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def value_keys(server: RedisServer) -> list[bytes]:
    with server.client() as c:
        return sorted(c.keys("*"))


def test_round_trip_single_and_multi_part(redis_server_password: RedisServer) -> None:
    data = payloads(SIZES)
    keys = list(range(1, len(SIZES) + 1))
    with make_tier(redis_server_password) as tier:
        assert tier.put_async(keys, data).result() == [True] * len(SIZES)
        bufs = [bytearray(n) for n in SIZES]
        assert tier.get_async(keys, bufs).result() == SIZES
        assert all(bytes(b) == d.tobytes() for b, d in zip(bufs, data))
        big = [bytearray(n + 10000) for n in SIZES]  # larger buffers: payload lands in front
        assert tier.get(keys, big) == SIZES and bytes(big[-1][:SIZES[-1]]) == data[-1].tobytes()
        assert tier.get([1, 99], [bytearray(0), bytearray(10)]) == [None, None]
        assert tier.contains([1, 99]) == [True, False]
        assert tier.delete([len(SIZES), 99]) == [True, False] and tier.contains([len(SIZES)]) == [False]
        s = tier.stats()
        assert (s.puts, s.hits, s.misses, s.corrupt, s.errors) == (len(SIZES), 2 * len(SIZES), 2, 0, 0)
    names = value_keys(redis_server_password)
    assert all(n.startswith(NS.prefix.encode() + b"/{") for n in names)
    assert sum(b"/p" not in n for n in names) == len(SIZES) - 1  # one manifest per chunk left


def test_wrong_password_is_misses_not_exceptions(redis_server_password: RedisServer) -> None:
    client = connect(redis_server_password.url, password="wrong", timeout_s=0.3)
    with RemoteTier(NS, client) as tier:
        assert tier.put([1], [b"x"]) == [False] and tier.get([1], [bytearray(1)]) == [None]
        assert tier.contains([1]) == [False] and tier.stats().errors >= 2


def test_kill_and_restart_become_misses_then_recover(redis_server: RedisServer) -> None:
    data = payloads([100_000])[0]
    with make_tier(redis_server) as tier:
        assert tier.put([1], [data]) == [True]
        redis_server.kill()
        for _ in range(5):
            assert tier.get([1], [bytearray(100_000)]) == [None]
            assert tier.put([2], [data]) == [False]
        assert tier.stats().breaker_opens >= 1
        redis_server.restart()  # empty again: persistence is off
        wait_until(lambda: tier.put([3], [data]) == [True])
        buf = bytearray(100_000)
        assert tier.get([3], [buf]) == [100_000] and bytes(buf) == data.tobytes()
        assert tier.breaker.state == "closed"


def test_slow_server_times_out_into_misses(redis_server: RedisServer) -> None:
    with make_tier(redis_server) as tier:
        tier.put([1], [b"abc"])
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert tier.get([1], [bytearray(3)]) == [None]
            assert time.monotonic() - start < 2.0
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: tier.get([1], [bytearray(3)]) == [3])


@pytest.mark.parametrize("where", ["manifest-header", "manifest-part-size", "first-part", "last-part"])
def test_flipped_bits_in_values_are_misses_and_deleted(redis_server: RedisServer, where: str) -> None:
    data = payloads([3 * PART + 5])[0]
    with make_tier(redis_server) as tier, redis_server.client() as raw:
        rng = np.random.default_rng(len(where))
        for trial in range(5):
            assert tier.put([trial], [data]) == [True]
            name = {"manifest-header": tier.manifest_key(trial), "manifest-part-size": tier.manifest_key(trial),
                    "first-part": tier.part_keys(trial, 4)[0], "last-part": tier.part_keys(trial, 4)[3]}[where]
            value = bytearray(raw.get(name))
            at = {"manifest-header": int(rng.integers(0, 52)), "manifest-part-size": 52}.get(
                where, int(rng.integers(0, len(value))))
            value[at] ^= 1 << int(rng.integers(0, 8))
            raw.set(name, bytes(value))
            assert tier.get([trial], [bytearray(len(data))]) == [None]
            assert tier.contains([trial]) == [False]
        assert tier.stats().corrupt == 5
    assert value_keys(redis_server) == []  # damaged chunks were deleted, parts included


def test_partial_writes_are_never_hits(redis_server: RedisServer) -> None:
    data = payloads([4 * PART])[0]
    with make_tier(redis_server) as tier, redis_server.client() as raw:
        tier.put([1], [data])
        raw.delete(tier.part_keys(1, 4)[2])  # a part lost (e.g. evicted by the server)
        assert tier.get([1], [bytearray(len(data))]) == [None] and tier.stats().corrupt == 1
        for i, name in enumerate(tier.part_keys(2, 4)):  # parts written, writer died before the manifest
            raw.set(name, data[i * PART:(i + 1) * PART].tobytes())
        assert tier.get([2], [bytearray(len(data))]) == [None] and tier.contains([2]) == [False]


def test_namespaces_and_salts_do_not_share_chunks(redis_server: RedisServer) -> None:
    other = Namespace(NS.model, NS.dtype, NS.layout, salt="tenant-b")
    with make_tier(redis_server) as a, RemoteTier(other, connect(redis_server.url)) as b:
        a.put([7], [b"tenant a"])
        assert b.get([7], [bytearray(8)]) == [None] and b.contains([7]) == [False]
        b.put(list(range(2500)), [b"tenant b"] * 2500)  # more than one SCAN page's pipeline
        assert b.clear() == 2500  # its own namespace only
        assert a.contains([7]) == [True] and b.contains([7, 2499]) == [False, False]


def test_ttl_expires_chunks(redis_server: RedisServer) -> None:
    with make_tier(redis_server, ttl_s=1) as tier, redis_server.client() as raw:
        tier.put([1], [bytes(3 * PART)])
        assert all(0 < raw.ttl(n) <= 1 for n in [tier.manifest_key(1), *tier.part_keys(1, 3)])


def test_from_config_and_many_threads(redis_server_password: RedisServer) -> None:
    cfg = KvtierConfig(remote_url=redis_server_password.url, remote_password=redis_server_password.password,
                       remote_part_bytes=PART, remote_connections=3)
    errors: list[str] = []
    with RemoteTier.from_config(cfg, NS) as tier:
        def worker(me: int) -> None:
            rng = np.random.default_rng(me)
            for i in range(15):
                keys = [me * 1000 + i * 10 + j for j in range(4)]
                data = [rng.integers(0, 256, int(rng.integers(1, 200_000)), dtype=np.uint8) for _ in keys]
                if tier.put(keys, data) != [True] * 4:
                    errors.append(f"put {keys}")
                bufs = [bytearray(len(d)) for d in data]
                if tier.get(keys, bufs) != [len(d) for d in data] or any(
                        bytes(b) != d.tobytes() for b, d in zip(bufs, data)):
                    errors.append(f"get {keys}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and tier.stats().hits == 6 * 15 * 4


def test_bad_input_use_after_close_and_fds(redis_server: RedisServer) -> None:
    base = open_fds()
    tier = make_tier(redis_server)
    tier.put([1], [b"x"])
    for call in (lambda: tier.put([1, 2], [b"x"]), lambda: tier.put([-5], [b"x"]), lambda: tier.put([1], [b""]),
                 lambda: tier.get([1], [b"ro"]), lambda: tier.contains(["k"])):
        with pytest.raises(ValueError):
            call()
    tier.close()
    for call in (lambda: tier.put([1], [b"x"]), lambda: tier.get([1], [bytearray(1)]), lambda: tier.contains([1]),
                 lambda: tier.delete([1])):
        with pytest.raises(TierClosedError):
            call()
    assert open_fds() == base
    with pytest.raises(ValueError):
        RemoteTier.from_config(KvtierConfig(), NS)


def test_redis_cluster_keeps_a_chunks_parts_on_one_shard() -> None:
    data = payloads([3 * PART + 1, 100])
    with RedisClusterServers(masters=3) as cluster:
        client = connect(cluster.url, timeout_s=1.0)
        with RemoteTier(NS, client, part_bytes=PART) as tier:
            keys = list(range(1, 31))
            assert tier.put(keys, [data[k % 2] for k in keys]) == [True] * 30
            bufs = [bytearray(len(data[k % 2])) for k in keys]
            assert tier.get(keys, bufs) == [len(data[k % 2]) for k in keys]
            assert all(bytes(b) == data[k % 2].tobytes() for b, k in zip(bufs, keys))
            assert tier.delete([1]) == [True] and tier.contains([1, 2]) == [False, True]
            slots = {client.keyslot(n) for n in [tier.manifest_key(3), *tier.part_keys(3, 4)]}
            assert len(slots) == 1
            shards = {client.keyslot(tier.manifest_key(k)) * 3 // 16384 for k in keys}
            assert len(shards) > 1  # different chunks spread over the shards
            assert tier.clear() == 15 * (1 + 4) + 14  # every shard: manifests and parts
            assert tier.contains(keys) == [False] * 30


# --- chunks that fit one part: one header+payload value ------------------------------------------------------
def test_one_part_chunks_are_one_value_and_larger_ones_parts(redis_server: RedisServer) -> None:
    small, large = payloads([PART, 4 * PART])
    with make_tier(redis_server) as tier, redis_server.client() as raw:
        assert tier.put([1, 2], [small, large]) == [True, True]
        value = raw.get(tier.manifest_key(1))
        header = ChunkHeader.unpack(value)
        assert header.flags & INLINE_FLAG and len(value) == HEADER_BYTES + PART and value[HEADER_BYTES:] == small.tobytes()
        assert len(raw.get(tier.manifest_key(2))) == MANIFEST_BYTES and all(raw.exists(n) for n in tier.part_keys(2, 4))
        assert value_keys(redis_server) == sorted(n.encode() for n in [tier.manifest_key(1), tier.manifest_key(2),
                                                                       *tier.part_keys(2, 4)])
        bufs = [bytearray(PART), bytearray(4 * PART)]
        assert tier.get([1, 2], bufs) == [PART, 4 * PART] and bufs[0] == small.tobytes() and bufs[1] == large.tobytes()
        assert tier.get([1], [bytearray(PART - 1)]) == [None] and tier.contains([1]) == [True]  # buffer too small
        assert tier.delete([1, 2]) == [True, True] and value_keys(redis_server) == []


@pytest.mark.parametrize("size", [5, 3000, PART])  # 5: shorter than a manifest, read whole; others land in place
@pytest.mark.parametrize("where", ["header", "payload"])
def test_flipped_bits_in_one_value_chunks_are_misses_and_deleted(redis_server: RedisServer, size: int,
                                                                   where: str) -> None:
    data = payloads([size])[0]
    with make_tier(redis_server) as tier, redis_server.client() as raw:
        rng = np.random.default_rng(size)
        for trial in range(4):
            assert tier.put([trial], [data]) == [True]
            value = bytearray(raw.get(tier.manifest_key(trial)))
            at = int(rng.integers(0, HEADER_BYTES)) if where == "header" else int(rng.integers(HEADER_BYTES, len(value)))
            value[at] ^= 1 << int(rng.integers(0, 8))
            raw.set(tier.manifest_key(trial), bytes(value))
            assert tier.get([trial], [bytearray(size)]) == [None]
            assert tier.contains([trial]) == [False]
        assert tier.stats().corrupt == 4
    assert value_keys(redis_server) == []


def test_one_value_of_another_key_or_namespace_is_rejected(redis_server: RedisServer) -> None:
    data = payloads([3000])[0]
    other = Namespace(NS.model, NS.dtype, NS.layout, salt="tenant-b")
    with make_tier(redis_server) as a, make_tier(redis_server) as same, redis_server.client() as raw:
        b = RemoteTier(other, connect(redis_server.url), part_bytes=PART)
        with b:
            assert a.put([1], [data]) == [True]
            value = raw.get(a.manifest_key(1))
            raw.set(a.manifest_key(2), value)  # the right namespace, the wrong key
            raw.set(b.manifest_key(1), value)  # the right key, another tenant's namespace
            assert same.get([2], [bytearray(3000)]) == [None] and same.stats().corrupt == 1
            assert b.get([1], [bytearray(3000)]) == [None] and b.stats().corrupt == 1
            assert raw.exists(a.manifest_key(2), b.manifest_key(1)) == 0 and a.get([1], [bytearray(3000)]) == [3000]


def test_readers_with_another_part_size_read_both_forms(redis_server: RedisServer) -> None:
    data = payloads([3 * PART + 5])[0]
    with make_tier(redis_server) as small, make_tier(redis_server, part_bytes=8 * PART) as big:
        assert small.put([1], [data]) == [True] and big.put([2], [data]) == [True]  # parts; one value
        for reader in (small, big):
            bufs = [bytearray(len(data)), bytearray(len(data))]
            assert reader.get([1, 2], bufs) == [len(data)] * 2 and all(b == data.tobytes() for b in bufs)
        assert small.put([2], [data]) == [True] and big.get([2], [bytearray(len(data))]) == [len(data)]
        assert big.put([1], [data]) == [True] and small.get([1], [bytearray(len(data))]) == [len(data)]
        assert small.delete([1]) == [True] and big.delete([2]) == [True]
        assert small.stats().corrupt == big.stats().corrupt == 0


def test_each_key_resolves_when_its_own_pipeline_does(redis_server: RedisServer) -> None:
    """A batch of 4 x 1 MiB goes out as two pipelines; holding the second back delays only its own keys."""
    data = payloads([1 << 20])[0]
    keys = [1, 2, 3, 4]
    with make_tier(redis_server, connections=2) as tier:
        assert tier.put(keys, [data] * 4) == [True] * 4
        release, run = threading.Event(), tier._guarded

        def second_pipeline_held_back(job, rows, failed):
            if rows.start:
                release.wait(10)
            return run(job, rows, failed)

        tier._guarded = second_pipeline_held_back
        bufs = [bytearray(len(data)) for _ in keys]
        futures = tier.get_rows_async(keys, bufs)
        assert [f.result(timeout=5) for f in futures[:2]] == [len(data)] * 2
        assert not any(f.done() for f in futures[2:])
        release.set()
        assert [f.result(timeout=5) for f in futures[2:]] == [len(data)] * 2
        assert all(bytes(b) == data.tobytes() for b in bufs)
        assert tier.stats().hits == 4


def test_one_value_gets_survive_kill_restart_and_keep_ttl(redis_server: RedisServer) -> None:
    data = payloads([PART])[0]
    with make_tier(redis_server, ttl_s=5) as tier, redis_server.client() as raw:
        assert tier.put(list(range(8)), [data] * 8) == [True] * 8
        assert 0 < raw.ttl(tier.manifest_key(3)) <= 5
        assert tier.get(list(range(8)), [bytearray(PART) for _ in range(8)]) == [PART] * 8  # pooled connections
        redis_server.kill()
        assert tier.get([1], [bytearray(PART)]) == [None]
        redis_server.restart()
        wait_until(lambda: tier.put([9], [data]) == [True])
        bufs = [bytearray(PART) for _ in range(4)]
        assert tier.get([9] * 4, bufs) == [PART] * 4 and all(b == data.tobytes() for b in bufs)


def test_refused_one_value_puts_are_skipped_and_the_connection_stays_usable(redis_server: RedisServer) -> None:
    data = payloads([PART])[0]
    with make_tier(redis_server, connections=1) as tier, redis_server.client() as raw:
        assert tier.put([1], [data]) == [True]
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", raw.info("memory")["used_memory"] + 3 * PART)  # room for a few more
        ok = tier.put(list(range(2, 12)), [data] * 10)  # the server answers OOM errors for the rest
        assert ok[0] and not ok[-1] and tier.stats().put_skipped == ok.count(False)
        assert tier.stats().errors == 0 and tier.breaker.state == "closed"
        bufs = [bytearray(PART), bytearray(PART)]
        assert tier.get([1, 11], bufs) == [PART, None] and bufs[0] == data.tobytes()


def test_resp_send_writes_every_piece_in_order_through_partial_sendmsg() -> None:
    """A small send buffer makes sendmsg stop mid-piece; ``send`` must resume exactly there."""
    import socket

    from kvtier.tiers.resp_direct import send

    rng = np.random.default_rng(5)
    pieces = [b"", *(rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 300_000, 40))]
    pieces.insert(7, memoryview(bytearray(b"in-place")))
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer.settimeout(5.0)  # as redis-py's sockets: sendmsg then returns after a partial write
    received = bytearray()
    total = sum(len(p) for p in pieces)

    def drain() -> None:
        while len(received) < total:
            received.extend(reader.recv(65536))

    thread = threading.Thread(target=drain)
    thread.start()
    with writer, reader:
        send(writer, pieces)
        thread.join(10)
    assert bytes(received) == b"".join(bytes(p) for p in pieces)
