"""Shared fixtures: real Redis servers on free loopback ports (see kvtier/testing/redis_server.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from kvtier.testing.redis_server import RedisServer, redis_available

# CI replays the same examples every run (a failure there is reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

requires_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` without a password, stopped after the test."""
    if not redis_available():
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server_password() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` with ``requirepass``; the password is ``server.password``."""
    if not redis_available():
        pytest.skip("redis-server is not installed")
    with RedisServer(password="s3cret-test-pass") as server:
        yield server
