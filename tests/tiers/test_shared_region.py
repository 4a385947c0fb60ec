"""G2 shared between processes: the /dev/shm region and a host pool laid over it."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from kvtier.tiers.host import HostPool
from kvtier.tiers import shared_region
from kvtier.tiers.shared_region import SharedRegion

PAGE = 4096


def test_two_mappings_share_bytes_and_the_name_goes_once_both_mapped(tmp_path):
    first = SharedRegion("r0", 4 * PAGE, directory=tmp_path)
    assert first.creator and (tmp_path / "r0").exists()
    second = SharedRegion("r0", 4 * PAGE, directory=tmp_path)
    assert not second.creator and not (tmp_path / "r0").exists()
    first.buffer[PAGE:PAGE + 3] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert second.buffer[PAGE:PAGE + 3].tolist() == [1, 2, 3]
    first.close()
    assert second.buffer[PAGE + 1].item() == 2  # the memory lives as long as a mapping does
    second.close()


def test_a_region_never_joined_is_unlinked_on_close(tmp_path):
    region = SharedRegion("alone", PAGE, directory=tmp_path)
    region.close()
    region.close()
    assert os.listdir(tmp_path) == []


def test_a_name_left_by_a_killed_creator_is_replaced_not_joined(tmp_path):
    """A relaunch with the same engine id: the old scheduler died before its worker came."""
    code = (f"import os; from pathlib import Path; from kvtier.tiers.shared_region import SharedRegion; "
            f"r = SharedRegion('stale', {2 * PAGE}, directory=Path({str(tmp_path)!r})); r.buffer[:4] = 9; os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())
    assert (tmp_path / "stale").exists()
    scheduler = SharedRegion("stale", 2 * PAGE, directory=tmp_path)
    assert scheduler.creator and scheduler.buffer[:4].tolist() == [0] * 4  # a fresh file, not the dead one's
    worker = SharedRegion("stale", 2 * PAGE, directory=tmp_path)
    worker.buffer[:4] = 7
    assert not worker.creator and scheduler.buffer[:4].tolist() == [7] * 4 and os.listdir(tmp_path) == []
    worker.close()
    scheduler.close()


def test_two_openers_of_a_dead_creators_file_end_up_on_one_region(tmp_path, monkeypatch):
    """Both find the stale file; the first replaces it while the second still looks at the old one: the
    second must join the first's new file, not delete it by name."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "r").write_bytes(bytes(PAGE) + shared_region._CREATOR.pack(dead.pid, 1) + bytes(PAGE - 16))
    real, first_checked, second_done = shared_region._start_time, threading.Event(), threading.Event()

    def start_time(pid):
        if threading.current_thread().name == "first" and pid == dead.pid:
            first_checked.set()
            second_done.wait(5)  # the second opener runs its whole open meanwhile
        return real(pid)

    monkeypatch.setattr(shared_region, "_start_time", start_time)
    regions = {}
    first = threading.Thread(name="first", target=lambda: regions.setdefault(
        "first", SharedRegion("r", PAGE, directory=tmp_path)))
    first.start()
    first_checked.wait(5)
    regions["second"] = SharedRegion("r", PAGE, directory=tmp_path, wait_s=5)
    second_done.set()
    first.join(10)
    regions["first"].buffer[0] = 7
    assert [regions[n].creator for n in ("first", "second")].count(True) == 1
    assert regions["second"].buffer[0].item() == 7
    for region in regions.values():
        region.close()


def test_sizes_must_agree(tmp_path):
    region = SharedRegion("r", 2 * PAGE, directory=tmp_path)
    with pytest.raises(RuntimeError, match="not sized"):  # the joiner waits for 3 pages that never come
        SharedRegion("r", 3 * PAGE, directory=tmp_path, wait_s=0.05)
    region.close()
    region = SharedRegion("r", 2 * PAGE, directory=tmp_path)
    with pytest.raises(ValueError, match="disagree"):
        SharedRegion("r", PAGE, directory=tmp_path)
    region.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("nbytes, name", [(100, "r"), (0, "r"), (PAGE, "a/b"), (PAGE, "")])
def test_bad_regions_are_refused(tmp_path, nbytes, name):
    with pytest.raises(ValueError):
        SharedRegion(name, nbytes, directory=tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_host_pool_over_a_region_writes_into_it_and_leaves_it_mapped(tmp_path):
    region = SharedRegion("pool", 4 * PAGE, directory=tmp_path)
    other = SharedRegion("pool", 4 * PAGE, directory=tmp_path)
    pool = HostPool(4 * PAGE, PAGE, pin=False, buffer=region.buffer)
    (slot,) = pool.alloc(1)
    pool.view(slot)[:4] = 7
    assert other.buffer[slot * PAGE:slot * PAGE + 4].tolist() == [7] * 4
    pool.close()
    assert region.buffer[slot * PAGE].item() == 7  # the pool did not own the memory
    region.close()
    other.close()


@pytest.mark.parametrize("buffer", [torch.zeros(PAGE, dtype=torch.uint8), torch.zeros(4 * PAGE, dtype=torch.int8),
                                    torch.zeros(2, 2 * PAGE, dtype=torch.uint8)])
def test_a_host_pool_refuses_an_unusable_buffer(buffer):
    with pytest.raises(ValueError, match="external pool buffer"):
        HostPool(2 * PAGE, PAGE, pin=False, buffer=buffer)


HOLD_REGION = ("import sys; from pathlib import Path; from kvtier.tiers.shared_region import SharedRegion; "
               f"r = SharedRegion(sys.argv[1], {2 * PAGE}, directory=Path(sys.argv[2])); print('mapped', flush=True); "
               "sys.stdin.read()")


def hold_region(name: str, directory) -> subprocess.Popen:
    """A process that creates region ``name`` and keeps it, unjoined, until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_REGION, name, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert proc.stdout.readline() == "mapped\n"
    return proc


def test_the_next_start_reclaims_a_killed_creators_region_keeps_a_live_ones_and_exit_drops_it(tmp_path):
    """A scheduler SIGKILLed before its worker mapped the region leaves host_capacity_bytes in /dev/shm."""
    killed, live = hold_region("kvtier-killed-rank0", tmp_path), hold_region("kvtier-live-rank0", tmp_path)
    try:
        killed.kill()
        killed.wait()
        assert (tmp_path / "kvtier-killed-rank0").exists()
        region = SharedRegion("kvtier-next-rank0", 2 * PAGE, directory=tmp_path)
        assert sorted(os.listdir(tmp_path)) == ["kvtier-live-rank0", "kvtier-next-rank0"]
        region.close()
    finally:
        live.stdin.close()  # the live process ends normally, its region never closed nor joined
        assert live.wait() == 0
    assert os.listdir(tmp_path) == []
