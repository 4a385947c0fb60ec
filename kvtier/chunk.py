"""The self-describing header that travels with a chunk wherever it leaves the process (G3, G4).

A chunk's payload is ``[block][layer tensor][page bytes]`` (DESIGN.md, "Chunks"). The header names the
namespace and key it belongs to and carries an xxh3-64 checksum of the payload, so a torn, corrupted or
mismatched chunk is recognised and treated as a miss, never served.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVTC"
VERSION = 1
# magic, version, flags, num_blocks, namespace id, key, payload bytes, payload checksum, header checksum
_LAYOUT = struct.Struct("<4sHHIQQQQQ")
HEADER_BYTES = _LAYOUT.size  # 52


class ChunkError(ValueError):
    """A header or payload that does not check out; callers turn it into a miss."""


def checksum(payload: memoryview | bytes | bytearray) -> int:
    """xxh3-64 of the payload bytes: fast enough (tens of GB/s) to run on every chunk."""
    return xxhash.xxh3_64_intdigest(payload)


@dataclass(frozen=True)
class ChunkHeader:
    namespace_id: int
    key: int
    payload_bytes: int
    payload_checksum: int
    num_blocks: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        body = _LAYOUT.pack(MAGIC, VERSION, self.flags, self.num_blocks, self.namespace_id, self.key,
                            self.payload_bytes, self.payload_checksum, 0)
        head_sum = xxhash.xxh3_64_intdigest(body[:-8])
        return body[:-8] + head_sum.to_bytes(8, "little")

    @classmethod
    def for_payload(cls, namespace_id: int, key: int, payload: memoryview | bytes | bytearray,
                    num_blocks: int = 0, flags: int = 0) -> ChunkHeader:
        return cls(namespace_id, key, len(payload), checksum(payload), num_blocks, flags)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> ChunkHeader:
        """Parse and check a header; raises ``ChunkError`` on any damage."""
        raw = bytes(raw[:HEADER_BYTES])
        if len(raw) < HEADER_BYTES:
            raise ChunkError(f"header truncated: {len(raw)} of {HEADER_BYTES} bytes")
        magic, version, flags, num_blocks, ns, key, nbytes, psum, hsum = _LAYOUT.unpack(raw)
        if magic != MAGIC:
            raise ChunkError(f"bad magic {magic!r}")
        if version != VERSION:
            raise ChunkError(f"unsupported chunk version {version}")
        if xxhash.xxh3_64_intdigest(raw[:-8]) != hsum:
            raise ChunkError("header checksum mismatch")
        return cls(ns, key, nbytes, psum, num_blocks, flags)

    def verify(self, namespace_id: int, key: int, payload: memoryview | bytes | bytearray) -> None:
        """Check that ``payload`` is this header's chunk for (namespace, key); raises ``ChunkError``."""
        if self.namespace_id != namespace_id:
            raise ChunkError("chunk belongs to another namespace")
        if self.key != key:
            raise ChunkError(f"chunk key {self.key:#x} != requested {key:#x}")
        if len(payload) != self.payload_bytes:
            raise ChunkError(f"payload is {len(payload)} bytes, header says {self.payload_bytes}")
        if checksum(payload) != self.payload_checksum:
            raise ChunkError("payload checksum mismatch")
