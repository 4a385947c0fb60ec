"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest

from kvtier.tiers.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_then_probes_with_growing_backoff() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, base_backoff_s=1.0, max_backoff_s=3.0, clock=clock)
    assert not b.record_failure() and not b.record_failure() and b.allow()
    assert b.record_failure() and b.state == "open" and not b.allow()
    assert not b.record_failure()  # a late reply from before the opening does not extend the backoff
    clock.now = 1.0
    assert b.state == "half-open" and b.allow() and not b.allow()  # exactly one probe
    assert b.record_failure() and not b.allow()
    clock.now = 2.5
    assert not b.allow()  # backoff doubled to 2 s
    clock.now = 3.0
    assert b.allow() and b.record_failure()
    clock.now = 5.9
    assert not b.allow()
    clock.now = 6.0  # capped at 3 s
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.opened == 3


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(failure_threshold=2)
    b.record_failure()
    b.record_success()
    assert not b.record_failure() and b.state == "closed"


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(base_backoff_s=2, max_backoff_s=1)
