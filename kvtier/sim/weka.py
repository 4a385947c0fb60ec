"""Weka ``kv-cache-tester`` traces: real Claude Code sessions (callanjfox/kv-cache-tester @ c9b3da5, Apache-2.0).

One JSON per session; sessions carry no absolute start time, so the replay places them into N concurrent
slots: sessions in a seeded random order, each slot starting its next session when its last one ends.
Subagent requests nest under a marker and their ``t`` is relative to it. KV is never shared across models;
each file's ``hash_id_scope`` says whether its hash ids are shared across sessions: "global" ids are one
block wherever they occur (common system prompts and tools), "local" ones (v8) are keyed by session.

Proxy duplicates: the capture repeats some requests (same model and hash ids as the session's previous
request: the proxy's streaming / non-streaming artefact). A server would see one request, so the replay drops
consecutive duplicates by default and says how many (``Trace.dropped_duplicates``).

Session clock: a session's requests (subagents' included) keep their recorded order, but every gap between
consecutive requests is capped at ``max_gap`` seconds (60 by default, kv-cache-tester's own ``--max-delay``).
The recordings hold idle gaps of hours (a user away); replayed uncapped, most of the 32 slots hold an idle
session and the cache only ever sees a few working ones. Capped, the slots are 32 working sessions, which is
what the reference figures in ``shared/README.md`` describe (LRU about 0.38 and Belady about 0.72 at 1%).
``max_gap=None`` keeps the recorded clock.

Parsing 441 MB of JSON takes minutes, so it shows a progress bar and the parsed form is cached as ``.npz``
(``$KVTIER_CACHE``, ``~/.cache/kvtier/`` by default); the ``.tar.xz`` is read directly.
"""

from __future__ import annotations

import hashlib
import heapq
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
from tqdm import tqdm

from kvtier.sim.trace import STOP_REASONS, Trace

SOURCE = "callanjfox/kv-cache-tester traces/ (Apache-2.0), Claude Code sessions captured via proxy"
SCOPES = ("local", "global")
WEKA_BLOCK_TOKENS = 64
DEFAULT_MAX_GAP_S = 60.0
NOT_WEKA = "not a Weka trace (a .tar.xz of session JSON files or a directory of them)"
# what a file that is no archive, or a truncated one, raises while it is read
UNREADABLE = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError)


class _Request(msgspec.Struct):
    t: float
    type: str
    model: str = ""
    hash_ids: list[int] = []
    api_time: float = 0.0
    stop: str = ""
    requests: list[_Request] = []
    agent_id: str = ""
    tool_tokens: int = 0
    system_tokens: int = 0


class _SessionFile(msgspec.Struct):
    id: str
    requests: list[_Request]
    block_size: int = WEKA_BLOCK_TOKENS
    hash_id_scope: str = "local"
    tool_tokens: int = 0
    system_tokens: int = 0


def cache_dir() -> Path:
    return Path(os.environ.get("KVTIER_CACHE", Path.home() / ".cache" / "kvtier"))


def _flatten(session: _SessionFile, sid: int, models: dict[str, int], agents: dict[tuple[int, str], int],
             out: dict[str, list]) -> None:
    if session.hash_id_scope not in SCOPES:
        raise ValueError(f"{session.id}: hash_id_scope must be one of {SCOPES}, got {session.hash_id_scope!r}")
    scope = SCOPES.index(session.hash_id_scope)
    previous: list = [None, None]   # the session's previous request: (model, hash ids)

    def walk(requests: list[_Request], t0: float, agent: str, prefix_tokens: int) -> None:
        for r in requests:
            if r.type == "subagent":
                walk(r.requests, t0 + r.t, r.agent_id or f"sub{len(agents)}", r.system_tokens + r.tool_tokens)
                continue
            out["duplicate"].append([r.model, r.hash_ids] == previous)
            previous[:] = [r.model, r.hash_ids]
            out["session"].append(sid)
            out["scope"].append(scope)
            out["t"].append(t0 + r.t)
            out["end"].append(t0 + r.t + (r.api_time or 0.0))
            out["stop"].append(STOP_REASONS.index(r.stop) if r.stop in STOP_REASONS else 0)
            out["model"].append(models.setdefault(r.model, len(models)))
            out["agent"].append(agents.setdefault((sid, agent), len(agents)))
            out["prefix_tokens"].append(prefix_tokens)
            out["nblocks"].append(len(r.hash_ids))
            out["hash_ids"].extend(r.hash_ids)

    walk(session.requests, 0.0, "", session.system_tokens + session.tool_tokens)


