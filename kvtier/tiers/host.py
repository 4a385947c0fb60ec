"""G2: one large host allocation carved into fixed slots, and the tier that keeps chunks in them.

The pool is the source and destination of the GPU transfer kernels and of disk and remote I/O, so a chunk
moves between tiers with one copy or one I/O. It is pinned through CUDA when a GPU exists (so kernels can
read it over UVA), page-aligned always (so O_DIRECT reads land straight in a slot), and slots are a multiple
of 4096 bytes (so a padded O_DIRECT read of a chunk's tail fits its slot).
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError
from kvtier.hashing import Namespace
from kvtier.tiers.base import Buffer, CapacityIndex, LocalTier, TierClosedError, check_key, completed

PAGE = 4096

CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02   # cudaHostRegisterPortable | cudaHostRegisterMapped


def round_up(n: int, multiple: int = PAGE) -> int:
    return -(-n // multiple) * multiple


def host_slots(capacity_bytes: int, slot_bytes: int, spare: int = 0, unit: str = "chunk") -> int:
    """The slots of ``slot_bytes`` (rounded as the pool rounds them) that ``host_capacity_bytes`` gives G2, checked
    before any memory is taken: with no slot beyond the ``spare`` ones (those chunks in flight to the tiers below
    use), a ConfigError naming the smallest G2 that works."""
    slot = round_up(slot_bytes)
    slots = capacity_bytes // slot
    if slots <= spare:
        smallest = (spare + 1) * slot
        beside = f" beside the {spare} spare slots of chunks in flight to the tiers below" if spare else ""
        raise ConfigError(f"host_capacity_bytes={capacity_bytes} holds {slots} {unit}s of {slot} B; the smallest G2 "
                          f"that holds one{beside} is {smallest} B (host_capacity_bytes: "
                          f"\"{-(-smallest // 2**20)}MiB\")")
    return slots


class PoolExhausted(MemoryError):
    """``HostPool.alloc`` found fewer free slots than asked for (nothing was taken)."""


class HostPool:
    """Fixed-size slots in one page-aligned host buffer; O(1) alloc and free from a free-list stack.

    ``pin=None`` pins when CUDA is available. Pinned memory comes from ``torch.empty(pin_memory=True)``
    (page-aligned by cudaHostAlloc) and is handed back to the driver on ``close``; plain memory is an
    anonymous mmap, faulted in at construction and unmapped on ``close`` (or, if views of it are still alive then, when the last one dies).
    ``buffer`` lays the slots over memory someone else owns (a shared-memory region other processes map
    too): it is pinned in place with ``cudaHostRegister`` and unregistered, never freed, on ``close``.
    Thread-safe.
    """

    def __init__(self, capacity_bytes: int, slot_bytes: int, pin: bool | None = None,
                 buffer: torch.Tensor | None = None) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
        self.slot_bytes = round_up(slot_bytes)
        self.num_slots = capacity_bytes // self.slot_bytes
        if self.num_slots <= 0:
            raise ValueError(f"capacity {capacity_bytes} B holds no slot of {self.slot_bytes} B")
        self.pinned = torch.cuda.is_available() if pin is None else pin
        if self.pinned and not torch.cuda.is_available():
            raise ValueError("pin=True needs CUDA")
        nbytes = self.num_slots * self.slot_bytes
        self._mmap: mmap.mmap | None = None
        self._registered = buffer is not None and self.pinned
        if buffer is not None:
            if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.device.type != "cpu" \
                    or buffer.numel() < nbytes:
                raise ValueError(f"an external pool buffer must be a 1-D CPU uint8 tensor of at least {nbytes} B, "
                                 f"got {buffer.dtype} {tuple(buffer.shape)} on {buffer.device}")
            self.buffer = buffer[:nbytes]
            if self._registered:  # mapped: the zero-copy kernels address it from the device
                _check_cuda(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), nbytes,
                                                                 CUDA_HOST_REGISTER_PORTABLE_MAPPED), "register")
        elif self.pinned:  # torch's pinned allocator does not promise page alignment (seen on an H200): align
            raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=True)
            start = -raw.data_ptr() % PAGE
            self.buffer = raw[start:start + nbytes]
        else:
            # faulted in now (MAP_POPULATE), not on each slot's first write: a cold pool's first fill measured
            # 8x slower than a warm one (benchmarks/RESULTS.md, G2 against LMCache)
            populate = getattr(mmap, "MAP_POPULATE", 0)
            self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
            self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8)
        if self.buffer.data_ptr() % PAGE:
            raise RuntimeError("host pool buffer is not page-aligned")
        self._lock = threading.Lock()
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._in_use = bytearray(self.num_slots)
        self._closed = False

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def try_alloc(self, n: int) -> list[int] | None:
        """``n`` slots, or None (taking nothing) when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        with self._lock:
            self._check_open()
            if n > len(self._free):
                return None
            slots = self._free[len(self._free) - n:]
            del self._free[len(self._free) - n:]
            for s in slots:
                self._in_use[s] = 1
            return slots

    def alloc(self, n: int) -> list[int]:
        """``n`` slots, all or nothing; ``PoolExhausted`` when fewer are free."""
        slots = self.try_alloc(n)
        if slots is None:
            raise PoolExhausted(f"{n} slots asked, {self.free_slots} of {self.num_slots} free")
        return slots

    def free(self, slots: Sequence[int]) -> None:
        """Return slots; an unknown, repeated or already free slot is a ValueError (nothing is freed)."""
        with self._lock:
            self._check_open()
            seen = set()
            for s in slots:
                if not isinstance(s, int) or not 0 <= s < self.num_slots:
                    raise ValueError(f"slot {s!r} out of range 0..{self.num_slots - 1}")
                if not self._in_use[s] or s in seen:
                    raise ValueError(f"slot {s} is not allocated (double free?)")
                seen.add(s)
            for s in slots:
                self._in_use[s] = 0
                self._free.append(s)

    def view(self, slot: int) -> torch.Tensor:
        """The slot's ``slot_bytes`` bytes as a uint8 tensor sharing the pool's memory."""
        self._check_slot(slot)
        return self.buffer[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def address(self, slot: int) -> int:
        self._check_slot(slot)
        return self.buffer.data_ptr() + slot * self.slot_bytes

    def close(self) -> None:
        """Release the memory; later calls raise ``TierClosedError``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._free.clear()
            address, self.buffer = self.buffer.data_ptr(), torch.empty(0, dtype=torch.uint8)
            if self._registered:
                torch.cuda.synchronize()
                _check_cuda(torch.cuda.cudart().cudaHostUnregister(address), "unregister")
            elif self.pinned:
                torch.cuda.synchronize()  # no kernel may still read or write the slots
                empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
                if empty_host_cache is not None:
                    empty_host_cache()
            else:
                # not mmap.close(): torch.frombuffer keeps a reference to the mmap, not a buffer export, so close()
                # would unmap under live views; dropped, it is unmapped when the last view of it dies
                self._mmap = None

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TierClosedError("host pool is closed")

    def _check_slot(self, slot: int) -> None:
        self._check_open()
        if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot!r} out of range 0..{self.num_slots - 1}")


def _check_cuda(status: object, what: str) -> None:
    code = getattr(status, "value", status)
    if code != 0:
        raise RuntimeError(f"cudaHost{what.capitalize()} of the host pool failed with CUDA error {code}")


@dataclass
class _Entry:
    slot: int
    nbytes: int
    readers: int = 0
    dropped: bool = False  # deleted while being read: the last reader frees the slot


class HostTier(LocalTier):
    """G2 as a Tier: each chunk in one pool slot, LRU (or the manager's hook) when full.

    Entries being read (``get`` or ``borrow``) are never overwritten: dropping one defers freeing its slot
    to the last reader. Operations complete synchronously (memory copies); the futures come back done.
    """

    name = "host"

    def __init__(self, namespace: Namespace, pool: HostPool, own_pool: bool = False) -> None:
        super().__init__(namespace)
        self.pool = pool
        self._own_pool = own_pool
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._reserved: dict[int, _Entry] = {}   # slots being written in place (see ``reserve``)
        self._index = CapacityIndex(pool.capacity_bytes)
        self._set_gauges(capacity_bytes=pool.capacity_bytes)

    @classmethod
    def from_config(cls, cfg: KvtierConfig, namespace: Namespace, slot_bytes: int) -> HostTier:
        """A tier over its own pool of ``cfg.host_capacity_bytes`` in slots of ``slot_bytes`` (one chunk)."""
        return cls(namespace, HostPool(cfg.host_capacity_bytes, slot_bytes), own_pool=True)

    @property
    def capacity_bytes(self) -> int:
        return self.pool.capacity_bytes

    def put_async(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> Future[list[bool]]:
        return completed(self.put(keys, payloads))

    def get_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> Future[list[int | None]]:
        return completed(self.get(keys, buffers))

    def put(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> list[bool]:
        checked, views = self._check_batch(keys, payloads, writable=False)
        too_big = [len(v) for v in views if len(v) > self.pool.slot_bytes]
        if too_big:
            raise ValueError(f"payload of {too_big[0]} B exceeds the host slot of {self.pool.slot_bytes} B")
        return [self._put_one(k, v) for k, v in zip(checked, views)]

    def _put_one(self, key: int, payload: memoryview) -> bool:
        with self._lock:
            if key in self._entries:
                return True
        slot_view = self.reserve(key, len(payload))
        if slot_view is None:
            return False
        np.copyto(slot_view.numpy(), np.frombuffer(payload, dtype=np.uint8))
        self.commit(key)
        return True

    def reserve(self, key: int, nbytes: int) -> torch.Tensor | None:
        """A slot view of ``nbytes`` to write chunk ``key`` into in place (the GPU gather kernel writes there
        directly: no staging copy). Invisible to readers until ``commit``; ``abort`` gives the slot back.
        None when the key is already stored or being written, or no slot can be had (a skipped put)."""
        key = check_key(key)
        if not 0 < nbytes <= self.pool.slot_bytes:
            raise ValueError(f"chunk of {nbytes} B does not fit a host slot of {self.pool.slot_bytes} B")
        slot_bytes = self.pool.slot_bytes
        with self._lock:
            self._check_open()
            if key in self._entries or key in self._reserved:
                return None
            # None when full (the manager evicts, never this tier) or when others share the pool and took the slots
            slots = self.pool.try_alloc(1) if self._index.fits(slot_bytes) else None
            if slots is None:
                self._count(put_skipped=1)
                return None
            self._index.reserve(slot_bytes)
            self._reserved[key] = _Entry(slots[0], nbytes)
        return self.pool.view(slots[0])[:nbytes]

    def writing(self, key: int) -> bool:
        """Whether ``key`` is reserved and not yet committed or aborted (a write in flight)."""
        with self._lock:
            return key in self._reserved

    def commit(self, key: int) -> None:
        """The reserved slot of ``key`` holds its chunk: make it visible."""
        with self._lock:
            entry = self._reserved.pop(key, None)
            if entry is None:
                raise ValueError(f"commit of chunk {key:#x} that was not reserved")
            if self._closed:
                return
            self._index.commit(key, self.pool.slot_bytes)
            self._entries[key] = entry
            self._count(puts=1, put_bytes=entry.nbytes)
            self._gauges_locked()

    def abort(self, key: int) -> None:
        """Give back the reserved slot of ``key`` (its write failed or was not needed)."""
        with self._lock:
            entry = self._reserved.pop(key, None)
            if entry is None:
                raise ValueError(f"abort of chunk {key:#x} that was not reserved")
            if self._closed:
                return
            self._index.unreserve(self.pool.slot_bytes)
            self.pool.free([entry.slot])
            self._count(put_skipped=1)

    def slot_offset(self, view: torch.Tensor) -> int:
        """Byte offset of a slot view (from ``reserve`` or ``borrow``) in ``pool.buffer``: kernels address
        slots as offsets into the one pinned arena."""
        return view.data_ptr() - self.pool.buffer.data_ptr()

    def get(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> list[int | None]:
        checked, views = self._check_batch(keys, buffers, writable=True)
        out: list[int | None] = []
        for key, buf in zip(checked, views):
            with self.borrow(key) as src:
                if src is None or len(src) > len(buf):
                    self._count(gets=1, misses=1)
                    out.append(None)
                    continue
                # torch's copy spreads a large chunk over its intra-op threads, as LMCache's gets do (its CPU
                # backend's gets measured 14.4 against 11.2 GB/s for 4 MiB chunks with numpy's single thread)
                torch.frombuffer(buf, dtype=torch.uint8)[:len(src)].copy_(src)
                self._count(gets=1, hits=1, hit_bytes=len(src))
                out.append(len(src))
        return out

    @contextlib.contextmanager
    def borrow(self, key: int) -> Iterator[torch.Tensor | None]:
        """Zero-copy access to a stored chunk for the length of a ``with`` block; None when absent."""
        held = self.hold(key)
        if held is None:
            yield None
            return
        view, let_go = held
        try:
            yield view
        finally:
            let_go()

    def hold(self, key: int) -> tuple[torch.Tensor, Callable[[], None]] | None:
        """Zero-copy access to a stored chunk across threads or calls (a disk write's source, a load still on
        the GPU's side stream): its slot view and the call that lets it go, once. The slot is not reused before
        that, even if the entry is deleted meanwhile. None when absent."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.readers += 1

        def let_go() -> None:
            with self._lock:
                entry.readers -= 1
                if entry.dropped and entry.readers == 0 and not self._closed:
                    self.pool.free([entry.slot])

        return self.pool.view(entry.slot)[:entry.nbytes], let_go

    def _holds_locked(self, key: int) -> bool:
        return key in self._entries

    def _drop_locked(self, key: int) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._index.remove(key)
        if entry.readers:
            entry.dropped = True
        else:
            self.pool.free([entry.slot])
        return True

    def _gauges_locked(self) -> None:
        self._set_gauges(used_bytes=self._index.used_bytes, entries=len(self._entries))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            super().close()
            self._entries.clear()
            if self._own_pool:
                self.pool.close()
