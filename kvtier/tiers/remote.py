"""G4: chunks in Redis or Valkey (single server or Redis Cluster) through redis-py with hiredis.

A chunk that fits in one part (``remote_part_bytes``) is ONE value, its 52-byte ``ChunkHeader`` (flagged
inline) followed by the payload, written by one ``SET`` and read by one ``GET``: a SET replaces a value
atomically, so there is no partial write to hide and no manifest or delete to send. A larger chunk is
stored as its parts (raw payload) and a manifest (the header plus the part size) written LAST in the same
pipeline, after deleting the old manifest: a reader sees the manifest only once every part is there, so a
partial write is never a hit. All of a chunk's keys share a hash tag, so in a cluster they live on one
shard and one ``MGET`` reads the manifest and every part atomically, in one round trip. Readers accept
either form whatever their own part size (a manifest found where one value was expected fetches its parts
in a second round trip). A one-value put over an older multi-part version of the same key leaves its
parts behind until their TTL or the server's eviction. Keys are namespaced by model, dtype, layout,
tensor-parallel rank and tenant salt (``Namespace.prefix``).

Payloads go out as memoryviews, not copied on the client. Against one server, one-value chunks skip the
redis-py pipeline (``resp_direct``): SETs are framed by hand around header and payload, and GETs receive
each payload straight into the caller's buffer, so the kernel's copy is the only one. Through a cluster, and
for multi-part chunks, a one-value chunk costs one join of header and payload, and hiredis hands replies
back as bytes, copied once into the caller's buffer. A value that fails its header or
checksum is a miss and is deleted. A dead or slow server (socket timeouts) becomes misses and skipped
writes; a circuit breaker then skips the server for an exponentially growing backoff and probes it
again; redis-py reconnects on the next request.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from kvtier.chunk import HEADER_BYTES, ChunkError, ChunkHeader
from kvtier.config import KvtierConfig
from kvtier.hashing import Namespace
from kvtier.tiers.base import Buffer, Tier, check_key, gather, then
from kvtier.tiers.breaker import CircuitBreaker
from kvtier.tiers.resp_direct import Landed, Reply, available, get_into, set_joined

log = logging.getLogger(__name__)

_PART_SIZE = struct.Struct("<Q")
MANIFEST_BYTES = HEADER_BYTES + _PART_SIZE.size
INLINE_FLAG = 1  # ChunkHeader.flags bit: this value is the header followed by the payload, not a manifest
# A pipeline costs a thread hand-off and a round trip whatever it carries (~0.2-0.9 ms on a loaded 2-core
# host): 16 chunks of 256 KiB put 10-20% faster over 2 pipelines than 4, 16 of 512 KiB 15% faster over 4.
MIN_PIPELINE_BYTES = 2 << 20
_FAILURES = (redis.RedisError, OSError)
T = TypeVar("T")


def _zero_copy_packer() -> Any:
    """redis-py's pure-Python command packer sends memoryviews as they are; its hiredis packer copies them
    twice. Replies are still parsed by hiredis. None (library default) if redis-py's internals moved."""
    try:
        from redis._parsers.encoders import Encoder
        from redis.connection import PythonRespSerializer
    except ImportError:
        return None
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def connect(url: str, password: str = "", username: str = "", timeout_s: float = 0.5,
            tls_ca_file: str = "", tls_cert_file: str = "", tls_key_file: str = "") -> redis.Redis | RedisCluster:
    """A client for ``redis://``, ``rediss://`` (TLS) or ``redis+cluster://`` / ``rediss+cluster://`` URLs.

    Timeouts bound every request; one immediate retry on a broken connection lets a restarted server be
    picked up without a miss, and nothing retries longer (the circuit breaker does that, without blocking).
    TLS: ``tls_ca_file`` verifies the server (system CAs when empty); ``tls_cert_file`` + ``tls_key_file``
    authenticate this client to a server that asks (``tls-auth-clients``). ValueError for TLS files with a
    plain URL, a certificate without its key, or a file that does not exist.
    """
    tls_files = {"tls_ca_file": tls_ca_file, "tls_cert_file": tls_cert_file, "tls_key_file": tls_key_file}
    if any(tls_files.values()) and not url.startswith("rediss"):
        raise ValueError(f"TLS files given for a non-TLS URL {url!r}: use rediss://")
    if bool(tls_cert_file) != bool(tls_key_file):
        raise ValueError("tls_cert_file and tls_key_file go together (the client's certificate and its key)")
    for name, path in tls_files.items():
        if path and not os.path.isfile(path):
            raise ValueError(f"{name} {path!r} is not a file")
    cluster = "+cluster://" in url
    url = url.replace("+cluster://", "://")
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "socket_read_size": 4 << 20,  # large replies in few reads: measured 2x get throughput on 32 MiB chunks
    }
    if password:
        kwargs["password"] = password
    if username:
        kwargs["username"] = username
    if url.startswith("rediss://"):
        kwargs.update({k: v for k, v in (("ssl_ca_certs", tls_ca_file), ("ssl_certfile", tls_cert_file),
                                         ("ssl_keyfile", tls_key_file)) if v})
    packer = _zero_copy_packer()
    if packer is not None:
        kwargs["command_packer"] = packer
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)


