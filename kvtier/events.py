"""KV cache events in vLLM's wire format (vLLM 0.33 ``vllm/distributed/kv_events.py``), over ZMQ.

Why vLLM's format: one router (kvtier's, NVIDIA Dynamo's, llm-d's) can then follow kvtier's tiers, vLLM
and SGLang workers alike. The wire format, byte for byte:

* a batch is a msgpack **array** ``[ts, events, data_parallel_rank]`` (all three always: msgspec omits no
  field of an array-like struct; vLLM's publisher sets the rank);
* each event is a msgpack **map** tagged ``{"type": "BlockStored", ...}`` with fields in declaration order;
  fields that have a default are omitted while they equal it; ``lora_id``, ``medium`` and ``lora_name``
  have none and are always written;
* block hashes are ints or bytes (vLLM's ``ExternalBlockHash = bytes | int``);
* the PUB socket sends ``[topic, seq as 8-byte big-endian, payload]``; a ROUTER socket answers a replay
  request (``[b"", start_seq as 8 bytes]`` from a DEALER) with ``[b"", topic, seq, payload]`` for every
  buffered batch from ``start_seq`` on, then the end marker ``[b"", b"", -1 as 8 bytes, b""]``.

Older vLLM encoded events as tagged arrays; :func:`decode_batch` reads both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Union

import msgspec
import zmq

log = logging.getLogger(__name__)

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"
MEDIA = (MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE)

BlockHash = Union[int, bytes]
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Union[int, None] = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged event union (the tag is the class name, as in vLLM)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[BlockHash]
    parent_block_hash: Union[BlockHash, None]
    token_ids: list[int]
    block_size: int
    lora_id: Union[int, None]
    medium: Union[str, None]
    lora_name: Union[str, None]
    extra_keys: Union[list[Union[tuple[Any, ...], None]], None] = None
    group_idx: Union[int, None] = None
    kv_cache_spec_kind: Union[str, None] = None
    kv_cache_spec_sliding_window: Union[int, None] = None
    locality: Union[str, None] = None
    ownership: Union[str, None] = None
    session_id: Union[str, None] = None
    lookahead_token_ids: Union[list[list[int]], None] = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[BlockHash]
    medium: Union[str, None]
    group_idx: Union[int, None] = None
    locality: Union[str, None] = None
    ownership: Union[str, None] = None


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(EventBatch):
    events: list[KVEvent]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_EVENT_TYPES: dict[str, type[KVCacheEvent]] = {c.__name__: c for c in (BlockStored, BlockRemoved, AllBlocksCleared)}


def encode_batch(batch: EventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one batch; raises ``ValueError`` for anything that is not a KV event batch."""
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        try:
            return _decode_legacy(payload)
        except (msgspec.DecodeError, TypeError, ValueError, IndexError):
            raise ValueError(f"not a KV event batch: {exc}") from None


def _decode_legacy(payload: bytes) -> KVEventBatch:
    """vLLM before 0.11 wrote each event as a tagged array ``[tag, field, ...]``."""
    raw = msgspec.msgpack.decode(payload)
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise ValueError("batch is not an array [ts, events, ...]")
    events: list[KVEvent] = []
    for item in raw[1]:
        if not isinstance(item, list) or not item or item[0] not in _EVENT_TYPES:
            raise ValueError(f"unknown event {item!r:.80}")
        cls = _EVENT_TYPES[item[0]]
        names = cls.__struct_fields__
        values = dict(zip(names, item[1:]))
        for name in names[len(item) - 1:]:
            values.setdefault(name, None)  # fields the old format did not have (medium, lora_name)
        events.append(msgspec.convert(values, cls))
    rank = raw[2] if len(raw) > 2 else None
    return KVEventBatch(ts=float(raw[0]), events=events, data_parallel_rank=rank)


def _bind_or_connect(sock: zmq.Socket, endpoint: str, bind: bool | None = None) -> None:
    """``bind=None``: vLLM's convention, bind wildcard, ipc and inproc endpoints and connect to the rest."""
    if bind is None:
        bind = "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)


