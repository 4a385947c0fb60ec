"""G3: the disk tier, with real files, O_DIRECT, and faults injected at the syscall boundary."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.config import KvtierConfig
from kvtier.tiers import fileio
from kvtier.tiers.base import TierClosedError
from kvtier.tiers.disk import DirectoryInUseError, DiskTier, extent_bytes_for
from kvtier.tiers.host import HostPool
from kvtier.tiers.slabs import STRIPES
from tests.tiers.helpers import NS, SIZES, open_fds, payloads

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tier(tmp_path: Path):
    t = DiskTier(NS, tmp_path, 64 << 20, io_threads=4, chunk_bytes=max(SIZES))
    yield t
    t.close()


def flip_bit_at(tier: DiskTier, key: int, offset: int) -> None:
    """Flip one bit ``offset`` bytes into ``key``'s extent (0: its header block, 4096: its payload)."""
    path, start = tier.location(key)
    flip_bit(path, start + offset)


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_round_trip_through_pool_slots_and_plain_buffers(tier: DiskTier) -> None:
    data = payloads(SIZES)
    keys = list(range(100, 100 + len(SIZES)))
    with HostPool(len(SIZES) * 2 * (2 << 20), 2 << 20, pin=False) as pool:
        src = pool.alloc(len(SIZES))
        for slot, d in zip(src, data):
            pool.view(slot)[:len(d)] = torch.from_numpy(d)
        assert tier.put_async(keys, [pool.view(s)[:len(d)] for s, d in zip(src, data)]).result() == [True] * len(SIZES)
        dst = pool.alloc(len(SIZES))
        assert tier.get_async(keys, [pool.view(s) for s in dst]).result() == SIZES
        for slot, d in zip(dst, data):
            assert np.array_equal(pool.view(slot)[:len(d)].numpy(), d)
        # exact-size buffers (tail through the tail block) and unaligned ones (bounce buffer)
        exact = [pool.view(s)[:len(d)] for s, d in zip(dst, data)]
        assert tier.get(keys, exact) == SIZES
        # one byte past a page boundary, so surely unaligned (a fresh bytearray may happen to be aligned)
        plain = [memoryview(mmap.mmap(-1, n + 1))[1:] for n in SIZES]
        assert tier.get(keys, plain) == SIZES
        assert all(bytes(p) == d.tobytes() for p, d in zip(plain, data))
    s = tier.stats()
    assert s.puts == len(SIZES) and s.hits == 3 * len(SIZES) and s.corrupt == s.errors == 0
    assert s.bounce_copies == len(SIZES)  # only the unaligned buffers
    assert s.used_bytes == len(SIZES) * extent_bytes_for(max(SIZES)) == len(SIZES) * tier.extent_bytes
    assert tier.clear() == len(SIZES) and tier.contains(keys) == [False] * len(SIZES)
    assert tier.stats().used_bytes == 0


def test_asyncio_callers_await_without_blocking(tier: DiskTier) -> None:
    async def main() -> tuple[list[bool], list[int | None], bytearray]:
        buf = bytearray(5000)
        stored = await tier.put_aio([1], [b"z" * 5000])
        return stored, await tier.get_aio([1], [buf]), buf

    stored, got, buf = asyncio.run(main())
    assert stored == [True] and got == [5000] and buf == b"z" * 5000


def test_extents_are_striped_over_preallocated_slabs(tmp_path: Path) -> None:
    with DiskTier(NS, tmp_path, (STRIPES + 3) * 12288 + 100) as t:
        assert t.extent_bytes is None and t.location(5) is None
        data = bytes(range(256)) * 20
        for key in range(STRIPES + 1):  # the first put sets the extent size
            assert t.put([key], [data if key == 0 else b"x" * 8000]) == [True]
        assert t.extent_bytes == 4096 + 8192 and t.capacity_bytes == (STRIPES + 3) * 12288
        slabs = [t.location(k) for k in range(STRIPES + 1)]
        assert [offset for _, offset in slabs] == [0] * STRIPES + [12288]  # extent e: slab e % STRIPES
        assert len({path for path, _ in slabs}) == STRIPES and slabs[0][0] == slabs[STRIPES][0]
        assert [slabs[i][0].stat().st_size for i in (0, 2, 3)] == [2 * 12288, 2 * 12288, 12288]  # fallocated: 19 extents
        raw = slabs[0][0].read_bytes()
        assert raw[4096:4096 + len(data)] == data and raw[4096 + len(data):12288] == bytes(8192 - len(data))
        assert len(list(t.directory.iterdir())) == STRIPES + 1  # the slabs and the lock


