"""Mooncake traces (kvcache-ai/Mooncake FAST25-release/traces, Apache-2.0): chat, not agentic; the control case.

One request per JSON line: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids`` (512-token
blocks, chained by prefix, global across requests). An optional ``session_id`` per record is honoured.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import numpy as np

from kvtier.sim.trace import Trace

SOURCE = "kvcache-ai/Mooncake FAST25-release/traces (Apache-2.0)"
MOONCAKE_BLOCK_TOKENS = 512


class _Record(msgspec.Struct):
    timestamp: float
    hash_ids: list[int]
    input_length: int = 0
    output_length: int = 0
    session_id: str | int | None = None


def load_mooncake(path: str | os.PathLike[str], block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    decoder = msgspec.json.Decoder(_Record)
    records = []
    with open(path, "rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(decoder.decode(line))
                except msgspec.DecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a Mooncake record: {exc}") from None
    order = sorted(range(len(records)), key=lambda i: records[i].timestamp)
    session_ids: dict[object, int] = {}
    sessions = [-1 if records[i].session_id is None else session_ids.setdefault(records[i].session_id,
                                                                                  len(session_ids)) for i in order]
    lengths = [len(records[i].hash_ids) for i in order]
    offsets = np.zeros(len(order) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    keys = np.fromiter((h for i in order for h in records[i].hash_ids), dtype=np.int64, count=int(offsets[-1]))
    if len(keys) and keys.min() < 0:
        raise ValueError(f"{path}: negative hash id")
    return Trace(name=Path(path).stem, source=SOURCE, block_tokens=block_tokens, keys=keys, offsets=offsets,
                 times=np.asarray([records[i].timestamp / 1000.0 for i in order], np.float64),
                 sessions=np.asarray(sessions, np.int32), prefix_blocks=np.zeros(len(order), np.int32))
