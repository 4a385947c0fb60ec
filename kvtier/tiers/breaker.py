"""A circuit breaker: after repeated failures a remote store is left alone for a while, then probed.

While open, callers get an immediate "no" (a miss, a skipped write) instead of waiting on timeouts; the
backoff doubles on each failed probe up to a cap, and one success closes the circuit again. This is how
the remote tier retries a dead server with backoff and reconnects without anyone's help.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Closed -> (``failure_threshold`` consecutive failures) -> open for a backoff -> half-open: one probe.

    Thread-safe. ``clock`` is injectable for tests.
    """

    def __init__(self, failure_threshold: int = 3, base_backoff_s: float = 0.25, max_backoff_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold <= 0 or base_backoff_s <= 0 or max_backoff_s < base_backoff_s:
            raise ValueError("need failure_threshold > 0 and 0 < base_backoff_s <= max_backoff_s")
        self.failure_threshold = failure_threshold
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opens_in_a_row = 0
        self._open_until: float | None = None
        self._probing = False
        self.opened = 0  # how many times the circuit opened

    @property
    def state(self) -> str:
        with self._lock:
            if self._open_until is None:
                return "closed"
            return "half-open" if self._clock() >= self._open_until else "open"

    def allow(self) -> bool:
        """May a request go out now? In half-open state only one caller (the probe) gets True."""
        with self._lock:
            if self._open_until is None:
                return True
            if self._clock() < self._open_until or self._probing:
                return False
            self._probing = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opens_in_a_row = 0
            self._open_until = None
            self._probing = False

    def record_failure(self) -> bool:
        """Count a failure; True when it (re)opened the circuit."""
        with self._lock:
            self._failures += 1
            if self._open_until is not None and not self._probing:
                return False  # a request sent before the circuit opened; the backoff already runs
            if not self._probing and self._failures < self.failure_threshold:
                return False
            backoff = min(self.base_backoff_s * 2**self._opens_in_a_row, self.max_backoff_s)
            self._opens_in_a_row += 1
            self._open_until = self._clock() + backoff
            self._probing = False
            self.opened += 1
            return True