def test_larger_payloads_than_the_extent_are_skipped(tmp_path: Path) -> None:
    with DiskTier(NS, tmp_path, 1 << 20, chunk_bytes=8192) as t:
        assert t.put([1, 2, 3], [bytes(8192), bytes(8193), bytes(1)]) == [True, False, True]
        assert t.get([1, 3], [bytearray(8192), bytearray(1)]) == [8192, 1] and t.stats().put_skipped == 1
    with DiskTier(NS, tmp_path, 1 << 20) as t:  # the geometry comes back from the slab files
        assert t.extent_bytes == 4096 + 8192 and t.contains([1, 2, 3]) == [True, False, True]
    with DiskTier(NS, tmp_path, 1 << 20, chunk_bytes=4096) as t:  # another geometry: the old slabs go
        assert t.contains([1, 3]) == [False, False] and len(list(t.directory.glob("*.kvs"))) == 0
    with pytest.raises(ValueError):
        DiskTier(NS, tmp_path, 1 << 20, chunk_bytes=0)


def test_misses_and_small_buffers(tier: DiskTier) -> None:
    tier.put([1], [bytes(5000)])
    assert tier.get([1, 2], [bytearray(4999), bytearray(10)]) == [None, None]
    assert tier.contains([1, 2]) == [True, False]
    where = tier.location(1)
    assert tier.delete([1, 2]) == [True, False] and tier.location(1) is None
    assert tier.put([3], [bytes(10)]) == [True] and tier.location(3) == where  # the freed extent is reused


