"""Faults under a running vLLM server with kvtier (vLLM 0.32's CPU build): Redis unreachable at start and
killed mid-session, the disk directory made unwritable, the server killed and restarted. Every request is
still answered with vLLM alone's tokens for the same cached prefix (kvtier misses and vLLM recomputes where a tier failed), nothing
crashes, and nothing is left in /dev/shm or the disk directory that should not be there.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvtier.testing.agent_session import AgentSession
from kvtier.testing.vllm_server import VllmServer, kvtier_transfer_config
from kvtier.testing.redis_server import RedisServer, redis_available
from tests.serving.conftest import chat, kvtier_shm, metric, vllm_alone_tokens
from tests.serving.test_vllm_cpu_serving import BLOCK, G2_BYTES, wait_for

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


def set_immutable(root: Path, on: bool) -> None:
    """``chattr +i`` on the directory and everything in it: writes fail even for root (EPERM)."""
    paths = [str(p) for p in sorted(root.rglob("*"), reverse=True)] + [str(root)]
    subprocess.run(["chattr", "+i" if on else "-i", *paths], check=True, capture_output=True)


def answer_turn(session: AgentSession, plain, server) -> int:
    """One call with vLLM's own cache dropped: vLLM alone's tokens for the same split; returns kvtier's hit."""
    body = session.request()
    server.reset_prefix_cache()
    answer = chat(server.url, body)
    assert answer.tokens == vllm_alone_tokens(plain, answer), f"call {session.calls}: kvtier changed the tokens"
    session.advance()
    return answer.cached


def test_redis_down_disk_unwritable_and_a_killed_server_never_change_an_answer(plain, serve, tmp_path, model_dir):
    disk = tmp_path / "disk"
    redis = RedisServer()  # not started yet: unreachable when the server starts
    shm_before = kvtier_shm()
    # lower-tier reads get a minute: this test is about failures, not lateness, and a busy machine is slow
    config = {"host_capacity_bytes": G2_BYTES, "blocks_per_chunk": 1, "policy": "lru", "disk_path": str(disk),
              "disk_capacity_bytes": "64MiB", "remote_url": redis.url, "write_through": True,
              "admission_min_hits": 1, "lower_tier_deadline_ms": 60000, "remote_timeout_s": 0.2}
    session = AgentSession(seed=20, turns=7)
    try:
        server = serve("faults", config)  # Redis unreachable at start: a warning, then misses
        answer_turn(session, plain, server)
        redis.start()  # G4 comes back on its own (the circuit breaker retries)
        assert answer_turn(session, plain, server) >= 4 * BLOCK
        wait_for(lambda: (answer_turn(session, plain, server) is not None and
                          metric(server, "vllm:kvtier_resident_chunks", tier="G4") > 0), "writes to Redis", 300)

        redis.kill()  # mid-session
        assert answer_turn(session, plain, server) >= 4 * BLOCK  # G2 and disk still serve

        set_immutable(disk, True)  # every disk write now fails with EPERM
        try:
            answer_turn(session, plain, server)
        finally:
            set_immutable(disk, False)

        server.kill()  # SIGKILL: no shutdown at all
        redis.start()
        restarted = serve("faults-restarted", config)
        assert answer_turn(session, plain, restarted) >= 4 * BLOCK  # the disk index survived the crash
        restarted.stop()
    finally:
        redis.close()
    assert kvtier_shm() <= shm_before
    leftovers = [p for p in disk.rglob("*") if p.is_file() and not (p.name == ".lock" or p.name.startswith("slab"))]
    assert leftovers == [], f"unexpected files in the disk directory: {leftovers}"


@pytest.mark.parametrize("bad, line", [
    ({"polcy": "lru"}, "unknown configuration key 'polcy'"),
    ({"disk_capacity_bytes": "4XB", "disk_path": "/tmp/kvtier-never"}, "disk_capacity_bytes"),
    ({"remote_url": "http://127.0.0.1:6379"}, "remote_url"),
])
def test_a_bad_kvtier_setting_stops_the_server_at_start_with_a_line_naming_it(model_dir, tmp_path, bad, line):
    log = tmp_path / "bad.log"
    server = VllmServer(model_dir, kvtier_transfer_config(host_capacity_bytes="2MiB", **bad), log_path=log)
    with pytest.raises(RuntimeError, match="exited"):
        server.start()
    assert any(line in row and "KvtierOffloadingSpec" in row for row in log.read_text().splitlines())
