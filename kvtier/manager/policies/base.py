"""The one small interface every eviction policy implements.

A policy orders the evictable entries of one tier. The manager owns membership and capacity; it tells the
policy what was inserted, accessed or removed, and asks it for victims. Batch methods exist because the
simulator and the engine work a request at a time: one call per request, not per block, keeps the hot path
inside tight loops. ``busy`` holds keys that must not be evicted now (readers or writers in flight).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence

Key = Hashable


class Policy:
    name = "base"

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"policy capacity must not be negative, got {capacity}")
        self.capacity = capacity  # in entries; adaptive policies (ARC, S3-FIFO) size their queues by it

    # --- request context (policies that do not care ignore it) ---------------------------------------------
    def begin_request(self, session: Hashable, now: float, next_call_delay_s: float | None = None) -> None:
        """A request of ``session`` arrives at ``now``. Requests interleave (a server runs many at once), so
        every later call names its request's session itself: there is no "current" request."""

    def end_request(self, session: Hashable, now: float, stop_reason: str | None = None, final: bool = False) -> None:
        """The request's response finished at ``now``, for ``stop_reason`` ("tool_use": the client runs a tool
        and calls again; "end_turn": the turn is over and a person answers next; None: not known). ``final``:
        the client said it was the session's last request."""

    # --- membership -------------------------------------------------------------------------------------------
    def insert(self, key: Key, session: Hashable = None) -> None:
        """``key`` enters the tier on behalf of ``session`` (a store, a promotion, a demotion)."""
        raise NotImplementedError

    def access(self, key: Key, session: Hashable = None) -> None:
        raise NotImplementedError

    def remove(self, key: Key) -> None:
        raise NotImplementedError

    def evict(self, n: int, busy: Collection[Key]) -> list[Key]:
        """Choose up to ``n`` victims not in ``busy``, forget them, and return them in eviction order."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __contains__(self, key: Key) -> bool:
        raise NotImplementedError

    # --- a whole request at once ---------------------------------------------------------------------------
    def touch_request(self, keys: Sequence[Key], new: Collection[Key], session: Hashable = None) -> None:
        """All blocks of a request of ``session``, in request order (block 0 first); those in ``new`` are being
        inserted, the others are hits. Policies override this with one tight loop."""
        for key in keys:
            if key in new:
                self.insert(key, session)
            else:
                self.access(key, session)

    def admit(self, keys: Sequence[Key], session: Hashable = None) -> Sequence[Key]:
        """Which of these new keys of a request of ``session`` deserve a place at all (admission filters
        override this)."""
        return keys


def pop_front(order: dict, n: int, busy: Collection[Key]) -> list[Key]:
    """Remove up to ``n`` keys from the front of an insertion-ordered dict, skipping busy ones."""
    out: list[Key] = []
    if not busy:
        for key in order:
            if len(out) >= n:
                break
            out.append(key)
    else:
        for key in order:
            if len(out) >= n:
                break
            if key not in busy:
                out.append(key)
    for key in out:
        del order[key]
    return out
