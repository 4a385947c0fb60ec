"""Closing while lower-tier I/O into host slots is still in flight: no memory is freed under it.

Each scenario runs in a subprocess, where touching unmapped memory is an exit code of -11 (SIGSEGV) instead of
a crashed test run. The slow disk's I/O (reads, then the checksum of what landed; writes, checksummed first)
goes on only once close has begun: after the host pool was closed (when it is closed first) or when the disk
tier itself is closed and drains its I/O (the correct order). The scenario also reports whether the host pool
was closed with that I/O still pending.
"""

import pytest

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SLOW_DISK = textwrap.dedent("""
    import sys, tempfile, threading
    from pathlib import Path
    from kvtier.tiers import fileio
    from kvtier.tiers.disk import DiskTier
    from kvtier.tiers.host import HostPool

    landed = threading.Event()  # set once close has begun: see the module docstring
    read_at, write_extent = fileio.read_at, DiskTier._write_extent
    pool_close, disk_close = HostPool.close, DiskTier.close

    def slow_read_at(fd, buffers, offset):
        got = read_at(fd, buffers, offset)
        if len(buffers) > 1:  # a chunk's payload (not a header scan): its checksum is verified after this
            landed.wait()
        return got

    def slow_write_extent(self, key, extent, payload):
        landed.wait()
        return write_extent(self, key, extent, payload)

    closed_with_io_pending = []

    def closing_pool(self):
        closed_with_io_pending.append(not landed.is_set())
        pool_close(self)
        landed.set()

    def closing_disk(self):
        landed.set()
        disk_close(self)

    HostPool.close, DiskTier.close = closing_pool, closing_disk
""")

ENGINE = SLOW_DISK + textwrap.dedent("""
    from kvtier.engine import EngineRequest
    from tests.engine.sessions import make_rig, random_tokens

    prompt = random_tokens(130, seed=1)
    rig = make_rig(Path(tempfile.mkdtemp()), disk=True, write_through=True, lower_tier_deadline_ms=50)
    rig.call(rig.runner(), prompt)
    rig.engine.drain()
    rig.engine.clear("G2")  # held only in G3 now
    fileio.read_at = slow_read_at
    rig.engine.begin(EngineRequest("late", prompt))
    assert rig.engine.lookup("late")["G3"] > 0  # promotions start: G3 reads into reserved G2 slots
    rig.engine.close()
    print("closed with I/O pending:", any(closed_with_io_pending))
""")


SGLANG = SLOW_DISK + textwrap.dedent("""
    import sglang_harness as sg  # first: SGLang's import needs its torchvision stand-in

    pool = sg.make_host_pool("mha", "page_first")
    backend = sg.make_backend(pool, {"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang",
                                     "class_name": "KvtierHiCacheStorage", "interface_v1": 1,
                                     "host_capacity_bytes": 8 * 4096, "disk_path": tempfile.mkdtemp(),
                                     "disk_capacity_bytes": "4MiB"})
    tokens = list(range(100, 100 + 4 * pool.page_size))
    indices = pool.alloc(len(tokens))
    sg.fill_pages(pool, indices, seed=1)
    DiskTier._write_extent = slow_write_extent
    assert backend.batch_set_v1(sg.page_keys(tokens, pool.page_size), indices) == [True] * 4
    def flush_gives_up(timeout_s=30.0):  # as after 30 s of a write-through that outlasts it
        raise TimeoutError
    backend.flush = flush_gives_up
    backend.close()
    print("closed with I/O pending:", any(closed_with_io_pending))
""")


def run(script: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_closed_cleanly(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"  # SIGSEGV: -11
    assert result.stdout.strip().endswith("closed with I/O pending: False")


def test_engine_close_drains_lower_tier_reads_into_host_slots_before_freeing_them():
    assert_closed_cleanly(run(ENGINE))


def test_sglang_backend_close_drains_write_through_from_host_slots_before_freeing_them():
    pytest.importorskip("sglang.srt.mem_cache.hicache_storage", reason="SGLang not installed")
    assert_closed_cleanly(run(SGLANG, cwd=ROOT / "tests" / "integrations"))


VIEW_AFTER_CLOSE = textwrap.dedent("""
    from kvtier.tiers.host import HostPool
    from kvtier.tiers.shared_region import SharedRegion
    import os

    pool = HostPool(1 << 20, 4096, pin=False)
    region = SharedRegion(f"kvtier-test-view-{os.getpid()}", 1 << 20)
    views = [pool.view(3), region.buffer[4096:8192]]
    pool.close()
    region.close()
    for view in views:  # a late user of a slot: its memory must outlive close
        view.fill_(7)
        assert int(view.sum()) == 7 * 4096
    print("closed")
""")


def test_a_host_pool_or_shared_region_view_outlives_close():
    result = run(VIEW_AFTER_CLOSE)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
