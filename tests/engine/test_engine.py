"""The engine end to end on the reference model: bitwise KV through every tier, faults, events, tenants."""

import threading
import time

import pytest

from kvtier.cascade import G3
from kvtier.engine import EngineRequest
from kvtier.events import MEDIUM_CPU, MEDIUM_STORAGE, AllBlocksCleared, BlockRemoved, BlockStored, EventPublisher, \
    EventSubscriber
from tests.engine.sessions import CHUNK_TOKENS, make_rig, random_tokens

PROMPT = random_tokens(130, seed=1)          # 8 full chunks of 16 tokens
FOLLOW_UP = PROMPT + random_tokens(40, seed=2)
REUSABLE = (len(PROMPT) // CHUNK_TOKENS) * CHUNK_TOKENS


def _rig_for(tier, tmp_path, request):
    if tier == "G2":
        return make_rig(tmp_path)
    if tier == "G3":
        return make_rig(tmp_path, disk=True, write_through=True)
    server = request.getfixturevalue("redis_server")
    return make_rig(tmp_path, remote_url=server.url, write_through=True)


@pytest.mark.parametrize("tier", ["G2", "G3", "G4"])
def test_every_chunk_through_one_tier_is_bitwise_identical(tier, tmp_path, request):
    rig = _rig_for(tier, tmp_path, request)
    with rig.engine:
        first, _ = rig.call(rig.runner(), PROMPT)
        assert rig.same_as_reference(PROMPT, first)
        rig.engine.drain()
        if tier != "G2":
            assert rig.engine.clear("G2") == len(PROMPT) // CHUNK_TOKENS  # only the lower tier holds them now
        again, hooks = rig.call(rig.runner(), FOLLOW_UP)
        assert again.stats.loaded_tokens == REUSABLE and again.stats.failed_loads == 0
        assert hooks.hit_tokens[tier] == REUSABLE
        assert sum(v for k, v in hooks.hit_tokens.items() if k != tier) == 0
        assert rig.same_as_reference(FOLLOW_UP, again)


def test_redis_killed_mid_session_recomputes_and_recovers(tmp_path, redis_server):
    rig = make_rig(tmp_path, remote_url=redis_server.url, write_through=True, remote_timeout_s=0.2)
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        rig.engine.drain()
        rig.engine.clear("G2")
        redis_server.kill()
        got, hooks = rig.call(rig.runner(), FOLLOW_UP)
        assert got.stats.loaded_tokens == 0 and got.stats.computed_tokens == len(FOLLOW_UP)
        assert rig.same_as_reference(FOLLOW_UP, got)
        redis_server.restart()
        deadline = time.monotonic() + 20  # the circuit breaker's backoff: the tier comes back on its own
        seed = 20
        while True:
            seed += 1
            other = random_tokens(70, seed=seed)  # new content each time, so each call writes through to G4
            rig.call(rig.runner(), other)
            rig.engine.drain()
            keys = rig.engine.chunk_keys(other)
            # the breaker's half-open probe lets a few writes through first: wait for a fully written prompt
            if set(keys) <= rig.engine.held_chunks()["G4"]:
                break
            assert time.monotonic() < deadline, "the remote tier did not come back"
            time.sleep(0.5)
        rig.engine.clear("G2")
        follow = other + random_tokens(20, seed=10)
        back, hooks = rig.call(rig.runner(), follow)
        assert hooks.hit_tokens["G4"] == (len(other) // CHUNK_TOKENS) * CHUNK_TOKENS
        assert rig.same_as_reference(follow, back)


def test_corrupted_disk_files_are_recomputed(tmp_path):
    rig = make_rig(tmp_path, disk=True, write_through=True)
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        rig.engine.drain()
        rig.engine.clear("G2")
        disk = rig.engine.tiers[2]
        extents = [where for where in map(disk.location, rig.engine.chunk_keys(PROMPT)) if where is not None]
        assert len(extents) == len(PROMPT) // CHUNK_TOKENS
        for i, (path, offset) in enumerate(extents):
            with open(path, "r+b") as f:
                f.seek(offset + 4096 + 97 * i)  # one bit in each payload
                byte = f.read(1)[0]
                f.seek(offset + 4096 + 97 * i)
                f.write(bytes([byte ^ 0x40]))
        got, _ = rig.call(rig.runner(), FOLLOW_UP)
        assert got.stats.loaded_tokens == 0 and rig.same_as_reference(FOLLOW_UP, got)
        assert rig.engine.tiers[2].stats().corrupt >= 1


def test_events_rebuild_the_engines_view(tmp_path):
    publisher = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    view: dict[str, set] = {MEDIUM_CPU: set(), MEDIUM_STORAGE: set()}

    def apply(_seq, batch):
        for event in batch.events:
            if isinstance(event, BlockStored):
                view[event.medium].update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                view[event.medium].difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                for blocks in view.values():
                    blocks.clear()

    subscriber = EventSubscriber(publisher.endpoint, publisher.replay_endpoint, on_batch=apply).start()
    try:
        rig = make_rig(tmp_path, host_chunks=6, disk=True, events=publisher)
        with rig.engine:
            for seed in range(4):  # more chunks than G2 holds: demotions to G3 and evictions
                prompt = random_tokens(100, seed=100 + seed)
                rig.call(rig.runner(), prompt)
                rig.engine.drain()
            rig.call(rig.runner(), random_tokens(100, seed=100) + random_tokens(30, seed=7))  # promotions back
            rig.engine.drain()
            expected = rig.engine.resident_blocks()
            assert expected[MEDIUM_CPU] and expected[MEDIUM_STORAGE]
            deadline = time.monotonic() + 10
            while view != expected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert view == expected
    finally:
        subscriber.close()
        publisher.close()


def test_tenants_never_share_chunks(tmp_path):
    """Interleaved sessions of two tenants with the same prompts: each tenant reuses only its own KV."""
    rig = make_rig(tmp_path, host_chunks=128)
    prompt = random_tokens(120, seed=42)
    with rig.engine:
        for turn in range(3):
            for tenant in ("tenant-a", "tenant-b"):
                p = prompt + random_tokens(17 * turn, seed=turn)
                got, hooks = rig.call(rig.runner(tenant), p, salt=tenant, session=tenant)
                assert rig.same_as_reference(p, got)
                # turn 0: tenant-b finds nothing although tenant-a just stored the same tokens
                expected = 0 if turn == 0 else (len(prompt) // CHUNK_TOKENS) * CHUNK_TOKENS
                assert got.stats.loaded_tokens >= expected and (turn or got.stats.loaded_tokens == 0), (turn, tenant)
        keys = {tenant: set(rig.engine.chunk_keys(prompt, tenant)) for tenant in ("tenant-a", "tenant-b")}
        held = set().union(*rig.engine.held_chunks().values())
        assert keys["tenant-a"] <= held and keys["tenant-b"] <= held
        assert not keys["tenant-a"] & keys["tenant-b"]


def test_concurrent_engine_calls_are_safe(tmp_path):
    """Many threads hammer lookup/store/load/release on one engine with separate block ranges."""
    rig = make_rig(tmp_path, host_chunks=8, disk=True)
    errors = []

    def worker(i):
        try:
            for j in range(6):
                prompt = random_tokens(64, seed=1000 * i + j % 3)
                req = EngineRequest(f"w{i}-{j}", prompt)
                rig.engine.begin(req)
                rig.engine.lookup(req.request_id)
                blocks = list(range(i * 16, i * 16 + 4))
                for c in range(4):
                    if not rig.engine.load(req.request_id, c, blocks):
                        rig.engine.store(req.request_id, c, blocks)
                rig.engine.release(req.request_id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    with rig.engine:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rig.engine.drain()
        rig.engine.manager.check_invariants()
    assert not errors, errors


def test_bad_calls_are_clear_errors(tmp_path):
    rig = make_rig(tmp_path)
    with rig.engine:
        with pytest.raises(ValueError, match="unknown request"):
            rig.engine.lookup("nope")
        req = EngineRequest("r", PROMPT)
        rig.engine.begin(req)
        with pytest.raises(ValueError, match="already active"):
            rig.engine.begin(req)
        with pytest.raises(ValueError, match="out of range"):
            rig.engine.store("r", 99, [0, 1, 2, 3])
        with pytest.raises(ValueError, match="4 blocks"):
            rig.engine.store("r", 0, [0, 1])
        with pytest.raises(ValueError, match="block id out of range"):
            rig.engine.store("r", 0, [0, 1, 2, 10**6])
        with pytest.raises(ValueError, match="no tier"):
            rig.engine.clear("G3")
        rig.engine.release("r")
    with pytest.raises(RuntimeError, match="closed"):
        rig.engine.begin(EngineRequest("late", PROMPT))


def test_prefetch_hint_brings_a_session_back_into_g2(tmp_path):
    from kvtier.hints import AgentHints

    rig = make_rig(tmp_path, disk=True, write_through=True)
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        rig.engine.drain()
        rig.engine.clear("G2")
        req = EngineRequest("tool-running", PROMPT, AgentHints(session_id="s", next_call_delay_s=5.0))
        rig.engine.begin(req)
        rig.engine.lookup(req.request_id)
        rig.engine.release(req.request_id)  # the session will be back after its tool call: prefetch
        rig.engine.drain()
        assert len(rig.engine.held_chunks()["G2"]) == len(PROMPT) // CHUNK_TOKENS
        got, hooks = rig.call(rig.runner(), FOLLOW_UP)
        assert hooks.hit_tokens["G2"] == REUSABLE and rig.same_as_reference(FOLLOW_UP, got)


def test_metrics_and_configured_events(tmp_path):
    from kvtier.config import KvtierConfig
    from kvtier.engine import KvtierEngine
    from kvtier.hashing import Namespace

    rig = make_rig(tmp_path, disk=True)
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        rig.call(rig.runner(), FOLLOW_UP)
        text = rig.engine.metrics.render().decode()
        assert 'kvtier_lookup_chunks_total{result="hit",tier="G2"} 8.0' in text
        assert 'kvtier_bytes_moved_total{direction="offload"}' in text
    cfg = KvtierConfig(block_size=4, chunk_blocks=4, host_capacity_bytes=2**20, events_endpoint="tcp://127.0.0.1:*")
    with KvtierEngine(cfg, rig.engine.layout, Namespace("tiny", "float32", "x")) as engine:
        assert engine.events is not None and engine.events.endpoint.startswith("tcp://127.0.0.1:")


def test_ephemeral_reasoning_never_leaves_g2(tmp_path):
    from kvtier.hints import AgentHints, TokenRange

    rig = make_rig(tmp_path, host_chunks=4, disk=True, write_through=True)
    reasoning = TokenRange(4 * CHUNK_TOKENS, len(PROMPT))  # chunks 4.. hold the reasoning tail
    with rig.engine:
        req = EngineRequest("think", PROMPT, AgentHints(session_id="s", ephemeral=[reasoning]))
        hooks_request = req
        from kvtier.runner.offload import EngineHooks
        rig.runner().generate(PROMPT, 3, kv_hooks=EngineHooks(rig.engine, hooks_request))
        rig.engine.drain()
        for seed in range(3):  # push everything out of G2
            rig.call(rig.runner(), random_tokens(100, seed=300 + seed))
            rig.engine.drain()
        keys = rig.engine.chunk_keys(PROMPT)
        held = rig.engine.held_chunks()
        assert all(k in held["G3"] for k in keys[:4]), "the system part was written through to G3"
        assert not any(k in held["G3"] for k in keys[4:]), "reasoning chunks reached G3"


def test_a_slow_disk_never_holds_a_request_past_the_deadline(tmp_path, monkeypatch):
    from kvtier.tiers import fileio

    rig = make_rig(tmp_path, disk=True, write_through=True, lower_tier_deadline_ms=100)
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        rig.engine.drain()
        rig.engine.clear("G2")
        real_read = fileio.read_at

        def slow_read(fd, buffers, offset):
            time.sleep(0.5)
            return real_read(fd, buffers, offset)

        monkeypatch.setattr(fileio, "read_at", slow_read)
        started = time.monotonic()
        got, _ = rig.call(rig.runner(), FOLLOW_UP)
        # every chunk gave up after ~100 ms (the reads were queued behind each other), never 0.5 s each
        assert time.monotonic() - started < 0.5 * len(PROMPT) // CHUNK_TOKENS
        assert got.stats.loaded_tokens < REUSABLE and rig.same_as_reference(FOLLOW_UP, got)
        assert rig.engine.metrics.render().decode().count("kvtier_deadline_misses_total") >= 1
        rig.engine.drain()
        pool = rig.engine.host.pool

        def leaked() -> int:  # slots neither free nor holding a stored chunk
            return pool.num_slots - pool.free_slots - len(rig.engine.held_chunks()["G2"])

        deadline = time.monotonic() + 10  # late reads land, then their slots come back
        while leaked() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leaked() == 0


def test_layer_by_layer_loads_are_bitwise_identical(tmp_path):
    """``layerwise_load`` moves each layer's pages separately (on a GPU, each on its own event)."""
    rig = make_rig(tmp_path, layerwise_load=True)
    assert len(rig.engine._parts) == rig.model.config.num_layers
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        got, hooks = rig.call(rig.runner(), FOLLOW_UP)
        assert hooks.hit_tokens["G2"] == REUSABLE and rig.same_as_reference(FOLLOW_UP, got)


def test_runner_waits_for_each_layer_before_reading_it(tmp_path, monkeypatch):
    """With layer-by-layer loads the runner's attention asks the engine for every layer before using it."""
    rig = make_rig(tmp_path, layerwise_load=True)
    seen = []
    monkeypatch.setattr(rig.engine, "wait_layer", lambda request_id, layer: seen.append(layer))
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
    layers = rig.model.config.num_layers
    assert seen and seen[:layers] == list(range(layers)) and set(seen) == set(range(layers))


def test_a_runner_hashing_with_another_salt_is_refused(tmp_path):
    """KV must never be stored under a key computed with another tenant's salt."""
    rig = make_rig(tmp_path)
    with rig.engine:
        with pytest.raises(ValueError, match="differ from the engine's key"):
            rig.call(rig.runner(salt="tenant-a"), PROMPT, salt=None)
        assert not rig.engine.held_chunks()["G2"]


def test_release_tells_the_policy_why_the_response_stopped(tmp_path, monkeypatch):
    from kvtier.hints import AgentHints
    from kvtier.manager.policies.agent import AgentAware

    seen = []
    monkeypatch.setattr(AgentAware, "end_request",
                        lambda self, session, now, stop, final: seen.append((session, stop, final)))
    rig = make_rig(tmp_path)
    with rig.engine:
        req = EngineRequest("r1", PROMPT, AgentHints(session_id="s"))
        rig.engine.begin(req)
        rig.engine.lookup(req.request_id)
        rig.engine.release(req.request_id, stop_reason="tool_use")
        last = EngineRequest("r2", PROMPT, AgentHints(session_id="s", session_final=True))
        rig.engine.begin(last)
        rig.engine.release(last.request_id)
    assert ("s", "tool_use", False) in seen and ("s", None, True) in seen


def test_a_restore_from_g3_reads_all_its_chunks_in_one_batch(tmp_path, monkeypatch):
    """``lookup`` starts every hit chunk's read at once: one batched get, not one round trip per chunk."""

    rig = make_rig(tmp_path, disk=True, write_through=True)
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        rig.engine.drain()
        rig.engine.clear("G2")
        disk = rig.engine.tiers[G3]
        batches: list[int] = []
        for name in ("get_rows_async", "get_async"):
            real = getattr(disk, name)
            monkeypatch.setattr(disk, name, lambda keys, bufs, real=real: batches.append(len(keys)) or real(keys, bufs))
        got, hooks = rig.call(rig.runner(), FOLLOW_UP)
        assert batches == [len(PROMPT) // CHUNK_TOKENS]
        assert got.stats.loaded_tokens == REUSABLE and hooks.hit_tokens["G3"] == REUSABLE
        assert rig.same_as_reference(FOLLOW_UP, got)


def _leaked_slots(engine) -> int:
    """Host slots neither free nor holding a stored chunk, once late reads have landed."""
    pool = engine.host.pool
    engine.drain()
    deadline = time.monotonic() + 10

    def leaked() -> int:
        return pool.num_slots - pool.free_slots - len(engine.held_chunks()["G2"])

    while leaked() and time.monotonic() < deadline:
        time.sleep(0.05)
    return leaked()


def test_a_late_chunk_in_a_batch_is_recomputed_while_the_others_load(tmp_path, monkeypatch):
    from kvtier.tiers import fileio

    rig = make_rig(tmp_path, disk=True, write_through=True, lower_tier_deadline_ms=300, disk_io_threads=8)
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        rig.engine.drain()
        rig.engine.clear("G2")
        real_read, calls, lock = fileio.read_at, [], threading.Lock()

        def first_read_slow(fd, buffers, offset):  # one chunk of the batch (each has its own I/O thread) is late
            with lock:
                calls.append(offset)
                slow = len(calls) == 1
            if slow:
                time.sleep(1.0)
            return real_read(fd, buffers, offset)

        monkeypatch.setattr(fileio, "read_at", first_read_slow)
        got, hooks = rig.call(rig.runner(), FOLLOW_UP)
        assert got.stats.failed_loads == 1 and got.stats.loaded_tokens == REUSABLE - CHUNK_TOKENS
        assert hooks.hit_tokens["G3"] == REUSABLE - CHUNK_TOKENS
        assert rig.same_as_reference(FOLLOW_UP, got)
        assert _leaked_slots(rig.engine) == 0  # the late read's slot came back once it landed


def test_release_settles_reads_no_load_waited_for(tmp_path):
    """A request that looks up chunks below G2 and ends without loading them leaves no slot behind; the
    chunks it read arrive in G2."""
    rig = make_rig(tmp_path, disk=True, write_through=True)
    with rig.engine:
        rig.call(rig.runner(), PROMPT)
        rig.engine.drain()
        rig.engine.clear("G2")
        req = EngineRequest("looks-only", PROMPT)
        rig.engine.begin(req)
        assert rig.engine.lookup(req.request_id)["G3"] == REUSABLE
        assert rig.engine.release(req.request_id) == {"G2": 0, "G3": 0, "G4": 0}
        assert _leaked_slots(rig.engine) == 0
        assert len(rig.engine.held_chunks()["G2"]) == len(PROMPT) // CHUNK_TOKENS
        got, hooks = rig.call(rig.runner(), FOLLOW_UP)
        assert hooks.hit_tokens["G2"] == REUSABLE and rig.same_as_reference(FOLLOW_UP, got)


def test_a_new_engine_adopts_the_disk_an_earlier_one_filled_and_keeps_what_fits(tmp_path):
    """Tiers never evict on their own, so the manager's record starts with what the disk holds: chunks an earlier
    process wrote hit at once, and those beyond the manager's capacity are deleted rather than filling it for good."""
    first = make_rig(tmp_path, disk=True, write_through=True)
    with first.engine:
        first.call(first.runner(), PROMPT)
        first.engine.drain()
    again = make_rig(tmp_path, disk=True, write_through=True)
    with again.engine:
        assert again.engine.held_chunks()["G3"] == set(again.engine.chunk_keys(PROMPT))
        got, hooks = again.call(again.runner(), FOLLOW_UP)
        assert hooks.hit_tokens["G3"] == REUSABLE and again.same_as_reference(FOLLOW_UP, got)
        disk = again.engine.tiers[G3]
        per_chunk = disk.capacity_bytes // disk.capacity_chunks
    spare = 4  # the engine's spare host slots, which the manager also leaves free on disk
    small = make_rig(tmp_path, disk=True, disk_capacity_bytes=(spare + 3) * per_chunk)
    with small.engine:
        kept = small.engine.held_chunks()["G3"]
        assert len(kept) == 3 and set(small.engine.tiers[G3].held_keys()) == kept