def parse_sessions(path: str | os.PathLike[str], progress: bool = True) -> dict[str, np.ndarray]:
    """Parse a directory of ``trace_*.json`` files or the ``.tar.xz`` holding them (cached as .npz)."""
    path = Path(path)
    stat = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v3".encode()).hexdigest()[:16]
    cached = cache_dir() / f"weka_{tag}.npz"
    if cached.exists():
        with np.load(cached) as data:
            return {k: data[k] for k in data.files}
    decoder = msgspec.json.Decoder(_SessionFile)
    out: dict[str, list] = {k: [] for k in ("session", "scope", "duplicate", "t", "end", "stop", "model", "agent",
                                             "prefix_tokens", "nblocks", "hash_ids")}
    models: dict[str, int] = {}
    agents: dict[tuple[int, str], int] = {}
    files = _json_files(path)
    bar = tqdm(files, total=len(files), desc=f"parsing {path.name} (cached after this)", unit="session",
               disable=not progress, mininterval=1.0)
    for sid, read in enumerate(bar):
        try:
            session = decoder.decode(read())
        except (msgspec.DecodeError, *UNREADABLE) as exc:
            raise ValueError(f"{path}: {NOT_WEKA}: session file {sid + 1}: {exc}") from None
        _flatten(session, sid, models, agents, out)
    arrays = {
        "session": np.asarray(out["session"], np.int32), "scope": np.asarray(out["scope"], np.int8),
        "duplicate": np.asarray(out["duplicate"], bool), "t": np.asarray(out["t"], np.float64),
        "end": np.asarray(out["end"], np.float64), "stop": np.asarray(out["stop"], np.int8), "model": np.asarray(out["model"], np.int32),
        "agent": np.asarray(out["agent"], np.int32), "prefix_tokens": np.asarray(out["prefix_tokens"], np.int64),
        "nblocks": np.asarray(out["nblocks"], np.int64), "hash_ids": np.asarray(out["hash_ids"], np.int64),
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(cached)
    return arrays


def _json_files(path: Path) -> list[Callable[[], bytes]]:
    """One reader per session file, in name order (a list, so the progress bar knows the total)."""
    if path.is_dir():
        readers = [f.read_bytes for f in sorted(path.rglob("trace_*.json"))]
    elif not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}")
    else:
        try:
            tar = tarfile.open(path, "r:*")
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")
                              and Path(m.name).name.startswith("trace_")), key=lambda m: m.name)
        except UNREADABLE:
            raise ValueError(f"{path}: {NOT_WEKA}") from None
        readers = [lambda m=m: tar.extractfile(m).read() for m in members]
    if not readers:
        raise ValueError(f"{path}: {NOT_WEKA}: it holds no trace_*.json")
    return readers


def session_clock(parsed: dict[str, np.ndarray], max_gap: float | None) -> np.ndarray:
    """Each request's time from its session's start, with every gap between consecutive requests of a session
    capped at ``max_gap`` seconds (``None``: the recorded times). Recorded order within a session is kept."""
    t = parsed["t"]
    if max_gap is None:
        return t
    if not max_gap >= 0:
        raise ValueError(f"max_gap must be a non-negative number of seconds or None, got {max_gap}")
    session = parsed["session"]
    order = np.lexsort((t, session))
    s, ts = session[order], t[order]
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:] != s[:-1]
    gaps = np.empty(len(ts))
    gaps[1:] = np.diff(ts)
    gaps[first] = ts[first]
    np.minimum(gaps, max_gap, out=gaps)
    elapsed = np.cumsum(gaps)
    run_start = (elapsed - gaps)[np.flatnonzero(first)]
    clock = np.empty(len(t))
    clock[order] = elapsed - run_start[np.cumsum(first) - 1]
    return clock