def unreachable_reason(cfg: KvtierConfig) -> str | None:
    """Why the configured server cannot be used now (one PING, within ``remote_timeout_s``), or None. For
    start-up messages only: the tier itself degrades to misses and reconnects on its own."""
    try:
        client = connect(cfg.remote_url, cfg.remote_password, cfg.remote_username, cfg.remote_timeout_s,
                         cfg.remote_tls_ca_file, cfg.remote_tls_cert_file, cfg.remote_tls_key_file)
    except ValueError as exc:
        return str(exc)
    try:
        client.ping()
    except _FAILURES as exc:
        return str(exc) or type(exc).__name__
    finally:
        client.close()
    return None


class RemoteTier(Tier):
    """Chunks of one namespace in Redis; see the module docstring.

    ``put``: True when every command of the chunk succeeded. ``get``: a buffer smaller than the stored
    payload is a miss. Batches are split over up to ``connections`` worker threads, one pipeline each
    (fewer for small batches: see ``MIN_PIPELINE_BYTES``).
    """

    name = "remote"

    def __init__(self, namespace: Namespace, client: redis.Redis | RedisCluster, part_bytes: int = 8 << 20,
                 ttl_s: int = 0, connections: int = 4, breaker: CircuitBreaker | None = None) -> None:
        super().__init__(namespace)
        if part_bytes <= 0 or ttl_s < 0 or connections <= 0:
            raise ValueError("part_bytes and connections must be positive, ttl_s not negative")
        self.client = client
        self.part_bytes = part_bytes
        self.ttl_s = ttl_s or None
        self.breaker = breaker or CircuitBreaker()
        self._connections = connections
        self._direct = isinstance(client, redis.Redis) and available()  # one server: GETs land in the buffers
        self._pool = ThreadPoolExecutor(connections, thread_name_prefix="kvtier-remote")

    @classmethod
    def from_config(cls, cfg: KvtierConfig, namespace: Namespace) -> RemoteTier:
        if not cfg.remote_url:
            raise ValueError("remote_url is empty: no remote tier configured")
        client = connect(cfg.remote_url, cfg.remote_password, cfg.remote_username, cfg.remote_timeout_s,
                         cfg.remote_tls_ca_file, cfg.remote_tls_cert_file, cfg.remote_tls_key_file)
        return cls(namespace, client, cfg.remote_part_bytes, cfg.remote_ttl_s, cfg.remote_connections)

    @property
    def capacity_bytes(self) -> int:
        return 0  # bounded by the server (maxmemory and its eviction policy)

    # --- keys ----------------------------------------------------------------------------------------------
    def manifest_key(self, key: int) -> str:
        """``<namespace prefix>/{<key hex>}``: the hash tag puts a chunk's keys in one cluster slot."""
        return f"{self.namespace.prefix}/{{{check_key(key):016x}}}"

    def part_keys(self, key: int, count: int) -> list[str]:
        base = self.manifest_key(key)
        return [f"{base}/p{i}" for i in range(count)]

    def _parts_for(self, nbytes: int, part_bytes: int | None = None) -> int:
        return max(1, -(-nbytes // (part_bytes or self.part_bytes)))

    # --- batching --------------------------------------------------------------------------------------------
    def _split(self, count: int, nbytes: int) -> list[range]:
        """Rows per pipeline: up to one per connection, each carrying at least ``MIN_PIPELINE_BYTES``."""
        groups = max(1, min(self._connections, count, nbytes // MIN_PIPELINE_BYTES))
        return [range(count * g // groups, count * (g + 1) // groups) for g in range(groups)]

    def _run_parts(self, views: list[memoryview], job: Callable[[range], list[T]], failed: T
                   ) -> list[tuple[range, Future[list[T]]]]:
        """Run ``job`` over slices of a batch (one pipeline each) on the worker threads: each slice's rows and
        the future of its results."""
        return [(rows, self._pool.submit(self._guarded, job, rows, failed))
                for rows in self._split(len(views), sum(map(len, views)))]

    def _run_batch(self, views: list[memoryview], job: Callable[[range], list[T]], failed: T) -> Future[list[T]]:
        """``_run_parts`` with one future for the joined results."""
        parts = [future for _, future in self._run_parts(views, job, failed)]
        return then(gather(parts), lambda results: [x for part in results for x in part])

    def _guarded(self, job: Callable[[range], list[T]], rows: range, failed: T) -> list[T]:
        """The breaker around one pipeline: skipped while open, every failure a per-key ``failed``."""
        if not self.breaker.allow():
            return [failed] * len(rows)
        try:
            result = job(rows)
        except _FAILURES as exc:
            opened = self.breaker.record_failure()
            self._count(errors=1, breaker_opens=int(opened))
            log.warning("remote tier: %s %s", type(exc).__name__, exc)
            return [failed] * len(rows)
        self.breaker.record_success()
        return result

    # --- put -------------------------------------------------------------------------------------------------
    def put_async(self, keys: Sequence[int], payloads: Sequence[Buffer]) -> Future[list[bool]]:
        checked, views = self._check_batch(keys, payloads, writable=False)
        if not checked:
            return gather([])

        def job(rows: range) -> list[bool]:
            if self._direct and all(len(views[i]) <= self.part_bytes for i in rows):
                return self._on_connection(set_joined, [self.manifest_key(checked[i]) for i in rows],
                                           [self._one_value(checked[i], views[i]) for i in rows], self.ttl_s)
            pipe = self.client.pipeline(transaction=False)
            for i in rows:
                self._queue_put(pipe, checked[i], views[i])
            replies = pipe.execute(raise_on_error=False)
            return self._per_chunk(replies, [self._commands_per_put(len(views[i])) for i in rows])

        return then(self._run_batch(views, job, False), lambda ok: self._count_puts(ok, views))

    def _commands_per_put(self, nbytes: int) -> int:
        return 1 if nbytes <= self.part_bytes else 2 + self._parts_for(nbytes)

    def _queue_put(self, pipe: Any, key: int, payload: memoryview) -> None:
        base = self.manifest_key(key)
        if len(payload) <= self.part_bytes:  # one atomic SET replaces any older version, inline or manifest
            pipe.set(base, b"".join(self._one_value(key, payload)), ex=self.ttl_s)
            return
        header = ChunkHeader.for_payload(self.namespace.id, key, payload)
        manifest = header.pack() + _PART_SIZE.pack(self.part_bytes)
        pipe.execute_command("UNLINK", base)  # the old version disappears first: readers never pair it with new parts
        for i, part in enumerate(self.part_keys(key, self._parts_for(len(payload)))):
            pipe.set(part, payload[i * self.part_bytes:(i + 1) * self.part_bytes], ex=self.ttl_s)
        pipe.set(base, manifest, ex=self.ttl_s)  # last: the chunk becomes visible complete

    def _one_value(self, key: int, payload: memoryview) -> tuple[bytes, memoryview]:
        """The pieces of a one-value chunk: its header, flagged inline, then the payload."""
        return ChunkHeader.for_payload(self.namespace.id, key, payload, flags=INLINE_FLAG).pack(), payload

    @staticmethod
    def _per_chunk(replies: list[Any], counts: list[int]) -> list[bool]:
        out, at = [], 0
        for n in counts:
            out.append(not any(isinstance(r, Exception) for r in replies[at:at + n]))
            at += n
        return out

    def _count_puts(self, ok: list[bool], views: list[memoryview]) -> list[bool]:
        stored = [len(v) for v, good in zip(views, ok) if good]
        self._count(puts=len(stored), put_bytes=sum(stored), put_skipped=len(ok) - len(stored))
        return ok

    # --- get -------------------------------------------------------------------------------------------------
    def get_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> Future[list[int | None]]:
        parts = [future for _, future in self._submit_gets(keys, buffers)]
        return then(gather(parts), lambda results: [n for part in results for n in part])

    def get_rows_async(self, keys: Sequence[int], buffers: Sequence[Buffer]) -> list[Future[int | None]]:
        """Each key's future resolves when its pipeline's replies are in, so a slow pipeline delays (and a
        deadline gives up) only its own keys."""
        return [then(future, lambda sizes, j=j: sizes[j])
                for rows, future in self._submit_gets(keys, buffers) for j in range(len(rows))]

    def _submit_gets(self, keys: Sequence[int], buffers: Sequence[Buffer]
                     ) -> list[tuple[range, Future[list[int | None]]]]:
        checked, views = self._check_batch(keys, buffers, writable=True)
        if not checked:
            return []

        def job(rows: range) -> list[int | None]:
            single = [len(views[i]) <= self.part_bytes for i in rows]
            if self._direct and all(single):
                replies = self._on_connection(get_into, [self.manifest_key(checked[i]) for i in rows],
                                              [views[i] for i in rows], HEADER_BYTES, MANIFEST_BYTES)
                return [self._land(checked[i], views[i], reply) for i, reply in zip(rows, replies)]
            pipe = self.client.pipeline(transaction=False)
            for i, one in zip(rows, single):
                base = self.manifest_key(checked[i])
                if one:  # fits one value: one GET (a manifest found there fetches its parts afterwards)
                    pipe.get(base)
                else:
                    pipe.execute_command("MGET", base, *self.part_keys(checked[i], self._parts_for(len(views[i]))))
            replies = pipe.execute(raise_on_error=False)
            return [self._assemble(checked[i], views[i], [reply] if one and not isinstance(reply, Exception) else reply)
                    for i, one, reply in zip(rows, single, replies)]

        return [(rows, then(future, self._count_gets)) for rows, future in self._run_parts(views, job, None)]

    def _assemble(self, key: int, buf: memoryview, reply: Any) -> int | None:
        """Copy a chunk (inline value or parts) into ``buf`` once verified; None (and the chunk deleted if
        damaged) otherwise. ``reply`` is [base value, parts...]."""
        if isinstance(reply, Exception):
            raise reply  # the server answered with an error: a failure like a dropped connection
        manifest, parts = reply[0], reply[1:]
        if manifest is None:
            return None
        try:
            header = ChunkHeader.unpack(manifest)
            if header.flags & INLINE_FLAG:
                return self._copy_inline(key, buf, header, manifest)
            if len(manifest) != MANIFEST_BYTES:
                raise ChunkError(f"manifest is {len(manifest)} bytes, expected {MANIFEST_BYTES}")
            (part_bytes,) = _PART_SIZE.unpack_from(manifest, HEADER_BYTES)
            n = header.payload_bytes
            if n > len(buf):
                return None  # the caller's buffer is too small: a miss, the chunk is fine
            count = self._parts_for(n, part_bytes)
            if part_bytes != self.part_bytes or count > len(parts):  # written with another part size
                parts = self.client.execute_command("MGET", *self.part_keys(key, count))
            at = 0
            for part in parts[:count]:
                if part is None or at + len(part) > n:
                    raise ChunkError("a part is missing or too long")
                buf[at:at + len(part)] = part
                at += len(part)
            header.verify(self.namespace.id, key, buf[:at])
            return n
        except ChunkError as exc:
            self._damaged(key, exc, max(len(parts), self._parts_for(len(buf))))
            return None

    def _on_connection(self, call: Callable[..., T], *args: Any) -> T:
        """``call(conn, *args)`` on one pooled connection (``resp_direct``), with one immediate retry on a
        broken connection, as for pipelines; the connection is dropped whenever the call fails."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            return conn.retry.call_with_retry(lambda: call(conn, *args), lambda _error: conn.disconnect())
        except BaseException:
            conn.disconnect()  # replies may be left unread: the stream is out of step
            raise
        finally:
            pool.release(conn)

    def _land(self, key: int, buf: memoryview, reply: Reply) -> int | None:
        """Verify a value whose payload already arrived in ``buf``; other replies go through ``_assemble``."""
        if not isinstance(reply, Landed):
            return self._assemble(key, buf, [reply])
        try:
            header = ChunkHeader.unpack(reply.head)
            if not header.flags & INLINE_FLAG:
                raise ChunkError("a value longer than a manifest is not flagged inline")
            header.verify(self.namespace.id, key, buf[:reply.nbytes])
            return reply.nbytes
        except ChunkError as exc:
            self._damaged(key, exc, 1)
            return None

    def _damaged(self, key: int, exc: ChunkError, part_count: int) -> None:
        log.warning("remote tier: %016x is damaged (%s); deleted", key, exc)
        self._count(corrupt=1)
        self._delete_now([key], part_count)

    def _copy_inline(self, key: int, buf: memoryview, header: ChunkHeader, value: bytes) -> int | None:
        """Verify a header+payload value that came back whole, then copy its payload into ``buf``."""
        if header.payload_bytes > len(buf):
            return None  # the caller's buffer is too small: a miss, the chunk is fine
        payload = memoryview(value)[HEADER_BYTES:]
        header.verify(self.namespace.id, key, payload)
        buf[:len(payload)] = payload
        return len(payload)

    def _count_gets(self, sizes: list[int | None]) -> list[int | None]:
        hits = [n for n in sizes if n is not None]
        self._count(gets=len(sizes), hits=len(hits), hit_bytes=sum(hits), misses=len(sizes) - len(hits))
        return sizes

    # --- contains / delete -----------------------------------------------------------------------------------
    def contains(self, keys: Sequence[int]) -> list[bool]:
        """Whether each manifest exists (one pipelined round trip); False while the server is unreachable."""
        self._check_open()
        checked = [check_key(k) for k in keys]

        def job(rows: range) -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for i in rows:
                pipe.exists(self.manifest_key(checked[i]))
            return [r is not None and not isinstance(r, Exception) and r > 0 for r in pipe.execute(raise_on_error=False)]

        return self._guarded(job, range(len(checked)), False)

    def delete(self, keys: Sequence[int]) -> list[bool]:
        """Delete manifests and parts; per key whether its manifest was there (False if unreachable)."""
        self._check_open()
        checked = [check_key(k) for k in keys]

        def job(rows: range) -> list[bool]:
            manifests = self.client.pipeline(transaction=False)
            for i in rows:  # a header is enough to count the parts; an inline value may be large
                manifests.getrange(self.manifest_key(checked[i]), 0, MANIFEST_BYTES - 1)
            found = manifests.execute(raise_on_error=False)
            pipe = self.client.pipeline(transaction=False)
            for i, manifest in zip(rows, found):
                count = self._stored_part_count(manifest)
                pipe.execute_command("UNLINK", self.manifest_key(checked[i]), *self.part_keys(checked[i], count))
            pipe.execute(raise_on_error=False)
            return [isinstance(m, bytes) and len(m) > 0 for m in found]

        out = self._guarded(job, range(len(checked)), False)
        self._count(deletes=sum(out))
        return out

    def clear(self) -> int:
        """Delete every value of this namespace on the server, whoever wrote it (SCAN by prefix, then UNLINK);
        how many Redis values (manifests and parts) were deleted, 0 while the server is unreachable."""
        self._check_open()
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.namespace.prefix) + "/*"

        def job(_rows: range) -> list[int]:
            deleted, pipe = 0, self.client.pipeline(transaction=False)
            for i, name in enumerate(self.client.scan_iter(match=pattern, count=1000), 1):
                pipe.execute_command("UNLINK", name)  # one by one: different chunks live in different cluster slots
                if i % 1000 == 0:  # a pipeline per SCAN page, not one for the whole namespace
                    deleted += sum(r for r in pipe.execute(raise_on_error=False) if isinstance(r, int))
            return [deleted + sum(r for r in pipe.execute(raise_on_error=False) if isinstance(r, int))]

        return self._guarded(job, range(1), 0)[0]

    def _stored_part_count(self, manifest: Any) -> int:
        """How many parts a manifest names (0 for an inline value); for a damaged or missing one, as many
        as one part size implies."""
        try:
            if isinstance(manifest, bytes) and len(manifest) >= HEADER_BYTES:
                header = ChunkHeader.unpack(manifest)
                if header.flags & INLINE_FLAG:
                    return 0
                if len(manifest) == MANIFEST_BYTES:
                    (part_bytes,) = _PART_SIZE.unpack_from(manifest, HEADER_BYTES)
                    return self._parts_for(header.payload_bytes, part_bytes)
        except ChunkError:
            pass
        return 1

    def _delete_now(self, keys: list[int], part_count: int) -> None:
        try:
            for key in keys:
                self.client.execute_command("UNLINK", self.manifest_key(key), *self.part_keys(key, part_count))
        except _FAILURES as exc:
            log.warning("remote tier: could not delete damaged chunks: %s", exc)

    def close(self) -> None:
        """Finish queued requests, then close the connections. Idempotent."""
        if self._closed:
            return
        super().close()
        self._pool.shutdown(wait=True)
        self.client.close()