def test_an_extent_being_read_is_not_reused_until_the_read_ends(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    data = payloads([9000])[0]
    tier.put([1], [data])
    where = tier.location(1)
    started, gate, real = threading.Event(), threading.Event(), fileio.read_at

    def paused(fd, buffers, offset):
        started.set()
        gate.wait(5)
        return real(fd, buffers, offset)

    monkeypatch.setattr(fileio, "read_at", paused)
    buf = bytearray(9000)
    reading = tier.get_async([1], [buf])
    assert started.wait(5)
    assert tier.delete([1]) == [True]
    assert tier.put([2], [bytes(9000)]) == [True] and tier.location(2) != where  # not over the pinned extent
    gate.set()
    assert reading.result() == [9000] and bytes(buf) == data.tobytes()
    monkeypatch.setattr(fileio, "read_at", real)
    assert tier.put([3], [bytes(10)]) == [True] and tier.location(3) == where  # freed by the last reader


def test_index_is_rebuilt_on_restart_and_damage_dropped(tmp_path: Path) -> None:
    data = payloads([5000, 70000, 4096, 9000])
    with DiskTier(NS, tmp_path, 64 << 20, chunk_bytes=70000) as t:
        assert t.capacity_chunks == (64 << 20) // extent_bytes_for(70000)  # a header page per extent
        for key, d in zip((1, 2, 3, 4), data):  # one by one: extents 0..3 in key order
            assert t.put([key], [d]) == [True]
        where = [t.location(k) for k in (1, 2, 3, 4)]
        assert [offset for _, offset in where] == [0, 0, 0, 0]  # extents 0-3: the first of slabs 0-3
        assert t.delete([3]) == [True]
    slabs = [path for path, _ in where]
    full = slabs[3].stat().st_size
    flip_bit(slabs[0], 10)                                # header of 1 damaged: dropped at rebuild
    flip_bit(slabs[1], 4096 + 12345)                      # payload of 2 damaged: found on read
    os.truncate(slabs[3], 4096 + 4096)                    # 4 cut inside its payload: dropped at rebuild
    directory = slabs[0].parent
    (directory / ".0000000000000009.deadbeef.tmp").write_bytes(b"partial")   # the old format's leftovers
    (directory / "0000000000000009.kvc").write_bytes(b"old")
    with DiskTier(NS, tmp_path, 64 << 20, chunk_bytes=70000) as t:
        # 3 was deleted but its extent kept a valid header: it comes back, checksummed, and is served
        assert t.contains([1, 2, 3, 4]) == [False, True, True, False]
        assert t.stats().corrupt == 2 and not list(directory.glob("*.tmp")) and not list(directory.glob("*.kvc"))
        bufs = [bytearray(70000), bytearray(4096)]
        assert t.get([2, 3], bufs) == [None, 4096] and bytes(bufs[1]) == data[2].tobytes()
        assert t.stats().corrupt == 3 and t.contains([2]) == [False]
        # the freed extents 0, 1 and 3 are reused; writing into the truncated slab preallocates it again
        assert t.put([5, 6, 7], data[:3]) == [True] * 3 and slabs[3].stat().st_size == full
        bufs = [bytearray(70000) for _ in range(3)]  # one each: reads run in parallel and verify in place
        assert t.get([5, 6, 7], bufs) == [5000, 70000, 4096]
        assert all(bytes(b[:len(d)]) == d.tobytes() for b, d in zip(bufs, data))


def test_every_flipped_bit_is_a_miss(tmp_path: Path) -> None:
    data = payloads([6000])[0]
    rng = np.random.default_rng(1)
    with DiskTier(NS, tmp_path, 64 << 20) as t:
        for trial, offset in enumerate([*rng.integers(0, 52, 4), *rng.integers(4096, 4096 + 6000, 12)]):
            t.put([trial], [data])
            flip_bit_at(t, trial, int(offset))
            assert t.get([trial], [bytearray(6000)]) == [None], offset
        assert t.stats().corrupt == 16 and t.stats().hits == 0


def test_truncated_slab_is_never_served(tier: DiskTier) -> None:
    tier.put([7], [bytes(20000)])
    path, offset = tier.location(7)
    os.truncate(path, offset + 4096 + 8192)
    assert tier.get([7], [bytearray(20000)]) == [None]
    assert tier.stats().corrupt == 1


def test_writer_killed_mid_write_is_never_served(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, sys, time
        from kvtier.tiers import fileio
        from kvtier.tiers.disk import DiskTier
        from tests.tiers.helpers import NS
        def half_then_hang(fd, buffers, offset):
            os.pwritev(fd, [buffers[0], memoryview(buffers[1])[:65536]], offset)  # header + part
            print("writing", flush=True)
            time.sleep(60)
        fileio.write_at = half_then_hang
        DiskTier(NS, {str(tmp_path)!r}, 1 << 30).put([42], [os.urandom(1 << 20)])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    slabs = list(tmp_path.rglob("*.kvs"))
    assert len(slabs) == 1  # the torn extent: a valid header, a payload cut short (the rest still zeros)
    with DiskTier(NS, tmp_path, 1 << 30) as t:
        assert t.get([42], [bytearray(1 << 20)]) == [None] and t.stats().corrupt == 1
        assert t.contains([42]) == [False] and t.put([42], [bytes(1 << 20)]) == [True]
        assert t.get([42], [bytearray(1 << 20)]) == [1 << 20]


def test_enospc_skips_writes_and_the_tier_keeps_working(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fileio.write_at

    def full(fd, buffers, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "write_at", full)
    assert tier.put([1, 2], [bytes(5000), bytes(7000)]) == [False, False]
    s = tier.stats()
    assert (s.put_skipped, s.errors, s.used_bytes, s.entries) == (2, 2, 0, 0)
    assert tier.get([1], [bytearray(5000)]) == [None]
    monkeypatch.setattr(fileio, "write_at", real)
    assert tier.put([1], [b"ok"]) == [True] and tier.get([1], [bytearray(2)]) == [2]


def test_enospc_from_fallocate_skips_writes_until_space_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fileio.allocate

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "allocate", full)
    with DiskTier(NS, tmp_path, 1 << 20, chunk_bytes=4096) as t:
        assert t.put([1, 2], [bytes(4096), bytes(10)]) == [False, False]
        s = t.stats()
        assert (s.put_skipped, s.errors, s.used_bytes, s.entries) == (2, 2, 0, 0)
        monkeypatch.setattr(fileio, "allocate", real)
        assert t.put([1], [bytes(4096)]) == [True] and t.get([1], [bytearray(4096)]) == [4096]


def test_short_write_and_eio_on_read_are_counted(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write, real_read = fileio.write_at, fileio.read_at
    monkeypatch.setattr(fileio, "write_at", lambda fd, bufs, off: real_write(fd, bufs[:1], off))
    assert tier.put([1], [bytes(9000)]) == [False]
    monkeypatch.setattr(fileio, "write_at", real_write)
    assert tier.put([1], [bytes(9000)]) == [True]

    def eio(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fileio, "read_at", eio)
    assert tier.get([1], [bytearray(9000)]) == [None]
    monkeypatch.setattr(fileio, "read_at", real_read)
    assert tier.get([1], [bytearray(9000)]) == [9000]
    assert tier.stats().errors == 2


def test_slow_disk_reads_past_deadline_are_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with DiskTier(NS, tmp_path, 64 << 20, io_threads=1) as t:
        t.put(list(range(6)), [bytes(4096)] * 6)
        real = fileio.read_at

        def slow(fd, buffers, offset):
            time.sleep(0.2)
            return real(fd, buffers, offset)

        monkeypatch.setattr(fileio, "read_at", slow)
        start = time.monotonic()
        got = t.get(list(range(6)), [bytearray(4096) for _ in range(6)], timeout_s=0.05)
        assert time.monotonic() - start < 0.5
        assert got[0] == 4096 and got[2:] == [None] * 4


def test_writes_beyond_the_pending_limit_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = fileio.write_at

    def blocked(fd, buffers, offset):
        gate.wait(5)
        return real(fd, buffers, offset)

    monkeypatch.setattr(fileio, "write_at", blocked)
    with DiskTier(NS, tmp_path, 64 << 20, max_pending_bytes=3 * 8192) as t:
        future = t.put_async([1, 2, 3, 4], [bytes(4096)] * 4)
        assert t.put([1], [bytes(4096)]) == [True]  # already being written
        gate.set()
        assert future.result() == [True, True, True, False]
        assert t.stats().put_skipped == 1


def test_a_full_disk_skips_writes_and_never_evicts_on_its_own(tmp_path: Path) -> None:
    size = extent_bytes_for(4096)
    with DiskTier(NS, tmp_path, 3 * size) as t:
        assert t.put([1, 2, 3], [bytes(4096)] * 3) == [True] * 3
        assert t.put([4], [bytes(4096)]) == [False]  # the manager decides what leaves, not the tier
        assert t.contains([1, 2, 3, 4]) == [True, True, True, False] and sorted(t.held_keys()) == [1, 2, 3]
        assert t.delete([2]) == [True] and t.put([4], [bytes(4096)]) == [True]
        assert t.put([9], [bytes(4 * 4096)]) == [False]  # larger than an extent
        assert t.stats().used_bytes == 3 * size and t.stats().put_skipped == 2


def test_rebuild_respects_a_smaller_capacity(tmp_path: Path) -> None:
    with DiskTier(NS, tmp_path, 1 << 20) as t:
        for k in range(5):
            t.put([k], [bytes(4096)])
    with DiskTier(NS, tmp_path, 2 * extent_bytes_for(4096) + 100) as t:  # the extents past the end go
        assert t.contains(list(range(5))) == [True, True, False, False, False]
        assert t.capacity_bytes == 2 * extent_bytes_for(4096)
        assert [p.stat().st_size for p in t.directory.glob("*.kvs")] == [extent_bytes_for(4096)] * 2


def test_buffered_fallback_when_o_direct_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with DiskTier(NS, tmp_path, 1 << 20) as t:
        assert t.put([1], [b"x" * 5000]) == [True] and t.get([1], [bytearray(5000)]) == [5000]
        assert t.stats().buffered_fallbacks == 1 and not t.direct_io


def test_many_threads_put_and_get_without_mixups(tmp_path: Path) -> None:
    tier = DiskTier(NS, tmp_path, 240 * extent_bytes_for(50000), chunk_bytes=50000)
    errors: list[str] = []

    def worker(me: int) -> None:
        rng = np.random.default_rng(me)
        for i in range(40):
            key = me * 1000 + i
            data = rng.integers(0, 256, int(rng.integers(1, 50000)), dtype=np.uint8)
            if tier.put([key], [data]) != [True]:
                errors.append(f"put {key}")
            buf = bytearray(len(data))
            if tier.get([key], [buf]) != [len(data)] or bytes(buf) != data.tobytes():
                errors.append(f"get {key}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and tier.stats().entries == 240
    tier.close()


def test_fds_back_to_baseline_after_close(tmp_path: Path) -> None:
    base = open_fds()
    for _ in range(3):
        with DiskTier(NS, tmp_path, 1 << 20) as t:
            t.put([1, 2], [bytes(100), bytes(5000)])
            t.get([1, 2], [bytearray(100), bytearray(5000)])
    assert open_fds() == base


def test_bad_input_use_after_close_and_a_second_owner(tmp_path: Path) -> None:
    t = DiskTier.from_config(KvtierConfig(disk_path=str(tmp_path), disk_capacity_bytes=1 << 20), NS)
    with pytest.raises(DirectoryInUseError):
        DiskTier(NS, tmp_path, 1 << 20)
    for call in (lambda: t.put([1], []), lambda: t.put([2**64], [b"x"]), lambda: t.put([1], [b""]),
                 lambda: t.get([1], [b"read-only"]), lambda: t.get(["1"], [bytearray(1)])):
        with pytest.raises(ValueError):
            call()
    t.close()
    with pytest.raises(TierClosedError):
        t.put([1], [b"x"])
    with pytest.raises(TierClosedError):
        t.contains([1])
    with pytest.raises(ValueError):
        DiskTier.from_config(KvtierConfig(), NS)
