"""G4: the remote tier against real redis-server processes (started and stopped by the tests)."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from kvtier.config import KvtierConfig
from kvtier.hashing import Namespace
from kvtier.tiers.base import TierClosedError
from kvtier.tiers.breaker import CircuitBreaker
from kvtier.tiers.remote import RemoteTier, connect
from tests.conftest import requires_redis
from tests.redis_server import RedisClusterServers, RedisServer
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
