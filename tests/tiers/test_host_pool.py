"""G2: the host pool's slots and the host tier over it."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.config import KvtierConfig
from kvtier.tiers.base import TierClosedError
from kvtier.tiers.host import HostPool, HostTier, PoolExhausted
from tests.tiers.helpers import NS, payloads


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_slots_are_page_multiples_and_page_aligned() -> None:
    with HostPool(10 * 8192, 5000, pin=False) as pool:
        assert pool.slot_bytes == 8192 and pool.num_slots == 10 and not pool.pinned
        assert pool.buffer.dtype == torch.uint8 and pool.buffer.numel() == 10 * 8192
        for slot in range(pool.num_slots):
            assert pool.address(slot) % 4096 == 0
            assert pool.view(slot).data_ptr() == pool.address(slot)


def test_alloc_is_all_or_nothing_and_free_returns_slots() -> None:
    with HostPool(4 * 4096, 4096, pin=False) as pool:
        a = pool.alloc(3)
        assert len(set(a)) == 3
        assert pool.try_alloc(2) is None and pool.free_slots == 1
        with pytest.raises(PoolExhausted):
            pool.alloc(2)
        pool.free(a[:2])
        b = pool.alloc(3)
        assert not set(b) & {a[2]}
        assert pool.alloc(0) == []


@pytest.mark.parametrize("bad", [[-1], [4], ["0"], [0, 0]])
def test_free_rejects_bad_slots_without_freeing_any(bad: list) -> None:
    with HostPool(4 * 4096, 4096, pin=False) as pool:
        pool.alloc(4)
        with pytest.raises(ValueError):
            pool.free(bad)
        assert pool.free_slots == 0


def test_double_free_is_an_error() -> None:
    with HostPool(4 * 4096, 4096, pin=False) as pool:
        slot = pool.alloc(1)
        pool.free(slot)
        with pytest.raises(ValueError, match="double free"):
            pool.free(slot)


def test_views_share_memory_with_the_buffer() -> None:
    with HostPool(2 * 4096, 4096, pin=False) as pool:
        s = pool.alloc(1)[0]
        pool.view(s)[:3] = torch.tensor([7, 8, 9], dtype=torch.uint8)
        assert pool.buffer[s * 4096:s * 4096 + 3].tolist() == [7, 8, 9]


def test_bad_construction_and_use_after_close() -> None:
    with pytest.raises(ValueError):
        HostPool(4096, 0)
    with pytest.raises(ValueError):
        HostPool(100, 4096)
    pool = HostPool(4096 * 2, 4096, pin=False)
    pool.close()
    pool.close()
    for call in (lambda: pool.alloc(1), lambda: pool.free([0]), lambda: pool.view(0), lambda: pool.address(0)):
        with pytest.raises(TierClosedError):
            call()


def test_concurrent_alloc_free_never_hands_a_slot_out_twice() -> None:
    with HostPool(64 * 4096, 4096, pin=False) as pool:
        owners: dict[int, int] = {}
        lock = threading.Lock()
        errors: list[str] = []

        def worker(me: int) -> None:
            for _ in range(300):
                slots = pool.try_alloc(3)
                if slots is None:
                    continue
                with lock:
                    for s in slots:
                        if s in owners:
                            errors.append(f"slot {s} held by {owners[s]} and {me}")
                        owners[s] = me
                with lock:
                    for s in slots:
                        del owners[s]
                pool.free(slots)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and pool.free_slots == 64


def test_create_close_cycles_do_not_leak_memory() -> None:
    def cycle() -> None:
        pool = HostPool(64 << 20, 1 << 20, pin=False)
        pool.buffer.fill_(1)  # touch every page so it counts in RSS
        pool.close()

    cycle()
    base = rss_bytes()
    for _ in range(10):
        cycle()
    assert rss_bytes() - base < 16 << 20


def test_host_tier_round_trip_and_a_full_tier_skips_writes() -> None:
    pool = HostPool(3 * 8192, 8192, pin=False)
    tier = HostTier(NS, pool)
    data = payloads([100, 8192, 5000, 1])
    assert tier.put([1, 2, 3], data[:3]) == [True, True, True]
    bufs = [bytearray(8192) for _ in range(3)]
    assert tier.get([1, 2, 3], bufs) == [100, 8192, 5000]
    assert all(bytes(b[:len(d)]) == d.tobytes() for b, d in zip(bufs, data))
    assert tier.put([4], data[3:]) == [False]  # full: the manager decides what leaves, not the tier
    assert tier.contains([1, 2, 3, 4]) == [True, True, True, False]
    assert tier.delete([1]) == [True] and tier.put([5], [data[0]]) == [True]
    assert tier.get([1, 99], [bytearray(10), bytearray(10)]) == [None, None]
    assert tier.get([2], [bytearray(10)]) == [None]  # buffer too small: a miss
    s = tier.stats()
    assert (s.puts, s.hits, s.misses, s.put_skipped, s.entries) == (4, 3, 3, 1, 3)
    with pytest.raises(ValueError, match="exceeds"):
        tier.put([6], [bytes(8193)])
    tier.close()
    pool.close()


def test_host_tier_borrow_defers_free_of_a_deleted_entry() -> None:
    with HostPool(2 * 4096, 4096, pin=False) as pool:
        tier = HostTier(NS, pool)
        tier.put([1], [b"abc"])
        with tier.borrow(1) as view:
            assert bytes(view.numpy()) == b"abc"
            assert tier.delete([1]) == [True]
            assert pool.free_slots == 1  # still borrowed
        assert pool.free_slots == 2
        with tier.borrow(1) as view:
            assert view is None


def test_host_tier_bad_input_and_close() -> None:
    cfg = KvtierConfig(host_capacity_bytes=8 * 4096)
    tier = HostTier.from_config(cfg, NS, slot_bytes=4096)
    with pytest.raises(ValueError):
        tier.put([1, 2], [b"x"])
    with pytest.raises(ValueError):
        tier.put([-1], [b"x"])
    with pytest.raises(ValueError):
        tier.put([1], [b""])
    with pytest.raises(ValueError):
        tier.get([1], [b"read-only"])
    with pytest.raises(ValueError):
        tier.get([1], [torch.zeros(4, dtype=torch.float32)])
    tier.close()
    with pytest.raises(TierClosedError):
        tier.get([1], [bytearray(1)])
    with pytest.raises(TierClosedError):
        tier.pool.alloc(1)
