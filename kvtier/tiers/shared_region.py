"""Host memory two processes map at once: a named file in /dev/shm, created by whichever side opens it first.

vLLM runs its scheduler and each worker in separate processes, and either may come up first (the engine
core initialises the workers' KV caches before it builds the scheduler; tests build them the other way
round). So both sides call the same constructor: the first opener (``O_EXCL``) sizes the file, the second
waits for that size, maps it, and unlinks the name. From then on the memory lives exactly as long as the
mappings: nothing is left in /dev/shm however the processes end. A side that is never joined unlinks the
name on ``close``. A side killed before the other came leaves its name behind: the page after the region
records the creator (pid and start time), and an opener whose creator is gone replaces the file instead of
joining it, so a relaunch with the same engine id never splits the region between a stale and a fresh file.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import time
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
_CREATOR = struct.Struct("<qQ")  # pid, start time in clock ticks since boot (/proc/<pid>/stat field 22)


class SharedRegion:
    """``nbytes`` of shared memory named ``name`` (a file under ``directory``), as a uint8 ``buffer``."""

    def __init__(self, name: str, nbytes: int, *, directory: Path = SHM_DIR, wait_s: float = 30.0) -> None:
        if nbytes <= 0 or nbytes % mmap.PAGESIZE:
            raise ValueError(f"a shared region is a positive multiple of {mmap.PAGESIZE} B, got {nbytes}")
        if not name or "/" in name:
            raise ValueError(f"bad shared region name {name!r}")
        self.path = Path(directory) / name
        self.nbytes = nbytes
        fd = self._open(wait_s)
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
                try:  # left by a process that is gone; locked, so that of two openers only one replaces it
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if self._names(fd):
                        self._unlink()
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

    def _names(self, fd: int) -> bool:
        """Whether the name still points at the file open as ``fd`` (not a newer one of the same name)."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

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
