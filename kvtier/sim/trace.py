"""The replayable form of every trace: requests in arrival order over dense integer block keys."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# why a response ended, as the Anthropic API names it ("" = not recorded or anything else)
STOP_REASONS = ("", "tool_use", "end_turn")


@dataclass
class Trace:
    """``keys[offsets[i]:offsets[i+1]]`` are request i's blocks in order; requests are sorted by ``times``.

    ``sessions[i]`` is what a server knows the request belongs to (client session id, model and agent, as a
    dense int; -1 when the trace has none). ``prefix_blocks[i]`` is the length in blocks of the system prompt
    and tool definitions, which a client knows when it sends the request (0 if unknown).
    ``ephemeral_tail[i]`` counts request i's trailing blocks that are reasoning output the next call will not
    re-send (known to the client, so it may be sent as an ephemeral hint).
    ``ends[i]`` is when request i's response finished and ``stop_reasons[i]`` why (an index into
    ``STOP_REASONS``): the server produced that response, so it knows both the moment it ends.
    """

    name: str
    source: str
    block_tokens: int
    keys: np.ndarray
    offsets: np.ndarray
    times: np.ndarray
    sessions: np.ndarray
    prefix_blocks: np.ndarray
    ephemeral_tail: np.ndarray | None = None   # trailing blocks of each request that are reasoning output
    ends: np.ndarray | None = None             # response end time of each request (same clock as times)
    stop_reasons: np.ndarray | None = None     # index into STOP_REASONS per request
    dropped_duplicates: int = 0                # requests the loader dropped as the capture's duplicates

    def __post_init__(self) -> None:
        n = len(self.times)
        for name in ("ephemeral_tail", "ends", "stop_reasons"):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise ValueError(f"{name} must have one entry per request")
        if self.stop_reasons is not None and n and not 0 <= int(self.stop_reasons.min()) <= \
                int(self.stop_reasons.max()) < len(STOP_REASONS):
            raise ValueError(f"stop_reasons must index STOP_REASONS {STOP_REASONS}")
        if len(self.offsets) != n + 1 or len(self.sessions) != n or len(self.prefix_blocks) != n:
            raise ValueError("trace arrays disagree on the number of requests")
        if n and (np.any(np.diff(self.offsets) < 0) or self.offsets[-1] != len(self.keys)):
            raise ValueError("trace offsets must be non-decreasing and end at len(keys)")
        if n > 1 and np.any(np.diff(self.times) < 0):
            raise ValueError("trace requests must be in arrival order")

    @property
    def num_requests(self) -> int:
        return len(self.times)

    @property
    def num_accesses(self) -> int:
        return len(self.keys)

    def unique_blocks(self) -> int:
        if not len(self.keys):
            return 0
        return int(np.count_nonzero(np.bincount(self.keys))) if self.keys.max() < 4 * len(self.keys) + 2**20 \
            else len(np.unique(self.keys))

    def request(self, i: int) -> np.ndarray:
        return self.keys[self.offsets[i]:self.offsets[i + 1]]

    def infinite_cache_hit_rate(self) -> float:
        """Prefix-rule hit rate with unlimited capacity: the ceiling of every policy."""
        seen = np.zeros(int(self.keys.max()) + 1 if len(self.keys) else 1, dtype=bool)
        hits = 0
        for i in range(self.num_requests):
            ks = self.request(i)
            found = seen[ks]
            hits += len(ks) if found.all() else int(np.argmin(found))
            seen[ks] = True
        return hits / max(1, self.num_accesses)


def workload_stats(trace: Trace) -> dict[str, float]:
    """Agentic-workload statistics: how much of a session's previous call the next one re-sends (the share
    of the previous request's blocks that form the next request's prefix), and reads per written block."""
    last: dict[int, np.ndarray] = {}
    overlaps = []
    for i in range(trace.num_requests):
        ks = trace.request(i)
        sid = int(trace.sessions[i])
        prev = last.get(sid)
        if prev is not None and len(prev):
            n = min(len(prev), len(ks))
            same = prev[:n] == ks[:n]
            common = n if same.all() else int(np.argmin(same))
            overlaps.append(common / len(prev))
        last[sid] = ks
    unique = trace.unique_blocks()
    return {"overlap_mean": float(np.mean(overlaps)) if overlaps else 0.0,
            "overlap_median": float(np.median(overlaps)) if overlaps else 0.0,
            "read_write_ratio": (trace.num_accesses - unique) / unique if unique else 0.0}
