"""The Tier protocol shared by G2 (host), G3 (disk) and G4 (remote), and what they have in common.

Every tier stores chunks of one ``Namespace`` (fixed when the tier is built), keyed by the 64-bit seq hash
of the chunk's last block. Operations are batched. ``put_async`` / ``get_async`` return a
``concurrent.futures.Future`` so the serving path never blocks on a lower tier; ``put`` / ``get`` are the
synchronous forms. A failing tier degrades: a failure is a per-key ``False`` / ``None``, logged and counted
in ``stats()``, never an exception. Exceptions are kept for caller bugs (bad keys, wrong buffer types,
use after ``close``), raised before anything touches memory.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from kvtier.hashing import Namespace

Buffer = torch.Tensor | memoryview | bytearray | bytes | np.ndarray
"""A chunk payload: a 1-D uint8 CPU tensor (e.g. a host-pool slot view), or any C-contiguous buffer."""


U64_MAX = 2**64 - 1
T = TypeVar("T")
U = TypeVar("U")


class TierClosedError(RuntimeError):
    """An operation on a tier after ``close()``: a caller bug, so it raises instead of missing."""


@dataclass
class StoreStats:
    """Counters of one tier; ``Tier.stats()`` returns a snapshot copy."""

    puts: int = 0               # chunks stored
    put_bytes: int = 0
    put_skipped: int = 0        # writes given up: full, I/O error, server down, circuit open, busy
    gets: int = 0               # chunks asked for
    hits: int = 0
    hit_bytes: int = 0
    misses: int = 0             # includes every failure below
    corrupt: int = 0            # header / checksum / size failures: served as a miss, entry dropped
    errors: int = 0             # I/O or connection errors turned into misses and skips
    deletes: int = 0
    bounce_copies: int = 0      # payloads that had to go through an aligned bounce buffer (unaligned caller buffer)
    buffered_fallbacks: int = 0 # disk: O_DIRECT refused by the file system, buffered I/O used instead
    breaker_opens: int = 0      # remote: times the circuit breaker opened
    used_bytes: int = 0
    capacity_bytes: int = 0
    entries: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def check_key(key: Any) -> int:
    """A chunk key is the u64 seq hash of its last block; anything else is a caller bug."""
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= int(key) <= U64_MAX:
        raise ValueError(f"chunk key must be an unsigned 64-bit integer, got {key!r}")
    return int(key)


def as_bytes_view(buf: Buffer, writable: bool) -> memoryview:
    """A flat byte ``memoryview`` over ``buf`` without copying; ValueError for anything that cannot be one."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"tier buffers must be CPU (host) tensors, got device {buf.device}")
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError(f"tier buffers must be 1-D contiguous uint8 tensors, got {buf.dtype} {tuple(buf.shape)}")
        buf = buf.numpy()
    try:
        view = memoryview(buf)
    except TypeError:
        raise ValueError(f"not a buffer: {type(buf).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("tier buffers must be C-contiguous")
    if writable and view.readonly:
        raise ValueError("get needs writable buffers")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def buffer_address(view: memoryview) -> int:
    """The address of a buffer's first byte (alignment checks for O_DIRECT)."""
    if len(view) == 0:
        return 0
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def gather(futures: Sequence[Future[T]]) -> Future[list[T]]:
    """One future for the results of many, in order, without a thread waiting on them."""
    out: Future[list[T]] = Future()
    out.set_running_or_notify_cancel()
    if not futures:
        out.set_result([])
        return out
    remaining = [len(futures)]
    lock = threading.Lock()

    def done(_: Future[T]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            try:
                out.set_result([f.result() for f in futures])
            except BaseException as exc:  # a task bug (never an I/O failure: those are results)
                out.set_exception(exc)

    for f in futures:
        f.add_done_callback(done)
    return out


def then(future: Future[T], fn: Callable[[T], U]) -> Future[U]:
    """A future for ``fn(result)``; an exception in either step lands in it (never lost in a callback)."""
    out: Future[U] = Future()
    out.set_running_or_notify_cancel()

    def done(f: Future[T]) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as exc:
            out.set_exception(exc)

    future.add_done_callback(done)
    return out


def completed(value: T) -> Future[T]:
    future: Future[T] = Future()
    future.set_result(value)
    return future


class Tier(abc.ABC):
    """Batched chunk storage for one namespace. See the module docstring for the failure contract.

    ``get`` writes each hit's payload into the front of its buffer and reports the payload size; the
    buffer must stay untouched until the result is known. On a miss the buffer's content is undefined.
    """

    name: str = "tier"

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self._stats = StoreStats()
        self._stats_lock = threading.Lock()
        self._closed = False

    # --- the protocol ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def put_async(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> Future[list[bool]]:
        """Store each payload under its key; per key True when stored (or already there), False when skipped."""

    @abc.abstractmethod
    def get_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> Future[list[int | None]]:
        """Read each chunk into its buffer; per key the payload size on a hit, None on a miss."""

    @abc.abstractmethod
    def contains(self, keys: Sequence[int]) -> list[bool]:
        """Whether each key is (as far as the tier knows without reading it) stored."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[int]) -> list[bool]:
        """Drop each key; per key whether it was there."""

    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes this tier may hold (0: bounded by the server, e.g. Redis maxmemory)."""

    def get_rows_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> list[Future[int | None]]:
        """``get_async`` with one future per key, for a caller that uses each chunk as soon as it lands (and
        gives up on a late one alone). Here they all resolve with the batch; a tier that reads parts of a
        batch concurrently resolves each part's keys when that part is done."""
        batch = self.get_async(keys, buffers)
        return [then(batch, lambda sizes, i=i: sizes[i]) for i in range(len(keys))]

    def put(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> list[bool]:
        return self.put_async(keys, payloads).result()

    def get(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> list[int | None]:
        return self.get_async(keys, buffers).result()

    async def put_aio(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> list[bool]:
        """``put`` for asyncio callers: awaits the I/O threads without blocking the event loop."""
        return await asyncio.wrap_future(self.put_async(keys, payloads))

    async def get_aio(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> list[int | None]:
        """``get`` for asyncio callers: awaits the I/O threads without blocking the event loop."""
        return await asyncio.wrap_future(self.get_async(keys, buffers))

    def stats(self) -> StoreStats:
        with self._stats_lock:
            return dataclasses.replace(self._stats)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers for implementations --------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def _set_gauges(self, **values: int) -> None:
        with self._stats_lock:
            for name, value in values.items():
                setattr(self._stats, name, value)

    def _check_open(self) -> None:
        if self._closed:
            raise TierClosedError(f"{self.name} tier is closed")

    def _check_batch(self, keys: Sequence[int], buffers: Sequence[Buffer], writable: bool) -> tuple[list[int], list[memoryview]]:
        """Validate a whole batch before any I/O: bad input raises, nothing half-done."""
        self._check_open()
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        checked = [check_key(k) for k in keys]
        views = [as_bytes_view(b, writable) for b in buffers]
        if not writable and any(len(v) == 0 for v in views):
            raise ValueError("empty payloads cannot be stored")
        return checked, views


class CapacityIndex:
    """Key -> stored size with a byte budget: what a local tier (G2, G3) holds and how full it is.

    Space is reserved before a write and committed after it, so concurrent writers never overshoot. A tier
    never chooses what to drop: the block manager does, and a write that does not fit is skipped. Not
    thread-safe on its own: the owning tier holds its lock around every call.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._sizes: dict[int, int] = {}
        self._stored = 0
        self._reserved = 0

    def __contains__(self, key: int) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[int]:
        return list(self._sizes)

    @property
    def used_bytes(self) -> int:
        return self._stored + self._reserved

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.capacity_bytes

    def reserve(self, nbytes: int) -> None:
        self._reserved += nbytes

    def unreserve(self, nbytes: int) -> None:
        self._reserved -= nbytes

    def commit(self, key: int, nbytes: int) -> None:
        self._reserved -= nbytes
        self.add(key, nbytes)

    def add(self, key: int, nbytes: int) -> None:
        self._stored += nbytes - self._sizes.pop(key, 0)
        self._sizes[key] = nbytes

    def remove(self, key: int) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._stored -= size
        return size


class LocalTier(Tier):
    """A tier whose index lives in this process (G2, G3): membership and deletes under one lock."""

    _lock: threading.Lock
    _index: CapacityIndex

    @abc.abstractmethod
    def _holds_locked(self, key: int) -> bool: ...

    @abc.abstractmethod
    def _drop_locked(self, key: int) -> bool: ...

    @abc.abstractmethod
    def _gauges_locked(self) -> None: ...

    def contains(self, keys: Sequence[int]) -> list[bool]:
        checked = [check_key(k) for k in keys]
        with self._lock:
            self._check_open()
            return [self._holds_locked(k) for k in checked]

    def delete(self, keys: Sequence[int]) -> list[bool]:
        checked = [check_key(k) for k in keys]
        with self._lock:
            self._check_open()
            out = [self._drop_locked(k) for k in checked]
            self._count(deletes=sum(out))
            self._gauges_locked()
            return out

    def held_keys(self) -> list[int]:
        """Every chunk this tier holds (a disk's rebuilt index after a restart): what a manager adopts."""
        with self._lock:
            self._check_open()
            return [k for k in self._index.keys() if self._holds_locked(k)]

    def clear(self) -> int:
        """Drop every chunk held (writes in flight still land); how many were dropped."""
        with self._lock:
            self._check_open()
            dropped = sum(self._drop_locked(k) for k in self._index.keys())
            self._count(deletes=dropped)
            self._gauges_locked()
            return dropped


def guarded(what: str, call: Callable[[], T], default: T, on_error: Callable[[], None] | None = None) -> T:
    """Run a tier call for a caller that must never fail: tiers report failures as misses, and anything that
    still escapes (a bug) is logged, counted through ``on_error`` and treated as ``default`` (a miss)."""
    try:
        return call()
    except Exception:  # noqa: BLE001 - a lower tier must never break the serving path
        logging.getLogger(__name__).exception("kvtier: %s failed", what)
        if on_error is not None:
            on_error()
        return default