def place_sessions(parsed: dict[str, np.ndarray], slots: int, seed: int,
                   max_sessions: int | None = None, max_gap: float | None = DEFAULT_MAX_GAP_S, *,
                   label: str = "weka", keep_duplicates: bool = False, half: int | None = None) -> Trace:
    """Place sessions into ``slots`` concurrent slots (seeded order) on the ``session_clock`` and build the
    replayable trace. A slot is free again when its session's last response ends. ``half`` (0 or 1) keeps
    one of two disjoint halves of the sessions (a seeded split, so a policy can be tuned on one half and
    reported on the other)."""
    if slots <= 0:
        raise ValueError(f"slots must be positive, got {slots}")
    if half not in (None, 0, 1):
        raise ValueError(f"half must be 0, 1 or None, got {half}")
    dropped = 0
    if not keep_duplicates and "duplicate" in parsed:
        dropped = int(parsed["duplicate"].sum())
        parsed = _merge_duplicates(parsed)
    session = parsed["session"]
    n_sessions = int(session.max()) + 1 if len(session) else 0
    order = np.random.default_rng(seed).permutation(n_sessions)
    if half is not None:
        order = np.sort(order[half::2])   # the other half's sessions never appear
        order = order[np.random.default_rng(seed).permutation(len(order))]
    if max_sessions is not None:
        order = order[:max_sessions]
    clock = session_clock(parsed, max_gap)
    duration = np.zeros(n_sessions)
    np.maximum.at(duration, session, clock + np.maximum(parsed["end"] - parsed["t"], 0.0))
    start = np.full(n_sessions, np.nan)
    free = [(0.0, s) for s in range(slots)]
    for sid in order:
        at, slot = heapq.heappop(free)
        start[sid] = at
        heapq.heappush(free, (at + duration[sid], slot))
    keep = ~np.isnan(start[session])
    times = (start[session] + clock)[keep]
    ends = times + np.maximum(parsed["end"] - parsed["t"], 0.0)[keep]
    # dense keys: one id range per (session, model)
    offsets = np.zeros(len(session) + 1, np.int64)
    np.cumsum(parsed["nblocks"], out=offsets[1:])
    req_of_block = np.repeat(np.arange(len(session)), parsed["nblocks"])
    n_models = int(parsed["model"].max()) + 1 if len(session) else 1
    # key space: one per model for global hash ids, one per (session, model) for local ones
    local = parsed["scope"] == SCOPES.index("local")
    space = parsed["model"] + np.where(local, (session.astype(np.int64) + 1) * n_models, 0)
    hash_ids = parsed["hash_ids"]
    width = np.zeros((n_sessions + 1) * n_models, np.int64)
    np.maximum.at(width, space[req_of_block], hash_ids + 1)
    base = np.concatenate(([0], np.cumsum(width)[:-1]))
    keys = base[space[req_of_block]] + hash_ids
    # arrival order (stable), only placed sessions
    req_ids = np.nonzero(keep)[0]
    by_arrival = np.argsort(times, kind="stable")
    req_ids = req_ids[by_arrival]
    lengths = parsed["nblocks"][req_ids]
    new_offsets = np.zeros(len(req_ids) + 1, np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    gather = np.repeat(offsets[req_ids] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    keys = keys[gather]
    uniq, dense = np.unique(keys, return_inverse=True) if len(keys) < 5_000_000 else (None, None)
    if dense is not None:
        keys = dense
    agent = parsed["agent"][req_ids]
    model = parsed["model"][req_ids]
    sessions = np.unique(agent.astype(np.int64) * n_models + model, return_inverse=True)[1]
    prefix_blocks = parsed["prefix_tokens"][req_ids] // WEKA_BLOCK_TOKENS
    scopes = "+".join(SCOPES[s] for s in np.unique(parsed["scope"][req_ids]))
    return Trace(name=f"{label} ({scopes} hash ids) slots={slots} seed={seed} max_gap={max_gap}"
                      + ("" if half is None else f" half={half}"),
                 source=SOURCE, block_tokens=WEKA_BLOCK_TOKENS, dropped_duplicates=dropped,
                 keys=keys.astype(np.int64 if keys.max(initial=0) >= 2**31 else np.int32),
                 offsets=new_offsets, times=times[by_arrival], sessions=sessions.astype(np.int32),
                 prefix_blocks=prefix_blocks.astype(np.int32), ends=ends[by_arrival],
                 stop_reasons=parsed["stop"][req_ids])


def _merge_duplicates(parsed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parsed columns without the capture's duplicates, each folded into the request it repeats: that
    request keeps its arrival and takes the latest end, and the duplicate's stop reason where it had none
    (the proxy records the reason on one copy only)."""
    dup = parsed["duplicate"]
    rows = np.arange(len(dup))
    target = np.maximum.accumulate(np.where(dup, 0, rows))[dup]   # the request each duplicate repeats
    end, stop = parsed["end"].copy(), parsed["stop"].copy()
    np.maximum.at(end, target, parsed["end"][dup])
    stop[target] = np.where(stop[target] == 0, parsed["stop"][dup], stop[target])
    keep = ~dup
    out = {k: v[keep] for k, v in dict(parsed, end=end, stop=stop).items() if k != "hash_ids"}
    out["hash_ids"] = parsed["hash_ids"][np.repeat(keep, parsed["nblocks"])]
    return out


def trace_label(path: str | os.PathLike[str]) -> str:
    """The trace's name from its file: ``weka_kvcachetester_v8_c9b3da5_traces.tar.xz`` -> its stem."""
    name = Path(path).name
    for suffix in (".tar.xz", ".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def load_weka(path: str | os.PathLike[str], slots: int = 32, seed: int = 0,
              max_sessions: int | None = None, max_gap: float | None = DEFAULT_MAX_GAP_S, *,
              keep_duplicates: bool = False, half: int | None = None, progress: bool = True) -> Trace:
    return place_sessions(parse_sessions(path, progress), slots, seed, max_sessions, max_gap,
                          label=trace_label(path), keep_duplicates=keep_duplicates, half=half)
