"""G3: chunks as files on local NVMe, written and read with O_DIRECT straight from/to host-pool slots.

File format: ``[ChunkHeader, zero-padded to 4096][payload, zero-padded to a multiple of 4096]``. A put
writes the whole file with one ``pwritev`` to a hidden temp name and renames it into place once the
device has it (O_DIRECT returns after the device accepted the data; buffered fallback writes and
``fsync=True`` add an ``fdatasync`` for power loss), so a chunk is visible only once complete; the header's checksum catches anything a crash or a
disk still manages to damage. On start the tier rebuilds its index from the headers on disk and deletes
temp files and damaged entries. Payload checksums are verified on every read.

I/O runs in a thread pool (several requests in flight, the GIL released in the syscalls); callers get
futures. Every failure (ENOSPC, EIO, a truncated or corrupt file, too many writes queued) is a skipped
write or a miss, counted in ``stats()``; the tier keeps working.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from kvtier.chunk import HEADER_BYTES, ChunkError, ChunkHeader
from kvtier.config import KvtierConfig
from kvtier.hashing import Namespace
from kvtier.tiers import fileio
from kvtier.tiers.base import Buffer, LruIndex, LocalTier, buffer_address, check_key, completed, gather
from kvtier.tiers.fileio import PAGE

log = logging.getLogger(__name__)

_CHUNK_NAME = re.compile(r"^([0-9a-f]{16})\.kvc$")
_TEMP_SUFFIX = ".tmp"


def _padded(n: int) -> int:
    return -(-n // PAGE) * PAGE


def file_bytes_for(payload_bytes: int) -> int:
    """Size on disk of a chunk file holding ``payload_bytes``."""
    return PAGE + _padded(payload_bytes)


class DirectoryInUseError(RuntimeError):
    """Another live DiskTier owns this namespace directory (two owners would delete each other's files)."""


class DiskTier(LocalTier):
    """Chunk files under ``root/<namespace id>/``; see the module docstring.

    ``put``: True when written, already stored or being written by an earlier put; payload buffers must
    stay untouched until the future is done. ``get``: a buffer smaller than the stored payload is a miss.
    Buffers at page-aligned addresses (host-pool slots) are read and written in place; others go through
    a bounce buffer (counted as ``bounce_copies``).
    """

    name = "disk"

    def __init__(self, namespace: Namespace, root: str | os.PathLike[str], capacity_bytes: int,
                 io_threads: int = 8, direct_io: bool = True, fsync: bool = False,
                 max_pending_bytes: int = 1 << 30) -> None:
        super().__init__(namespace)
        if capacity_bytes <= 0 or io_threads <= 0 or max_pending_bytes <= 0:
            raise ValueError("capacity_bytes, io_threads and max_pending_bytes must be positive")
        self.directory = Path(root) / f"{namespace.id:016x}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DirectoryInUseError(f"{self.directory} is in use by another disk tier") from None
        self.direct_io = direct_io
        self.fsync = fsync
        self.max_pending_bytes = max_pending_bytes
        self._lock = threading.Lock()
        self._index = LruIndex(capacity_bytes)
        self._payload_bytes: dict[int, int] = {}
        self._writing: set[int] = set()
        self._pending_bytes = 0
        self._blocks = fileio.ThreadBlocks()
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvtier-disk")
        self._set_gauges(capacity_bytes=capacity_bytes)
        self._rebuild()

    @classmethod
    def from_config(cls, cfg: KvtierConfig, namespace: Namespace) -> DiskTier:
        if not cfg.disk_path:
            raise ValueError("disk_path is empty: no disk tier configured")
        return cls(namespace, cfg.disk_path, cfg.disk_capacity_bytes, cfg.disk_io_threads,
                   cfg.disk_use_direct_io, cfg.disk_fsync, cfg.disk_max_pending_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self._index.capacity_bytes

    def path_of(self, key: int) -> Path:
        return self.directory / f"{check_key(key):016x}.kvc"

    # --- put ---------------------------------------------------------------------------------------------
    def put_async(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> Future[list[bool]]:
        checked, views = self._check_batch(keys, payloads, writable=False)
        futures: list[Future[bool]] = []
        evicted: list[int] = []
        for key, view in zip(checked, views):
            size = file_bytes_for(len(view))
            with self._lock:
                if key in self._index or key in self._writing:
                    self._index.touch(key)
                    futures.append(completed(True))
                    continue
                victims = self._index.victims_for(size, self.choose_victims)
                if victims is None or self._pending_bytes + size > self.max_pending_bytes:
                    self._count(put_skipped=1)
                    futures.append(completed(False))
                    continue
                for victim in victims:
                    self._drop_locked(victim)
                evicted += victims
                self._index.reserve(size)
                self._writing.add(key)
                self._pending_bytes += size
            futures.append(self._pool.submit(self._write_one, key, view, size))
        if evicted:
            self._count(evictions=len(evicted))
            self._notify_evicted(evicted)
        return gather(futures)

    def _write_one(self, key: int, payload: memoryview, size: int) -> bool:
        ok = False
        try:
            ok = self._write_file(key, payload)
        except Exception:  # a bug must not leave the reservation behind; it still surfaces in the log
            log.exception("disk tier: unexpected failure writing %016x", key)
        with self._lock:
            self._writing.discard(key)
            self._pending_bytes -= size
            if ok and not self._closed:
                self._index.commit(key, size)
                self._payload_bytes[key] = len(payload)
                self._count(puts=1, put_bytes=len(payload))
            else:
                self._index.unreserve(size)
                self._count(put_skipped=1)
            self._gauges_locked()
        return ok

    def _write_file(self, key: int, payload: memoryview) -> bool:
        n = len(payload)
        head = self._blocks.head
        head[:] = bytes(PAGE)
        head[:HEADER_BYTES] = ChunkHeader.for_payload(self.namespace.id, key, payload).pack()
        buffers, bounce = self._payload_iovecs(payload, n, for_read=False)
        tmp = self.directory / f".{key:016x}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}"
        try:
            fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                written = fileio.write_at(fd, [head, *buffers], 0)
                if written != PAGE + _padded(n):
                    raise OSError(errno.EIO, f"short write: {written} of {PAGE + _padded(n)} bytes")
                if self.fsync or not self.direct_io:  # buffered data may still sit in the page cache
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path_of(key))
            return True
        except OSError as exc:
            log.warning("disk tier: write of %016x skipped: %s", key, exc)
            self._count(errors=1)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        finally:
            if bounce is not None:
                bounce.close()

    # --- get ---------------------------------------------------------------------------------------------
    def get_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> Future[list[int | None]]:
        return gather(self._submit_reads(keys, buffers))

    def get(self, keys: Sequence[int], buffers: Sequence[Buffer], timeout_s: float | None = None) -> list[int | None]:
        """Synchronous get. With ``timeout_s``, reads not started by then are cancelled and count as misses;
        reads already in the kernel are awaited, so no buffer is written after ``get`` returns."""
        futures = self._submit_reads(keys, buffers)
        if timeout_s is not None:
            _, late = wait(futures, timeout=timeout_s)
            cancelled = sum(f.cancel() for f in late)
            self._count(gets=cancelled, misses=cancelled)
        return [None if f.cancelled() else f.result() for f in futures]

    def _submit_reads(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> list[Future[int | None]]:
        checked, views = self._check_batch(keys, buffers, writable=True)
        return [self._pool.submit(self._read_one, k, v) for k, v in zip(checked, views)]

    def _read_one(self, key: int, buf: memoryview) -> int | None:
        with self._lock:
            n = self._payload_bytes.get(key)
            self._index.touch(key)
        if n is None or n > len(buf):
            self._count(gets=1, misses=1)
            return None
        try:
            self._read_file(key, buf, n)
        except ChunkError as exc:
            log.warning("disk tier: %016x is damaged (%s); dropped", key, exc)
            self._count(gets=1, misses=1, corrupt=1)
            self._forget(key)
            return None
        except FileNotFoundError:
            log.warning("disk tier: %016x vanished from disk", key)
            self._count(gets=1, misses=1, errors=1)
            self._forget(key)
            return None
        except OSError as exc:
            log.warning("disk tier: read of %016x failed: %s", key, exc)
            self._count(gets=1, misses=1, errors=1)
            return None
        self._count(gets=1, hits=1, hit_bytes=n)
        return n

    def _read_file(self, key: int, buf: memoryview, n: int) -> None:
        """Read into ``buf[:n]`` and verify; ChunkError / OSError on any trouble."""
        head = self._blocks.head
        buffers, bounce = self._payload_iovecs(buf, n, for_read=True)
        try:
            fd = self._open(self.path_of(key), os.O_RDONLY)
            try:
                got = fileio.read_at(fd, [head, *buffers], 0)
            finally:
                os.close(fd)
            if got != PAGE + _padded(n):
                raise ChunkError(f"file truncated: {got} of {PAGE + _padded(n)} bytes")
            if bounce is not None:
                buf[:n] = bounce[:n]
            elif buffers[-1] is self._blocks.tail:
                buf[n - n % PAGE:n] = self._blocks.tail[:n % PAGE]
            ChunkHeader.unpack(head).verify(self.namespace.id, key, buf[:n])
        finally:
            if bounce is not None:
                bounce.close()

    def _payload_iovecs(self, buf: memoryview, n: int, for_read: bool) -> tuple[list, mmap.mmap | None]:
        """The iovecs that move ``buf[:n]`` padded to whole pages, and the bounce buffer if one was needed.

        Aligned buffers are used in place; a partial last page goes through the thread's tail block unless
        a read target has room for the padding (a host-pool slot does).
        """
        if buffer_address(buf) % PAGE:
            self._count(bounce_copies=1)
            bounce = mmap.mmap(-1, _padded(n))
            if not for_read:
                bounce[:n] = buf[:n]
            return [bounce], bounce
        whole = n - n % PAGE
        if n == whole:
            return [buf[:n]], None
        if for_read and len(buf) >= _padded(n):
            return [buf[:_padded(n)]], None
        tail = self._blocks.tail
        if not for_read:
            tail[:n - whole] = buf[whole:n]
            tail[n - whole:] = bytes(PAGE - (n - whole))
        return ([buf[:whole]] if whole else []) + [tail], None

    def _open(self, path: Path, flags: int) -> int:
        flags |= os.O_CLOEXEC
        if self.direct_io:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.warning("disk tier: %s refuses O_DIRECT; using buffered I/O", self.directory)
                self.direct_io = False
                self._count(buffered_fallbacks=1)
        return os.open(path, flags, 0o644)

    # --- contains / delete / index ---------------------------------------------------------------------------
    def _holds_locked(self, key: int) -> bool:
        return key in self._index

    def _drop_locked(self, key: int) -> bool:
        """Forget ``key`` and unlink its file; under the lock so a concurrent re-put cannot lose its file."""
        if self._index.remove(key) is None:
            return False
        del self._payload_bytes[key]
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("disk tier: cannot unlink %016x: %s", key, exc)
        return True

    def _forget(self, key: int) -> None:
        with self._lock:
            dropped = self._drop_locked(key)
            self._gauges_locked()
        if dropped:
            self._notify_evicted([key])

    def _notify_evicted(self, keys: list[int]) -> None:
        if self.on_evicted is not None:
            self.on_evicted(keys)

    def _gauges_locked(self) -> None:
        self._set_gauges(used_bytes=self._index.used_bytes, entries=len(self._index))

    def _rebuild(self) -> None:
        """Index what is on disk: oldest first (LRU order), temp files and damaged chunks deleted."""
        found = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(_TEMP_SUFFIX):
                os.unlink(entry.path)  # a writer died before its rename: never served
                continue
            match = _CHUNK_NAME.match(entry.name)
            if match:
                found.append((entry.stat().st_mtime_ns, int(match.group(1), 16)))
        found.sort()
        headers = list(self._pool.map(self._check_file, [key for _, key in found]))
        with self._lock:
            for (_, key), n in zip(found, headers):
                if n is None:
                    self._count(corrupt=1)
                    os.unlink(self.path_of(key))
                    continue
                self._index.add(key, file_bytes_for(n))
                self._payload_bytes[key] = n
            overflow = self._index.victims_for(0, None) or []
            for key in overflow:  # capacity shrank since the files were written
                self._drop_locked(key)
            self._count(evictions=len(overflow))
            self._gauges_locked()

    def _check_file(self, key: int) -> int | None:
        """The payload size in ``key``'s header, or None when the header or file size is wrong."""
        path = self.path_of(key)
        try:
            fd = self._open(path, os.O_RDONLY)
            try:
                got = fileio.read_at(fd, [self._blocks.head], 0)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if got != PAGE:
                raise ChunkError("header block truncated")
            header = ChunkHeader.unpack(self._blocks.head)
            if header.namespace_id != self.namespace.id or header.key != key:
                raise ChunkError("header names another chunk")
            if size != file_bytes_for(header.payload_bytes):
                raise ChunkError(f"file is {size} bytes, header implies {file_bytes_for(header.payload_bytes)}")
            return header.payload_bytes
        except (ChunkError, OSError) as exc:
            log.warning("disk tier: dropping %s: %s", path.name, exc)
            return None

    def close(self) -> None:
        """Finish queued I/O, then release threads and the directory lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            super().close()
        self._pool.shutdown(wait=True)
        os.close(self._lock_fd)

