"""Host memory two processes map at once: a named file in /dev/shm, created by whichever side opens it first.

vLLM runs its scheduler and each worker in separate processes, and either may come up first (the engine
core initialises the workers' KV caches before it builds the scheduler; tests build them the other way
round). So both sides call the same constructor: the first opener (``O_EXCL``) sizes the file, the second
waits for that size, maps it, and unlinks the name. From then on the memory lives exactly as long as the
mappings: nothing is left in /dev/shm however the processes end. A side that is never joined unlinks the
name on ``close``, or at interpreter exit if it was not closed. A side killed before the other came leaves its
name behind (a file as large as the region): the page after the region records the creator (pid and start
time), so every opener first reclaims the ``kvtier-*`` files of creators that are gone (``reclaim_orphans``),
and an opener whose creator is gone replaces the file instead of joining it, so a relaunch with the same engine
id never splits the region between a stale and a fresh file.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import mmap
import os
import struct
import time
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
PREFIX = "kvtier-"  # the names ``reclaim_orphans`` looks at: kvtier's own regions
_CREATOR = struct.Struct("<qQ")  # pid, start time in clock ticks since boot (/proc/<pid>/stat field 22)
_UNJOINED: dict[Path, tuple[int, int]] = {}  # names this process created and still owns: (st_dev, st_ino)


class SharedRegion:
    """``nbytes`` of shared memory named ``name`` (a file under ``directory``), as a uint8 ``buffer``."""

    def __init__(self, name: str, nbytes: int, *, directory: Path = SHM_DIR, wait_s: float = 30.0) -> None:
        if nbytes <= 0 or nbytes % mmap.PAGESIZE:
            raise ValueError(f"a shared region is a positive multiple of {mmap.PAGESIZE} B, got {nbytes}")
        if not name or "/" in name:
            raise ValueError(f"bad shared region name {name!r}")
        self.path = Path(directory) / name
        self.nbytes = nbytes
        reclaim_orphans(Path(directory))
        fd = self._open(wait_s)
        if self.creator:
            opened = os.fstat(fd)
            _UNJOINED[self.path] = (opened.st_dev, opened.st_ino)
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED,
                                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if self.creator:
                self._unlink()
            raise
        finally:
            os.close(fd)
        if not self.creator:
            self._unlink()  # both sides have it mapped: the name is no longer needed
        self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def _open(self, wait_s: float) -> int:
        """Create the file (and say who did), or join a live creator's; a dead creator's file is replaced."""
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # unlinked meanwhile: try to create it again
                try:
                    self._wait_for_size(fd, wait_s)
                    pid, started = _CREATOR.unpack(os.pread(fd, _CREATOR.size, self.nbytes))
                except BaseException:
                    os.close(fd)
                    raise
                if _start_time(pid) == started:
                    self.creator = False
                    return fd
                try:
                    _unlink_locked(self.path, fd)
                finally:
                    os.close(fd)
                continue
            self.creator = True
            try:
                os.pwrite(fd, _CREATOR.pack(os.getpid(), _start_time(os.getpid()) or 0), self.nbytes)
                os.ftruncate(fd, self.nbytes + mmap.PAGESIZE)  # sized last: a joiner then finds the creator
            except BaseException:
                os.close(fd)
                self._unlink()
                raise
            return fd

    def _wait_for_size(self, fd: int, wait_s: float) -> None:
        deadline, want = time.monotonic() + wait_s, self.nbytes + mmap.PAGESIZE
        while (size := os.fstat(fd).st_size) < want:
            if os.fstat(fd).st_nlink == 0 or time.monotonic() > deadline:
                raise RuntimeError(f"shared region {self.path} was not sized by its creator within {wait_s} s "
                                   "(a file left by a crash while it was being created: remove it)")
            time.sleep(0.005)
        if size != want:
            raise ValueError(f"shared region {self.path} is {size - mmap.PAGESIZE} B, expected {self.nbytes} B: the "
                             "scheduler and the worker disagree on its size (different kv_connector_extra_config?)")

    def _unlink(self) -> None:
        _UNJOINED.pop(self.path, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Unmap (once no tensor views it any more) and drop the name if the other side never came."""
        self._unlink()
        if self._mmap is None:
            return
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self._mmap = None  # unmapped when the last tensor over it dies (mmap.close() would unmap under live views)


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), None if there is no such process: a pid and its
    start time name one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _names(path: Path, identity: tuple[int, int]) -> bool:
    """Whether ``path`` still names the file ``identity`` (st_dev, st_ino), not a newer one of that name."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == identity


def _unlink_locked(path: Path, fd: int) -> bool:
    """Unlink ``path`` if it still names the file open as ``fd``, whose creator is gone; locked, so that of two
    openers only one replaces it."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    opened = os.fstat(fd)
    if not _names(path, (opened.st_dev, opened.st_ino)):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def _orphaned(fd: int) -> bool:
    """Whether the region open as ``fd`` was sized by a creator that is gone. A file not sized yet (its creator
    is between creating and sizing it) is never an orphan."""
    size = os.fstat(fd).st_size
    if size < 2 * mmap.PAGESIZE or size % mmap.PAGESIZE:
        return False
    pid, started = _CREATOR.unpack(os.pread(fd, _CREATOR.size, size - mmap.PAGESIZE))
    return _start_time(pid) != started


def reclaim_orphans(directory: Path = SHM_DIR, prefix: str = PREFIX) -> list[Path]:
    """Unlink the regions under ``directory`` whose creator died before anyone joined them (a killed scheduler
    leaves its whole region in /dev/shm); those of live processes stay. Returns what was removed."""
    removed = []
    for path in Path(directory).glob(f"{prefix}*"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # joined (unlinked) meanwhile, or not ours to open
        try:
            if _orphaned(fd) and _unlink_locked(path, fd):
                removed.append(path)
        finally:
            os.close(fd)
    return removed


@atexit.register
def _unlink_unjoined() -> None:
    """At exit, the names this process created that no one joined and no ``close`` dropped."""
    for path, identity in list(_UNJOINED.items()):
        if _names(path, identity):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    _UNJOINED.clear()
