import pytest

from kvtier.chunk import HEADER_BYTES, ChunkError, ChunkHeader


def test_roundtrip_and_verify():
    payload = bytes(range(256)) * 10
    head = ChunkHeader.for_payload(7, 99, payload, num_blocks=4)
    raw = head.pack()
    assert len(raw) == HEADER_BYTES
    back = ChunkHeader.unpack(raw)
    assert back == head
    back.verify(7, 99, payload)


def test_every_header_bit_flip_is_detected():
    raw = bytearray(ChunkHeader.for_payload(1, 2, b"abc").pack())
    for bit in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ChunkError):
            ChunkHeader.unpack(bad)


def test_payload_mismatches_are_detected():
    payload = bytearray(b"x" * 1000)
    head = ChunkHeader.for_payload(1, 2, payload)
    with pytest.raises(ChunkError):
        head.verify(3, 2, payload)
    with pytest.raises(ChunkError):
        head.verify(1, 5, payload)
    with pytest.raises(ChunkError):
        head.verify(1, 2, payload[:-1])
    payload[500] ^= 0x10
    with pytest.raises(ChunkError):
        head.verify(1, 2, payload)
    with pytest.raises(ChunkError):
        ChunkHeader.unpack(b"short")
