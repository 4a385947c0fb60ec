"""KV events: byte-exact vLLM 0.33 wire format, live stream, gaps recovered through the replay socket."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Optional, Union

import msgspec
import pytest
import zmq

from kvtier import events as ev


# --- an independent vLLM-format publisher (the test's own copy of vLLM 0.33's structs and protocol) ------
class VEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class VKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(VKVCacheEvent):
    block_hashes: list[Union[bytes, int]]
    parent_block_hash: Union[bytes, int, None]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list[Optional[tuple[Any, ...]]]] = None
    group_idx: Optional[int] = None
    kv_cache_spec_kind: Optional[str] = None
    kv_cache_spec_sliding_window: Optional[int] = None
    locality: Optional[str] = None
    ownership: Optional[str] = None
    session_id: Optional[str] = None
    lookahead_token_ids: Optional[list[list[int]]] = None


class BlockRemoved(VKVCacheEvent):
    block_hashes: list[Union[bytes, int]]
    medium: Optional[str]
    group_idx: Optional[int] = None
    locality: Optional[str] = None
    ownership: Optional[str] = None


class AllBlocksCleared(VKVCacheEvent):
    pass


class VllmStylePublisher:
    """PUB [topic, seq, payload] plus a ROUTER replaying [b"", topic, seq, payload] then the -1 marker.
    ``drop`` names sequence numbers kept in the ring but never sent live, to force gaps."""

    def __init__(self, drop: set[int] = frozenset(), ring: int = 100) -> None:
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind("tcp://127.0.0.1:*")
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self.replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ring: deque[tuple[int, bytes]] = deque(maxlen=ring)
        self.drop = set(drop)
        self.seq = 0
        self.encoder = msgspec.msgpack.Encoder()
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def publish(self, *events: VKVCacheEvent) -> None:
        payload = self.encoder.encode(VEventBatch(ts=time.time(), events=list(events), data_parallel_rank=0))
        self.ring.append((self.seq, payload))
        if self.seq not in self.drop:
            self.pub.send_multipart((b"", self.seq.to_bytes(8, "big"), payload))
        self.seq += 1

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.replay.poll(20):
                continue
            client, _, start = self.replay.recv_multipart()
            self.requests += 1
            first = int.from_bytes(start, "big")
            for seq, payload in list(self.ring):
                if seq >= first:
                    self.replay.send_multipart((client, b"", b"", seq.to_bytes(8, "big"), payload))
            self.replay.send_multipart((client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pub.close(linger=0)
        self.replay.close(linger=0)


def _stored(hashes: list, parent: Any = None, medium: str | None = "GPU") -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=list(range(4 * len(hashes))),
                       block_size=4, lora_id=None, medium=medium, lora_name=None)


class Collector:
    def __init__(self) -> None:
        self.batches: list[tuple[int, ev.KVEventBatch]] = []
        self.resets: list[str] = []

    def on_batch(self, seq: int, batch: ev.KVEventBatch) -> None:
        self.batches.append((seq, batch))

    def wait(self, n: int, sub: ev.EventSubscriber, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.batches) < n and time.monotonic() < deadline:
            sub.poll(20)


# --- the wire format --------------------------------------------------------------------------------------
def test_encoding_is_byte_identical_to_vllm_structs() -> None:
    ours = ev.KVEventBatch(ts=1.5, events=[
        ev.BlockStored(block_hashes=[7, b"\x01" * 32], parent_block_hash=None, token_ids=[1, 2, 3, 4, 5, 6, 7, 8],
                       block_size=4, lora_id=None, medium="CPU", lora_name=None),
        ev.BlockStored(block_hashes=[9], parent_block_hash=7, token_ids=[1, 2, 3, 4], block_size=4, lora_id=3,
                       medium="GPU", lora_name="adapter", group_idx=2),
        ev.BlockRemoved(block_hashes=[7], medium="STORAGE"),
        ev.AllBlocksCleared()], data_parallel_rank=0)
    theirs = VEventBatch(ts=1.5, events=[
        BlockStored(block_hashes=[7, b"\x01" * 32], parent_block_hash=None, token_ids=[1, 2, 3, 4, 5, 6, 7, 8],
                    block_size=4, lora_id=None, medium="CPU", lora_name=None),
        BlockStored(block_hashes=[9], parent_block_hash=7, token_ids=[1, 2, 3, 4], block_size=4, lora_id=3,
                    medium="GPU", lora_name="adapter", group_idx=2),
        BlockRemoved(block_hashes=[7], medium="STORAGE"),
        AllBlocksCleared()], data_parallel_rank=0)
    assert ev.encode_batch(ours) == msgspec.msgpack.encode(theirs)


def test_encoding_matches_the_documented_layout() -> None:
    """Spelled out without structs: an array batch (all three fields, msgspec omits no array field) of
    tagged maps (fields with defaults omitted, ``None`` of fields without a default kept)."""
    batch = ev.KVEventBatch(ts=2.0, events=[
        ev.BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[5, 6], block_size=2, lora_id=None,
                       medium="GPU", lora_name=None),
        ev.BlockRemoved(block_hashes=[b"ab"], medium=None)])
    expected = [2.0, [
        {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [5, 6], "block_size": 2,
         "lora_id": None, "medium": "GPU", "lora_name": None},
        {"type": "BlockRemoved", "block_hashes": [b"ab"], "medium": None}], None]
    assert msgspec.msgpack.decode(ev.encode_batch(batch)) == expected
    assert ev.decode_batch(msgspec.msgpack.encode(expected)) == batch


def test_decodes_the_legacy_array_events() -> None:
    legacy = msgspec.msgpack.encode([3.0, [["BlockStored", [11, 12], None, [1, 2, 3, 4], 2, None],
                                           ["BlockRemoved", [11]], ["AllBlocksCleared"]]])
    batch = ev.decode_batch(legacy)
    stored, removed, cleared = batch.events
    assert stored == ev.BlockStored(block_hashes=[11, 12], parent_block_hash=None, token_ids=[1, 2, 3, 4],
                                    block_size=2, lora_id=None, medium=None, lora_name=None)
    assert removed == ev.BlockRemoved(block_hashes=[11], medium=None)
    assert isinstance(cleared, ev.AllBlocksCleared)


@pytest.mark.parametrize("payload", [b"", b"\xc1", msgspec.msgpack.encode({"a": 1}),
                                     msgspec.msgpack.encode([1.0, [["Nope", 1]]])])
def test_garbage_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        ev.decode_batch(payload)


def test_publisher_rejects_bad_input_before_sending() -> None:
    with ev.EventPublisher("tcp://127.0.0.1:*") as pub:
        with pytest.raises(ValueError, match="token ids"):
            pub.block_stored([1, 2], None, [1, 2, 3], block_size=2)
        with pytest.raises(ValueError, match="medium"):
            pub.block_removed([1], medium="HBM")
        assert pub.next_seq == 0


# --- the stream -------------------------------------------------------------------------------------------
def test_vllm_publisher_gap_is_recovered_through_replay() -> None:
    pub = VllmStylePublisher(drop={2, 3})
    got = Collector()
    sub = ev.EventSubscriber(pub.endpoint, pub.replay_endpoint, on_batch=got.on_batch, on_reset=got.resets.append)
    try:
        time.sleep(0.3)  # let the SUB connection settle (ZMQ's slow joiner)
        pub.publish(_stored([b"h0"]))
        pub.publish(_stored([b"h1"], parent=b"h0"))
        pub.publish(_stored([b"h2"], parent=b"h1", medium="CPU"))  # dropped live
        pub.publish(BlockRemoved(block_hashes=[b"h0"], medium="GPU"))  # dropped live
        pub.publish(AllBlocksCleared())
        got.wait(5, sub)
    finally:
        sub.close()
        pub.close()
    assert [seq for seq, _ in got.batches] == [0, 1, 2, 3, 4]
    assert got.batches[2][1].events[0].medium == "CPU"
    assert got.batches[2][1].events[0].block_hashes == [b"h2"]
    assert isinstance(got.batches[3][1].events[0], ev.BlockRemoved)
    assert isinstance(got.batches[4][1].events[0], ev.AllBlocksCleared)
    assert pub.requests == 1 and sub.replays == 1 and not got.resets


def test_late_joiner_replays_the_buffered_history() -> None:
    with ev.EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as pub:
        for i in range(3):
            pub.block_stored([i], None, [i] * 4, block_size=4)  # nobody listens yet
        got = Collector()
        sub = ev.EventSubscriber(pub.endpoint, pub.replay_endpoint, on_batch=got.on_batch, on_reset=got.resets.append)
        try:
            time.sleep(0.3)
            pub.block_removed([0], medium="CPU")
            got.wait(4, sub)
        finally:
            sub.close()
    assert [seq for seq, _ in got.batches] == [0, 1, 2, 3]
    assert got.batches[3][1].events == [ev.BlockRemoved(block_hashes=[0], medium="CPU")]
    assert got.batches[0][1].data_parallel_rank == 0
    assert not got.resets


def test_batches_gone_from_the_ring_reset_the_consumer() -> None:
    pub = VllmStylePublisher(drop={1, 2, 3}, ring=2)  # by the time seq 4 arrives, the ring holds only 3 and 4
    got = Collector()
    sub = ev.EventSubscriber(pub.endpoint, pub.replay_endpoint, on_batch=got.on_batch, on_reset=got.resets.append)
    try:
        time.sleep(0.3)
        for i in range(5):
            pub.publish(_stored([i]))
        got.wait(3, sub)
    finally:
        sub.close()
        pub.close()
    assert [seq for seq, _ in got.batches] == [0, 3, 4]
    assert len(got.resets) == 1 and "lost" in got.resets[0]


def _rebind(endpoint: str) -> ev.EventPublisher:
    """ZMQ releases a closed socket's port asynchronously: retry briefly."""
    for _ in range(100):
        try:
            return ev.EventPublisher(endpoint, bind=True)
        except zmq.ZMQError:
            time.sleep(0.05)
    raise AssertionError(f"could not bind {endpoint} again")


def test_publisher_restart_resets_the_consumer() -> None:
    got = Collector()
    with ev.EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", auto_flush=False) as pub:
        sub = ev.EventSubscriber(pub.endpoint, pub.replay_endpoint, on_batch=got.on_batch, on_reset=got.resets.append)
        time.sleep(0.3)
        pub.block_stored([1], None, [1, 2], block_size=2)
        pub.block_stored([2], 1, [3, 4], block_size=2)
        assert pub.flush() == 0 and pub.flush() is None  # both events in one batch
        for _ in range(5):
            pub.all_cleared()
            pub.flush()
        got.wait(6, sub)
        endpoint = pub.endpoint
    assert [len(b.events) for _, b in got.batches] == [2, 1, 1, 1, 1, 1]
    with _rebind(endpoint) as again:  # same port, sequence starts over
        for _ in range(20):  # until the SUB has reconnected
            again.block_stored([5], None, [1, 2], block_size=2)
            got.wait(7, sub, timeout=0.1)
            if len(got.batches) == 7:
                break
    sub.close()
    assert len(got.batches) == 7 and got.batches[6][0] < 5
    assert len(got.resets) == 1 and "restarted" in got.resets[0]