class EventPublisher:
    """Publishes KV event batches on a PUB socket and serves replays from a bounded ring.

    Each ``block_stored`` / ``block_removed`` / ``all_cleared`` call is one batch unless ``auto_flush`` is
    off, in which case events collect until :meth:`flush` (one batch per engine step, as vLLM does).
    Thread-safe: callers share one lock; a daemon thread owns the replay socket.
    """

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, *, topic: str = "",
                 buffer_steps: int = 10_000, hwm: int = 100_000, data_parallel_rank: int | None = 0,
                 auto_flush: bool = True, bind: bool | None = None, context: zmq.Context | None = None) -> None:
        if buffer_steps <= 0:
            raise ValueError(f"buffer_steps must be positive, got {buffer_steps}")
        self._ctx = context or zmq.Context.instance()
        self._topic = topic.encode()
        self._rank = data_parallel_rank
        self._auto_flush = auto_flush
        self._lock = threading.Lock()
        self._pending: list[KVEvent] = []
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        _bind_or_connect(self._pub, endpoint, bind)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self.replay_endpoint: str | None = None
        self._closing = threading.Event()
        self._replay_thread: threading.Thread | None = None
        if replay_endpoint:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.SNDHWM, 2 * (buffer_steps + 1))
            router.setsockopt(zmq.LINGER, 0)
            router.bind(replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_thread = threading.Thread(target=self._serve_replays, args=(router,),
                                                   name="kv-event-replay", daemon=True)
            self._replay_thread.start()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # --- the engine-facing API -------------------------------------------------------------------------
    def block_stored(self, block_hashes: Sequence[BlockHash], parent_hash: BlockHash | None,
                     token_ids: Sequence[int], block_size: int, medium: str = MEDIUM_GPU,
                     lora_id: int | None = None, lora_name: str | None = None) -> None:
        if block_size <= 0 or len(token_ids) != block_size * len(block_hashes):
            raise ValueError(f"{len(token_ids)} token ids do not fill {len(block_hashes)} blocks of {block_size}")
        self._add(BlockStored(block_hashes=list(block_hashes), parent_block_hash=parent_hash,
                              token_ids=list(token_ids), block_size=block_size, lora_id=lora_id,
                              medium=_check_medium(medium), lora_name=lora_name))

    def block_removed(self, block_hashes: Sequence[BlockHash], medium: str = MEDIUM_GPU) -> None:
        self._add(BlockRemoved(block_hashes=list(block_hashes), medium=_check_medium(medium)))

    def all_cleared(self) -> None:
        self._add(AllBlocksCleared())

    def flush(self) -> int | None:
        """Publish the pending events as one batch; returns its sequence number (None if nothing pended)."""
        with self._lock:
            if not self._pending:
                return None
            events, self._pending = self._pending, []
            return self._send_locked(KVEventBatch(ts=time.time(), events=events, data_parallel_rank=self._rank))

    def publish(self, batch: EventBatch) -> int:
        """Publish a ready-made batch (e.g. one relayed from an engine); returns its sequence number."""
        with self._lock:
            return self._send_locked(batch)

    def close(self) -> None:
        self._closing.set()
        if self._replay_thread is not None:
            self._replay_thread.join(timeout=2.0)
        with self._lock:
            self._pub.close(linger=0)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------------
    def _add(self, event: KVEvent) -> None:
        with self._lock:
            self._pending.append(event)
        if self._auto_flush:
            self.flush()

    def _send_locked(self, batch: EventBatch) -> int:
        seq = self._next_seq
        self._next_seq += 1
        payload = encode_batch(batch)
        self._ring.append((seq, payload))
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        return seq

    def _serve_replays(self, router: zmq.Socket) -> None:
        try:
            while not self._closing.is_set():
                if not router.poll(50):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3 or len(frames[2]) != 8:
                    log.warning("ignoring malformed replay request of %d frames", len(frames))
                    continue
                client, _, start = frames
                start_seq = int.from_bytes(start, "big")
                with self._lock:
                    buffered = [item for item in self._ring if item[0] >= start_seq]
                for seq, payload in buffered:
                    router.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
                router.send_multipart((client, b"", b"", END_SEQ, b""))
        finally:
            router.close(linger=0)


def _check_medium(medium: str | None) -> str | None:
    if medium is not None and medium not in MEDIA:
        raise ValueError(f"medium must be one of {MEDIA} or None, got {medium!r}")
    return medium


class EventSubscriber:
    """Follows one publisher: SUB for the live stream, DEALER for replays.

    Delivers batches in sequence order without holes where the publisher's ring allows it. On a gap it
    asks the replay socket for the missing range; on joining late it asks for everything still buffered.
    When batches are lost for good (ring overrun, no replay socket, replay timeout) or the publisher
    restarted (sequence went backwards), ``on_reset`` is called first so the consumer can drop what it
    knew about this publisher, then delivery resumes.
    """

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, *, topic: str = "",
                 on_batch: Callable[[int, KVEventBatch], None],
                 on_reset: Callable[[str], None] | None = None, replay_timeout_s: float = 1.0,
                 context: zmq.Context | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic.encode()
        self._on_batch = on_batch
        self._on_reset = on_reset or (lambda reason: None)
        self._replay_timeout_ms = int(replay_timeout_s * 1000)
        self._last_seq: int | None = None
        self.replays = 0
        self.resets = 0
        self.undecodable = 0
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        _bind_or_connect(self._sub, endpoint)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def last_seq(self) -> int | None:
        return self._last_seq

    def poll(self, timeout_ms: int = 100) -> int:
        """Receive and deliver whatever arrives within ``timeout_ms``; returns the number of live frames."""
        received = 0
        while self._sub.poll(timeout_ms if received == 0 else 0):
            frames = self._sub.recv_multipart()
            received += 1
            if len(frames) != 3 or len(frames[1]) != 8:
                self.undecodable += 1
                log.warning("ignoring KV event message of %d frames from %s", len(frames), self._endpoint)
                continue
            self._receive(int.from_bytes(frames[1], "big"), frames[2])
        return received

    def start(self) -> EventSubscriber:
        """Poll in a daemon thread until :meth:`close`."""
        self._thread = threading.Thread(target=self._run, name=f"kv-events {self._endpoint}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._sub.close(linger=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(50)
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    return
                log.warning("KV event subscriber %s: %s", self._endpoint, exc)
                time.sleep(0.1)

    def _receive(self, seq: int, payload: bytes) -> None:
        last = self._last_seq
        if last is not None and seq == last:
            return  # a duplicate
        if last is not None and seq < last:
            self._reset(f"publisher restarted (sequence {seq} after {last})")
        elif (last is None and seq > 0) or (last is not None and seq > last + 1):
            self._recover(0 if last is None else last + 1, seq)
        self._deliver(seq, payload)

    def _recover(self, start: int, upto: int) -> None:
        """Replay ``[start, upto)``; reset if any of it is gone. Joining late (no last seq) starts at 0."""
        replayed = (self._replay(start, upto) if self._replay_endpoint else None) or []
        self.replays += bool(self._replay_endpoint)
        if [seq for seq, _ in replayed] != list(range(start, upto)) and self._last_seq is not None:
            self._reset(f"batches {start}..{upto - 1} lost")
        for seq, payload in replayed:
            self._deliver(seq, payload)

    def _replay(self, start: int, upto: int) -> list[tuple[int, bytes]] | None:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(self._replay_endpoint)
            dealer.send_multipart((b"", start.to_bytes(8, "big")))
            out: list[tuple[int, bytes]] = []
            while True:
                if not dealer.poll(self._replay_timeout_ms):
                    log.warning("replay from %s timed out", self._replay_endpoint)
                    return None
                frames = dealer.recv_multipart()
                body = frames[1:] if frames and frames[0] == b"" else frames
                if len(body) == 2:  # vLLM before 0.12 sent [seq, payload] without the topic
                    body = [b"", *body]
                if len(body) != 3 or len(body[1]) != 8:
                    log.warning("malformed replay frame from %s", self._replay_endpoint)
                    return None
                seq = int.from_bytes(body[1], "big", signed=True)
                if seq == -1:
                    return out
                if start <= seq < upto:
                    out.append((seq, body[2]))
        finally:
            dealer.close(linger=0)

    def _reset(self, reason: str) -> None:
        self.resets += 1
        log.info("KV events from %s: %s; dropping its state", self._endpoint, reason)
        self._on_reset(reason)

    def _deliver(self, seq: int, payload: bytes) -> None:
        self._last_seq = seq
        try:
            batch = decode_batch(payload)
        except ValueError as exc:
            self.undecodable += 1
            log.warning("undecodable KV event batch %d from %s: %s", seq, self._endpoint, exc)
            return
        self._on_batch(seq, batch)

