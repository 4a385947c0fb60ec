"""G3: chunks in extents of a few large slab files on local NVMe, moved with O_DIRECT straight from/to host-pool slots.

Extent format: ``[ChunkHeader, zero-padded to 4096][payload, zero-padded to a multiple of 4096]``; every
extent of a tier has one size (``PAGE +`` the largest payload, from ``chunk_bytes`` or the first put; larger
payloads are skipped writes). Slab files are preallocated and kept open (see ``slabs.py``), so a put is ONE
``pwritev`` of header and payload at the extent's offset and a get is one ``preadv``: no file create,
rename, unlink or open per chunk. A chunk enters the index only after its write completed; a torn or
damaged extent fails the header's payload checksum, which every read verifies, and is never served. On
start the tier rebuilds its index from the extent headers (damaged headers dropped; payloads are checked
at read). A deleted or evicted extent is only marked free; an old header left in it may bring that chunk
back after a restart, which is harmless: it is the same content under the same key, still checksummed.
An extent being read is never reused: dropping it defers the free to its last reader.

I/O runs in a thread pool (several requests in flight, the GIL released in the syscalls); callers get
futures. A batch is dealt out to the threads as one task each (rows strided), each thread moving its
chunks in turn like one fio job, still one syscall per chunk: per-chunk tasks and futures cost more Python
time than a 256 KiB chunk's ``pwritev`` on a 2-core host. Every failure (ENOSPC from ``fallocate`` or
``pwritev``, EIO, a short or torn extent, too many writes queued) is a skipped write or a miss, counted
in ``stats()``; the tier keeps working.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from kvtier.chunk import HEADER_BYTES, ChunkError, ChunkHeader
from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError
from kvtier.hashing import Namespace
from kvtier.tiers import fileio
from kvtier.tiers.base import Buffer, CapacityIndex, LocalTier, buffer_address, check_key, gather, then
from kvtier.tiers.fileio import PAGE
from kvtier.tiers.slabs import ExtentAllocator, SlabFiles, slab_files

log = logging.getLogger(__name__)

_LEGACY_SUFFIXES = (".kvc", ".tmp")  # the earlier one-file-per-chunk format


def _padded(n: int) -> int:
    return -(-n // PAGE) * PAGE


def extent_bytes_for(payload_bytes: int) -> int:
    """Size on disk of an extent holding up to ``payload_bytes``: the header block plus the padded payload."""
    return PAGE + _padded(payload_bytes)


class DirectoryInUseError(RuntimeError):
    """Another live DiskTier owns this namespace directory (two owners would delete each other's files)."""


class DiskTier(LocalTier):
    """Chunk extents in slab files under ``root/<namespace id>/``; see the module docstring.

    ``put``: True when written, already stored or being written by an earlier put; payload buffers must
    stay untouched until the future is done. ``get``: a buffer smaller than the stored payload is a miss.
    Buffers at page-aligned addresses (host-pool slots) are read and written in place; others go through
    a bounce buffer (counted as ``bounce_copies``). ``capacity_bytes`` is rounded down to whole extents.
    """

    name = "disk"

    def __init__(self, namespace: Namespace, root: str | os.PathLike[str], capacity_bytes: int,
                 io_threads: int = 8, direct_io: bool = True, fsync: bool = False,
                 max_pending_bytes: int = 1 << 30, chunk_bytes: int | None = None) -> None:
        super().__init__(namespace)
        if capacity_bytes <= 0 or io_threads <= 0 or max_pending_bytes <= 0:
            raise ValueError("capacity_bytes, io_threads and max_pending_bytes must be positive")
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
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
        self._index = CapacityIndex(capacity_bytes)
        self._slabs: SlabFiles | None = None          # geometry: known from chunk_bytes, the disk, or the first put
        self._extents: ExtentAllocator | None = None
        self._where: dict[int, tuple[int, int]] = {}  # key -> (extent, payload bytes)
        self._writing: set[int] = set()
        self._readers: Counter[int] = Counter()       # extent -> reads in flight
        self._doomed: set[int] = set()                # dropped while being read: the last reader frees them
        self._pending_bytes = 0
        self._warned_too_big = False
        self._blocks = fileio.ThreadBlocks()
        self._threads = io_threads
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvtier-disk")
        self._set_gauges(capacity_bytes=capacity_bytes)
        try:
            self._rebuild(None if chunk_bytes is None else extent_bytes_for(chunk_bytes))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, cfg: KvtierConfig, namespace: Namespace, chunk_bytes: int | None = None) -> DiskTier:
        """A tier for ``cfg``; ``chunk_bytes`` (the engine's chunk size) fixes the extent size up front."""
        if not cfg.disk_path:
            raise ValueError("disk_path is empty: no disk tier configured")
        try:
            return cls(namespace, cfg.disk_path, cfg.disk_capacity_bytes, cfg.disk_io_threads,
                       cfg.disk_use_direct_io, cfg.disk_fsync, cfg.disk_max_pending_bytes, chunk_bytes)
        except DirectoryInUseError as exc:
            raise ConfigError(f"disk_path={cfg.disk_path!r}: {exc}: another process serves the same model from it; "
                              "give each process (each engine or --dp-size replica) its own disk_path") from None
        except OSError as exc:
            raise ConfigError(f"disk_path={cfg.disk_path!r} cannot be created or written: "
                              f"{exc.strerror or exc}") from None

    @property
    def capacity_bytes(self) -> int:
        return self._index.capacity_bytes

    @property
    def capacity_chunks(self) -> int:
        """How many chunks fit: whole extents (header page + padded payload) in ``capacity_bytes``. Known once
        the extent size is (``chunk_bytes``, the disk, or the first put)."""
        if self._slabs is None:
            raise ValueError("the extent size is not known yet: give chunk_bytes")
        return self._index.capacity_bytes // self._slabs.extent_bytes

    @property
    def extent_bytes(self) -> int | None:
        """Bytes per extent (None until the first put when neither ``chunk_bytes`` nor the disk said)."""
        return None if self._slabs is None else self._slabs.extent_bytes

    def location(self, key: int) -> tuple[Path, int] | None:
        """(slab file, offset) of ``key``'s extent: its header block there, the payload one page later."""
        key = check_key(key)
        with self._lock:
            where = self._where.get(key)
            if where is None or self._slabs is None:
                return None
            slab, offset = self._slabs.locate(where[0])
            return self._slabs.path(slab), offset

    def _set_geometry_locked(self, extent_bytes: int) -> None:
        count = self._index.capacity_bytes // extent_bytes
        self._slabs = SlabFiles(self.directory, extent_bytes, count, self._open)
        self._extents = ExtentAllocator(count)
        self._index.capacity_bytes = count * extent_bytes
        self._set_gauges(capacity_bytes=self._index.capacity_bytes)

    # --- put ---------------------------------------------------------------------------------------------
    def put_async(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> Future[list[bool]]:
        checked, views = self._check_batch(keys, payloads, writable=False)
        out: list[bool] = [True] * len(checked)
        writes: list[tuple[int, int, int, memoryview]] = []  # (row, key, extent, payload)
        with self._lock:  # one lock round trip reserves the whole batch
            for row, (key, view) in enumerate(zip(checked, views)):
                if key in self._index or key in self._writing:
                    continue
                if self._slabs is None:
                    self._set_geometry_locked(extent_bytes_for(len(view)))
                size = self._slabs.extent_bytes
                extent = None
                # full (the manager evicts, never this tier), or every free extent still being read: skipped
                if len(view) <= size - PAGE and self._pending_bytes + size <= self.max_pending_bytes \
                        and self._index.fits(size):
                    extent = self._extents.alloc()
                if extent is None:
                    self._warn_if_too_big(len(view), size)
                    self._count(put_skipped=1)
                    out[row] = False
                    continue
                self._index.reserve(size)
                self._writing.add(key)
                self._pending_bytes += size
                writes.append((row, key, extent, view))
        groups = [writes[g::self._threads] for g in range(min(self._threads, len(writes)))]
        futures = [self._pool.submit(self._write_group, group) for group in groups]

        def merge(results: list[list[bool]]) -> list[bool]:
            for group, oks in zip(groups, results):
                for (row, *_), ok in zip(group, oks):
                    out[row] = ok
            return out

        return then(gather(futures), merge)

    def _write_group(self, writes: list[tuple[int, int, int, memoryview]]) -> list[bool]:
        """One I/O thread's share of a batch, written in turn like one fio job: a task and a future per
        thread instead of per chunk (on 2 cores, their hand-offs cost more than the chunk's syscall)."""
        return [self._write_one(key, extent, view) for _, key, extent, view in writes]

    def _warn_if_too_big(self, payload_bytes: int, extent_bytes: int) -> None:
        if payload_bytes > extent_bytes - PAGE and not self._warned_too_big:
            self._warned_too_big = True
            log.warning("disk tier: %d-byte payloads exceed the %d-byte extents of %s; such writes are skipped",
                        payload_bytes, extent_bytes, self.directory)

    def _write_one(self, key: int, extent: int, payload: memoryview) -> bool:
        ok = False
        try:
            ok = self._write_extent(key, extent, payload)
        except Exception:  # a bug must not leave the reservation behind; it still surfaces in the log
            log.exception("disk tier: unexpected failure writing %016x", key)
        with self._lock:
            size = self._slabs.extent_bytes
            self._writing.discard(key)
            self._pending_bytes -= size
            if ok and not self._closed:
                self._index.commit(key, size)
                self._where[key] = (extent, len(payload))
                self._count(puts=1, put_bytes=len(payload))
            else:
                self._index.unreserve(size)
                self._release_locked(extent)
                self._count(put_skipped=1)
            self._gauges_locked()
        return ok

    def _write_extent(self, key: int, extent: int, payload: memoryview) -> bool:
        n = len(payload)
        head = self._blocks.head
        head[:] = bytes(PAGE)
        head[:HEADER_BYTES] = ChunkHeader.for_payload(self.namespace.id, key, payload).pack()
        buffers, bounce = self._payload_iovecs(payload, n, for_read=False)
        try:
            fd, offset = self._slabs.for_write(extent)
            written = fileio.write_at(fd, [head, *buffers], offset)
            if written != PAGE + _padded(n):
                raise OSError(errno.EIO, f"short write: {written} of {PAGE + _padded(n)} bytes")
            if self.fsync:  # O_DIRECT returns once the device has the data; this also flushes its cache
                os.fdatasync(fd)
            return True
        except OSError as exc:
            log.warning("disk tier: write of %016x skipped: %s", key, exc)
            self._count(errors=1)
            return False
        finally:
            if bounce is not None:
                bounce.close()

    # --- get ---------------------------------------------------------------------------------------------
    def get_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> Future[list[int | None]]:
        futures, merge, _ = self._submit_reads(keys, buffers)
        return then(gather(futures), merge)

    def get_rows_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> list[Future[int | None]]:
        """Each key's future resolves when its I/O thread's share of the batch (rows strided) is read."""
        futures, _, _ = self._submit_reads(keys, buffers)
        return [then(futures[i % len(futures)], lambda sizes, j=i // len(futures): sizes[j]) for i in range(len(keys))]

    def get(self, keys: Sequence[int], buffers: Sequence[Buffer], timeout_s: float | None = None) -> list[int | None]:
        """Synchronous get. With ``timeout_s``, reads not started by then are given up and count as misses;
        reads already in the kernel are awaited, so no buffer is written after ``get`` returns."""
        futures, merge, stop = self._submit_reads(keys, buffers)
        if timeout_s is not None and wait(futures, timeout=timeout_s).not_done:
            stop.set()
        return merge([f.result() for f in futures])

    def _submit_reads(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> tuple[
            list[Future[list[int | None]]], Callable[[list[list[int | None]]], list[int | None]], threading.Event]:
        """One read task per I/O thread, its rows strided over the batch; the futures, the function that puts
        their results back in batch order, and the event that gives up the reads not yet started."""
        checked, views = self._check_batch(keys, buffers, writable=True)
        stop = threading.Event()
        rows = [range(g, len(checked), self._threads) for g in range(min(self._threads, len(checked)))]
        futures = [self._pool.submit(self._read_group, [checked[i] for i in r], [views[i] for i in r], stop)
                   for r in rows]

        def merge(results: list[list[int | None]]) -> list[int | None]:
            out: list[int | None] = [None] * len(checked)
            for r, sizes in zip(rows, results):
                for i, n in zip(r, sizes):
                    out[i] = n
            return out

        return futures, merge, stop

    def _read_group(self, keys: list[int], bufs: list[memoryview], stop: threading.Event) -> list[int | None]:
        out: list[int | None] = []
        for key, buf in zip(keys, bufs):
            if stop.is_set():
                self._count(gets=1, misses=1)
                out.append(None)
            else:
                out.append(self._read_one(key, buf))
        return out

    def _read_one(self, key: int, buf: memoryview) -> int | None:
        with self._lock:
            extent, n = self._where.get(key, (-1, 0))
            if extent < 0 or n > len(buf):
                extent = -1
            else:
                self._readers[extent] += 1  # pins the extent: a drop now defers its reuse to us
        if extent < 0:
            self._count(gets=1, misses=1)
            return None
        try:
            self._read_extent(key, extent, buf, n)
        except ChunkError as exc:
            log.warning("disk tier: %016x is damaged (%s); dropped", key, exc)
            self._count(gets=1, misses=1, corrupt=1)
            self._forget(key, extent)
            return None
        except OSError as exc:
            log.warning("disk tier: read of %016x failed: %s", key, exc)
            self._count(gets=1, misses=1, errors=1)
            return None
        finally:
            with self._lock:
                self._readers[extent] -= 1
                if not self._readers[extent]:
                    del self._readers[extent]
                    if extent in self._doomed:
                        self._doomed.discard(extent)
                        self._extents.free(extent)
        self._count(gets=1, hits=1, hit_bytes=n)
        return n

    def _read_extent(self, key: int, extent: int, buf: memoryview, n: int) -> None:
        """Read into ``buf[:n]`` and verify; ChunkError / OSError on any trouble."""
        head = self._blocks.head
        buffers, bounce = self._payload_iovecs(buf, n, for_read=True)
        try:
            fd, offset = self._slabs.for_read(extent)
            got = fileio.read_at(fd, [head, *buffers], offset)
            if got != PAGE + _padded(n):
                raise ChunkError(f"extent truncated: {got} of {PAGE + _padded(n)} bytes")
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
        """Forget ``key`` and free its extent (once no read of it is in flight)."""
        if self._index.remove(key) is None:
            return False
        self._release_locked(self._where.pop(key)[0])
        return True

    def _release_locked(self, extent: int) -> None:
        if self._readers[extent]:
            self._doomed.add(extent)
        else:
            self._extents.free(extent)

    def _forget(self, key: int, extent: int) -> None:
        """Drop a damaged ``key`` unless it was meanwhile dropped and stored again in another extent."""
        with self._lock:
            if self._where.get(key, (-1, 0))[0] == extent:
                self._drop_locked(key)
            self._gauges_locked()

    def _gauges_locked(self) -> None:
        self._set_gauges(used_bytes=self._index.used_bytes, entries=len(self._index))

    def _rebuild(self, extent_bytes: int | None) -> None:
        """Index the extents on disk; slabs of another geometry, beyond the capacity, or of the old format go.

        The geometry comes from ``extent_bytes`` when given, else from the slab files found (the most
        numerous size). Extents are indexed in order; of two holding the same key the first wins.
        """
        for entry in os.scandir(self.directory):
            if entry.name.endswith(_LEGACY_SUFFIXES):
                os.unlink(entry.path)
        found = slab_files(self.directory)
        if extent_bytes is None and found:
            extent_bytes = max(found, key=lambda e: (len(found[e]), e))
        for other, paths in found.items():
            if other != extent_bytes:
                log.warning("disk tier: removing %d slab(s) of %d-byte extents from %s", len(paths), other, self.directory)
                for path in paths.values():
                    os.unlink(path)
        if extent_bytes is None:
            return  # empty directory: the first put sets the geometry
        with self._lock:
            self._set_geometry_locked(extent_bytes)
        slabs, scan = self._slabs, []
        for slab, path in sorted(found.get(extent_bytes, {}).items()):
            if slab >= slabs.slab_count:
                os.unlink(path)
                continue
            size = slabs.adopt(slab)
            scan += [e for e in slabs.extents_of(slab) if slabs.locate(e)[1] + PAGE <= size]
        scan.sort()  # extent order: of two extents holding one key, the lower wins on every restart
        headers = list(self._pool.map(self._check_extent, scan, chunksize=256))
        with self._lock:
            used = []
            for extent, header in zip(scan, headers):
                if header is None or header.key in self._where:
                    continue
                self._index.add(header.key, extent_bytes)
                self._where[header.key] = (extent, header.payload_bytes)
                used.append(extent)
            self._extents = ExtentAllocator(slabs.extent_count, used)
            self._gauges_locked()

    def _check_extent(self, extent: int) -> ChunkHeader | None:
        """The header of a written, plausible extent; None for a never-written one or damage (counted)."""
        fd, offset = self._slabs.for_read(extent)
        head = self._blocks.head
        try:
            got = fileio.read_at(fd, [head], offset)
            if got == PAGE and not any(head[:HEADER_BYTES]):
                return None  # never written (a fresh, preallocated extent reads as zeros)
            if got != PAGE:
                raise ChunkError("header block truncated")
            header = ChunkHeader.unpack(head)
            if header.namespace_id != self.namespace.id:
                raise ChunkError("header names another namespace")
            if extent_bytes_for(header.payload_bytes) > self._slabs.extent_bytes:
                raise ChunkError(f"payload of {header.payload_bytes} bytes cannot fit the extent")
            if offset + extent_bytes_for(header.payload_bytes) > os.fstat(fd).st_size:
                raise ChunkError("slab truncated inside the payload")
            return header
        except (ChunkError, OSError) as exc:
            log.warning("disk tier: dropping extent %d: %s", extent, exc)
            self._count(corrupt=1)
            return None

    def close(self) -> None:
        """Finish queued I/O, then release threads, slab files and the directory lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            super().close()
        self._pool.shutdown(wait=True)
        if self._slabs is not None:
            self._slabs.close()
        os.close(self._lock_fd)
