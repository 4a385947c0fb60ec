"""The disk tier's storage geometry: a few large preallocated slab files carved into equal extents.

A slab file is named ``slab-<extent bytes>-<index>.kvs`` so a restart knows its geometry without a
superblock. Extents are striped over ``STRIPES`` slabs: extent ``e`` lives in slab ``e % STRIPES`` at
offset ``(e // STRIPES) * extent_bytes``, so the mapping does not depend on the capacity (a restart with
another capacity keeps every extent below it, the slabs are trimmed) and concurrent writes of
neighbouring extents land in different files, as fio's jobs do. A slab is created and ``fallocate``-d
when its first extent is written, then stays open for the tier's lifetime: a put or get is one syscall.
The lowest free extent is handed out first.
"""

from __future__ import annotations

import heapq
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from kvtier.tiers import fileio

STRIPES = 16  # slab files per tier: at least the I/O threads one expects (``disk_io_threads``, 8 by default)
_SLAB_NAME = re.compile(r"^slab-(\d+)-(\d+)\.kvs$")

Opener = Callable[[Path, int], int]
"""``(path, flags) -> fd``: the tier's open, which adds O_DIRECT (or falls back to buffered I/O)."""


def slab_files(directory: Path) -> dict[int, dict[int, Path]]:
    """Slab files on disk: extent bytes -> slab index -> path."""
    found: dict[int, dict[int, Path]] = {}
    for entry in os.scandir(directory):
        match = _SLAB_NAME.match(entry.name)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = Path(entry.path)
    return found


class ExtentAllocator:
    """Free extent numbers in ``[0, count)``, lowest first. Not thread-safe: the tier's lock guards it."""

    def __init__(self, count: int, used: Iterable[int] = ()) -> None:
        taken = set(used)
        self.count = count
        self._fresh = max(taken) + 1 if taken else 0  # extents from here on were never handed out
        self._free = [e for e in range(self._fresh) if e not in taken]
        heapq.heapify(self._free)

    def alloc(self) -> int | None:
        if self._free:
            return heapq.heappop(self._free)
        if self._fresh < self.count:
            self._fresh += 1
            return self._fresh - 1
        return None

    def free(self, extent: int) -> None:
        heapq.heappush(self._free, extent)


class SlabFiles:
    """The open slab files of one geometry; thread-safe."""

    def __init__(self, directory: Path, extent_bytes: int, extent_count: int, opener: Opener) -> None:
        self.directory = directory
        self.extent_bytes = extent_bytes
        self.extent_count = extent_count
        self.slab_count = min(STRIPES, extent_count)
        self._open = opener
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._allocated: set[int] = set()  # slabs fallocated to their full size

    def path(self, slab: int) -> Path:
        return self.directory / f"slab-{self.extent_bytes}-{slab}.kvs"

    def extents_of(self, slab: int) -> range:
        return range(slab, self.extent_count, STRIPES)

    def slab_bytes(self, slab: int) -> int:
        return len(self.extents_of(slab)) * self.extent_bytes

    def locate(self, extent: int) -> tuple[int, int]:
        """(slab index, byte offset in it) of ``extent``."""
        nth, slab = divmod(extent, STRIPES)
        return slab, nth * self.extent_bytes

    def adopt(self, slab: int) -> int:
        """Open an existing slab file at start; trims it if the tier shrank. Returns its size in bytes."""
        fd = self._open(self.path(slab), os.O_RDWR)
        self._fds[slab] = fd
        size = os.fstat(fd).st_size
        if size > self.slab_bytes(slab):
            os.ftruncate(fd, self.slab_bytes(slab))
            size = self.slab_bytes(slab)
        if size == self.slab_bytes(slab):
            self._allocated.add(slab)
        return size

    def for_read(self, extent: int) -> tuple[int, int]:
        """(fd, offset) of a written extent."""
        slab, offset = self.locate(extent)
        return self._fds[slab], offset

    def for_write(self, extent: int) -> tuple[int, int]:
        """(fd, offset) of ``extent``, creating and preallocating its slab first; OSError (ENOSPC...) if that fails."""
        slab, offset = self.locate(extent)
        if slab not in self._allocated:
            with self._lock:
                if slab not in self._fds:
                    self._fds[slab] = self._open(self.path(slab), os.O_RDWR | os.O_CREAT)
                if slab not in self._allocated:
                    fileio.allocate(self._fds[slab], 0, self.slab_bytes(slab))
                    self._allocated.add(slab)
        return self._fds[slab], offset

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._allocated.clear()
