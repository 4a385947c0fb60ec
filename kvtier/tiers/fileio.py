"""The disk tier's syscall boundary: every data read, write and preallocation goes through these functions.

Tests replace them (monkeypatch) to inject ENOSPC, EIO, short writes or slow I/O exactly where the kernel
would report them, without root or a special file system.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Sequence

PAGE = 4096


def write_at(fd: int, buffers: Sequence[memoryview | mmap.mmap], offset: int) -> int:
    """``pwritev``: one syscall for header block, payload and padded tail."""
    return os.pwritev(fd, buffers, offset)


def read_at(fd: int, buffers: Sequence[memoryview | mmap.mmap], offset: int) -> int:
    """``preadv``: one syscall filling header block, the caller's buffer and (maybe) a tail block."""
    return os.preadv(fd, buffers, offset)


def allocate(fd: int, offset: int, length: int) -> None:
    """``fallocate``: reserve a slab's blocks up front, so ENOSPC shows here and not mid-chunk."""
    os.posix_fallocate(fd, offset, length)


class ThreadBlocks(threading.local):
    """Two page-aligned 4 KiB blocks per I/O thread: the header block and a payload tail block.

    These are the only bounce buffers on the aligned path: at most 4096 + 4095 bytes per chunk.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, 2 * PAGE)
        self.head = memoryview(self._map)[:PAGE]
        self.tail = memoryview(self._map)[PAGE:]
