"""A request's agent hints, derived in one place from what agent clients already send.

Agent clients tell a server a lot without knowing kvtier. The router turns it into kvtier's ``agent_hints``
(:mod:`kvtier.hints`, the one schema: validated here before anything is forwarded) and hands them to vLLM
workers in ``kv_transfer_params.agent_hints``, where kvtier's plug-in reads them. Per field, the first source
that answers wins:

- **explicit hints**, ``nvext.agent_hints`` (Dynamo's field) or ``kv_transfer_params.agent_hints`` (vLLM's), on
  every protocol;
- **the session**: the client's own session headers (Dynamo's ``X-Dynamo-Session-ID``; Claude Code's
  ``x-claude-code-agent-id`` for a subagent, else ``x-claude-code-session-id``; Codex's ``session-id``; OpenCode's
  ``x-session-id``), then Anthropic ``metadata.user_id`` (Claude Code puts its session in it), then OpenAI
  ``prompt_cache_key``; else **prefix continuation**: a conversation (chat, messages, responses) continues the
  session of the earlier requests it extends, those with the same model, tools and messages up to the first
  user turn. The session is named from those alone, so every router replica names it the same without shared
  state. Sessions are scoped by the tenant's salt: two tenants' "s1" are two sessions;
- **pins** from Anthropic ``cache_control`` breakpoints (on tools, system blocks, message blocks, or the request's
  top level, which marks its last block; also on OpenAI-format content parts, as LiteLLM sends them): the tokens up
  to each breakpoint are pinned for its TTL (``5m`` when none, or ``1h``), which needs each breakpoint's token
  offset in the rendered prompt (so a tokenizer; without one a breakpoint is counted as unplaced). OpenAI
  ``prompt_cache_retention: "24h"`` pins the whole prompt for a day. The engine's ``pin_budget_frac`` bounds what
  pins can hold, whoever asks;
- ``prefix_tokens`` (system prompt + tools), whenever the router has a tokenizer;
- ``session_final`` from ``X-Dynamo-Session-Final: true``: the session's KV goes first once it ends;
- ``prefetch`` for the requests of a session that offers tools (the client calls again once its tool ran).

Offsets are found by rendering the prompt a second time with a marker at each place (a private-use character
pair), checking that the markers removed give exactly the prompt's text, and counting the tokens that end before
each marker (a token that straddles one is left out: a pin never covers tokens past its breakpoint).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from kvtier.hints import DEFAULT_PRIORITY, MAX_SESSION_ID_CHARS, AgentHints, HintError, parse_hints
from kvtier.router.translate import BadRequest, need, worker_body

SESSION_HEADERS = ("x-dynamo-session-id", "x-claude-code-agent-id", "x-claude-code-session-id", "session-id",
                   "x-session-id")  # the first present names the session
FINAL_HEADER = "x-dynamo-session-final"
SOURCES = ("explicit", "session_header", "metadata", "prompt_cache_key", "prefix", "none")
CACHE_TTLS = {"5m": 300.0, "1h": 3600.0}
MAX_BREAKPOINTS = 4                       # Anthropic's limit per request
CACHE_RETENTION = {"in_memory": None, "in-memory": None, "24h": 24 * 3600.0}
_MARKER = re.compile("\ue000([0-9]+)\ue001")


def _marker(i: int) -> str:
    return f"\ue000{i}\ue001"


@dataclass(frozen=True)
class Mark:
    """A place in the request whose token offset the hints need: a breakpoint (with its TTL) or the end of the
    system prompt or tools (``ttl_s`` None, for ``prefix_tokens``)."""

    ttl_s: float | None
    where: str


@dataclass
class Derived:
    """The hints for the worker, and where they came from."""

    hints: AgentHints
    source: str                        # where the session (or, without one, the hints) came from: SOURCES
    pins_placed: int = 0
    pins_unplaced: int = 0

    def wire(self) -> dict:
        """The hints as the worker gets them: only the fields set."""
        return msgspec.to_builtins(self.hints)

    @property
    def vllm_priority(self) -> int | None:
        """vLLM's request ``priority`` (lower is scheduled first, 0 by default) for the hint priority (0-100,
        higher first, 50 by default); None without one."""
        return None if self.hints.priority is None else DEFAULT_PRIORITY - self.hints.priority


@dataclass
class Signals:
    """What the client sent, checked: explicit hints (raw, validated), its session and where that came from, the
    final flag, the retention asked for, and the breakpoints with a copy of the body marked at each."""

    explicit: dict[str, Any]
    explicit_where: str
    derive: bool                                # False: the explicit hints only
    session: tuple[str, str] | None = None      # (the client's id, its source)
    final: bool = False
    retention_s: float | None = None
    marks: list[Mark] = field(default_factory=list)
    marked_body: dict | None = None


def read_signals(kind: str, body: dict, headers: Mapping[str, str], derive: bool = True) -> Signals:
    """Phase one, before the prompt is rendered: a malformed or oversized signal is a :class:`BadRequest`
    naming it. ``derive`` False (``kvtier router --no-derive-hints``) reads the explicit hints alone."""
    explicit, where = _explicit(body)
    if not derive:
        return Signals(explicit, where, derive)
    marks, marked = _breakpoints(kind, body)
    return Signals(explicit, where, derive, _client_session(kind, body, headers), _final(headers),
                   _retention(kind, body), marks, marked)


Offsets = Callable[[dict, int], "list[int] | None"]


def derive(signals: Signals, kind: str, chat: dict, salt: str | None, offsets: Offsets,
           prompt_tokens: int | None) -> Derived:
    """Phase two: the hints for the worker. ``chat`` is the worker's body; ``offsets(marked_chat, n)`` gives the
    token offset of each of the ``n`` markers in a marked copy of it (None where the router cannot: no tokenizer,
    or a template that changes text); ``prompt_tokens`` is the prompt's length in the worker's tokens (None
    without a tokenizer)."""
    hints = dict(signals.explicit)
    session_id, source = _session(signals, kind, chat, salt)
    if session_id is not None:
        hints["session_id"] = session_id
    derived = Derived(AgentHints(), source)
    pins = list(hints.get("pins") or [])
    prefix_ends = []
    if kind != "completions" and signals.derive:
        marks = list(signals.marks)
        marked = _mark_prefix(worker_body(kind, signals.marked_body, False) if signals.marked_body else chat, marks)
        placed = offsets(marked, len(marks)) if marks else None
        for i, mark in enumerate(marks):
            offset = placed[i] if placed is not None else 0
            if mark.ttl_s is None:
                prefix_ends.append(offset)
            elif offset > 0:
                pins.append({"range": {"start": 0, "end": offset}, "lease_s": mark.ttl_s})
                derived.pins_placed += 1
            else:
                derived.pins_unplaced += 1
    if hints.get("prefix_tokens") is None and max(prefix_ends, default=0) > 0:
        hints["prefix_tokens"] = max(prefix_ends)
    if signals.retention_s is not None:
        if prompt_tokens:
            pins.append({"range": {"start": 0, "end": prompt_tokens}, "lease_s": signals.retention_s})
            derived.pins_placed += 1
        else:
            derived.pins_unplaced += 1
    if pins:
        hints["pins"] = pins
    if signals.final:
        hints["session_final"] = True
    if signals.derive and session_id is not None and chat.get("tools"):
        hints.setdefault("prefetch", True)
    try:
        derived.hints = parse_hints(hints)
    except HintError as exc:
        raise BadRequest(f"{signals.explicit_where or 'agent_hints'}: {str(exc).removeprefix('agent_hints: ')}") from None
    return derived


def scoped_session(raw: str, salt: str | None) -> str:
    """The session id a worker sees: the client's, or within a tenant's salt a digest of both (bounded, the same
    on every replica, and no other tenant can name it)."""
    if salt is None:
        return raw
    return f"t{xxhash.xxh3_64_hexdigest(salt.encode())}-{xxhash.xxh3_128_hexdigest(raw.encode())}"


def conversation_anchor(chat: dict, salt: str | None) -> str | None:
    """The session a conversation continues, named by its model, tools and messages up to its first user turn
    (what every later call of the conversation re-sends unchanged); None without a user turn."""
    messages = chat.get("messages")
    if not isinstance(messages, list):
        return None
    first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if first_user is None:
        return None
    head = json.dumps([salt, chat.get("model"), chat.get("tools"), messages[:first_user + 1]], sort_keys=True,
                      ensure_ascii=False, default=str)
    return f"p{xxhash.xxh3_128_hexdigest(head.encode())}"


def _session(signals: Signals, kind: str, chat: dict, salt: str | None) -> tuple[str | None, str]:
    """(the worker's session id, its source)."""
    explicit = signals.explicit.get("session_id")
    if isinstance(explicit, str):
        return scoped_session(explicit, salt), "explicit"
    if signals.session is not None:
        raw, source = signals.session
        return scoped_session(raw, salt), source
    anchor = conversation_anchor(chat, salt) if kind != "completions" and signals.derive else None
    if anchor is not None:
        return anchor, "prefix"
    return None, "explicit" if signals.explicit else "none"


# --- phase one: what the client sent ---------------------------------------------------------------------------
def _explicit(body: dict) -> tuple[dict[str, Any], str]:
    """``nvext.agent_hints`` or ``kv_transfer_params.agent_hints``, checked against the schema (a pin of
    ``system_and_tools`` may leave ``prefix_tokens`` to the router)."""
    found = []
    for outer in ("nvext", "kv_transfer_params"):
        holder = body.get(outer)
        if holder is None:
            continue
        need(isinstance(holder, dict), f"body.{outer} must be an object")
        if holder.get("agent_hints") is not None:
            found.append((f"body.{outer}.agent_hints", holder["agent_hints"]))
    need(len(found) <= 1, "agent_hints were given twice (body.nvext and body.kv_transfer_params): send them once")
    if not found:
        return {}, ""
    where, raw = found[0]
    need(isinstance(raw, dict), f"{where} must be an object")
    try:
        parse_hints({"prefix_tokens": 1, **raw} if raw.get("prefix_tokens") is None else raw)
    except HintError as exc:
        raise BadRequest(f"{where}: {str(exc).removeprefix('agent_hints: ')}") from None
    return dict(raw), where


def _client_session(kind: str, body: dict, headers: Mapping[str, str]) -> tuple[str, str] | None:
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value is not None:
            return _bounded(value, f"header {name}"), "session_header"
    if kind == "messages":
        metadata = body.get("metadata")
        if metadata is not None:
            need(isinstance(metadata, dict), "body.metadata must be an object")
            if metadata.get("user_id") is not None:
                return _bounded(metadata["user_id"], "body.metadata.user_id"), "metadata"
    elif body.get("prompt_cache_key") is not None:
        return _bounded(body["prompt_cache_key"], "body.prompt_cache_key"), "prompt_cache_key"
    return None


def _bounded(value: Any, where: str) -> str:
    need(isinstance(value, str) and 0 < len(value) <= MAX_SESSION_ID_CHARS,
         f"{where} must be a string of 1 to {MAX_SESSION_ID_CHARS} characters")
    return value


def _final(headers: Mapping[str, str]) -> bool:
    value = headers.get(FINAL_HEADER)
    if value is None:
        return False
    flag = value.strip().lower()
    need(flag in ("true", "false"), f"header {FINAL_HEADER} must be true or false, got {value[:40]!r}")
    return flag == "true"


def _retention(kind: str, body: dict) -> float | None:
    value = body.get("prompt_cache_retention")
    if value is None or kind == "messages":
        return None
    need(isinstance(value, str) and value in CACHE_RETENTION,
         f"body.prompt_cache_retention must be one of {', '.join(CACHE_RETENTION)}, got {str(value)[:40]!r}")
    return CACHE_RETENTION[value]


def _ttl(control: Any, where: str) -> float:
    where = f"{where}.cache_control"
    need(isinstance(control, dict), f"{where} must be an object")
    need(control.get("type") == "ephemeral", f"{where}.type must be 'ephemeral'")
    ttl = control.get("ttl", "5m")
    need(isinstance(ttl, str) and ttl in CACHE_TTLS, f"{where}.ttl must be one of {', '.join(CACHE_TTLS)}, "
         f"got {str(ttl)[:40]!r}")
    unknown = sorted(map(str, set(control) - {"type", "ttl"}))
    need(not unknown, f"{where} has unknown fields: {', '.join(unknown)[:200]}")
    return CACHE_TTLS[ttl]


class _Marker:
    """Builds a copy of a body with a marker appended to the text at each breakpoint (only the containers on
    the way are copied)."""

    def __init__(self) -> None:
        self.marks: list[Mark] = []

    def put(self, holder: dict, key: str, ttl_s: float | None, where: str) -> None:
        self.marks.append(Mark(ttl_s, where))
        holder[key] = holder[key] + _marker(len(self.marks) - 1)

    def unplaceable(self, ttl_s: float, where: str) -> None:
        self.marks.append(Mark(ttl_s, where))   # no text to carry a marker (an image): counted as unplaced

    def in_block(self, block: dict, ttl_s: float, where: str) -> None:
        """At the end of a content block's text; for a tool call after its name, the last free text it has."""
        kind = block.get("type")
        if kind == "tool_result" and isinstance(block.get("content"), list):
            parts = block["content"] = [dict(p) if isinstance(p, dict) else p for p in block["content"]]
            last = next((p for p in reversed(parts) if isinstance(p, dict) and isinstance(p.get("text"), str)), None)
            if last is not None:
                return self.put(last, "text", ttl_s, where)
        key = {"text": "text", "thinking": "thinking", "tool_use": "name", "tool_result": "content"}.get(kind)
        if key is not None and isinstance(block.get(key), str):
            self.put(block, key, ttl_s, where)
        else:
            self.unplaceable(ttl_s, where)

    def in_tool(self, tool: dict, ttl_s: float | None, where: str) -> None:
        """After a tool's description (or its name): the last free text of a tool definition."""
        key = "description" if isinstance(tool.get("description"), str) else "name"
        if isinstance(tool.get(key), str):
            self.put(tool, key, ttl_s, where)
        elif ttl_s is not None:
            self.unplaceable(ttl_s, where)


def _breakpoints(kind: str, body: dict) -> tuple[list[Mark], dict | None]:
    """The ``cache_control`` breakpoints of a messages or chat body, and a copy of it marked at each."""
    if kind not in ("messages", "chat"):
        return [], None
    marker, marked = _Marker(), dict(body)
    tools = body.get("tools")
    if isinstance(tools, list):
        marked["tools"] = tools = [dict(t) if isinstance(t, dict) else t for t in tools]
        for i, tool in enumerate(tools):
            if isinstance(tool, dict) and "cache_control" in tool:
                ttl = _ttl(tool["cache_control"], f"body.tools[{i}]")
                if kind == "chat" and isinstance(tool.get("function"), dict):
                    tool = tool["function"] = dict(tool["function"])
                marker.in_tool(tool, ttl, f"body.tools[{i}]")
    system = body.get("system") if kind == "messages" else None
    if isinstance(system, list):
        marked["system"] = system = [dict(b) if isinstance(b, dict) else b for b in system]
        for i, block in enumerate(system):
            if isinstance(block, dict) and "cache_control" in block:
                marker.in_block(block, _ttl(block["cache_control"], f"body.system[{i}]"), f"body.system[{i}]")
    messages = body.get("messages")
    if isinstance(messages, list):
        marked["messages"] = messages = list(messages)
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list) or not any(isinstance(b, dict) and "cache_control" in b for b in content):
                continue
            messages[i] = message = dict(message)
            message["content"] = content = [dict(b) if isinstance(b, dict) else b for b in content]
            for j, block in enumerate(content):
                if isinstance(block, dict) and "cache_control" in block:
                    where = f"body.messages[{i}].content[{j}]"
                    marker.in_block(block, _ttl(block["cache_control"], where), where)
        if kind == "messages" and body.get("cache_control") is not None and messages:
            _mark_last_block(marker, messages, _ttl(body["cache_control"], "body"))
    need(len(marker.marks) <= MAX_BREAKPOINTS,
         f"at most {MAX_BREAKPOINTS} cache_control breakpoints are allowed, got {len(marker.marks)}")
    return marker.marks, marked if marker.marks else None


def _mark_last_block(marker: _Marker, messages: list, ttl_s: float) -> None:
    """Anthropic's top-level ``cache_control``: a breakpoint on the request's last block."""
    where = f"body.messages[{len(messages) - 1}]"
    last = messages[-1] = dict(messages[-1]) if isinstance(messages[-1], dict) else messages[-1]
    content = last.get("content") if isinstance(last, dict) else None
    if isinstance(content, str):
        marker.put(last, "content", ttl_s, where)
    elif isinstance(content, list) and content and isinstance(content[-1], dict):
        content = last["content"] = list(content)
        content[-1] = dict(content[-1])
        marker.in_block(content[-1], ttl_s, where)
    else:
        marker.unplaceable(ttl_s, where)


# --- phase two: the prompt's own marks --------------------------------------------------------------------------
def _mark_prefix(chat: dict, marks: list[Mark]) -> dict:
    """A copy of a (marked) worker chat body with markers at the end of its system prompt and its last tool too
    (``prefix_tokens``); ``marks`` grows by what was placed."""
    marker = _Marker()
    marker.marks = marks
    out = dict(chat)
    messages = out.get("messages")
    if isinstance(messages, list):
        leading = 0
        while leading < len(messages) and isinstance(messages[leading], dict) and \
                messages[leading].get("role") in ("system", "developer"):
            leading += 1
        if leading:
            out["messages"] = messages = list(messages)
            system = messages[leading - 1] = dict(messages[leading - 1])
            content = system.get("content")
            if isinstance(content, str):
                marker.put(system, "content", None, "system")
            elif isinstance(content, list) and content and isinstance(content[-1], dict) \
                    and isinstance(content[-1].get("text"), str):
                content = system["content"] = list(content)
                content[-1] = dict(content[-1])
                marker.put(content[-1], "text", None, "system")
    tools = out.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[-1], dict) and isinstance(tools[-1].get("function"), dict):
        out["tools"] = tools = list(tools)
        tools[-1] = dict(tools[-1])
        tools[-1]["function"] = dict(tools[-1]["function"])
        marker.in_tool(tools[-1]["function"], None, "tools")
    return out


def marker_offsets(marked_text: str, text: str, token_ends: list[int] | Any, n_marks: int) -> list[int] | None:
    """Each marker's token offset in ``text``: how many tokens end at or before it (``token_ends`` ascending).
    None when the markers removed do not give ``text`` (a template that trims or escapes content: positions
    would be guesses)."""
    positions: dict[int, int] = {}
    pieces, last, removed = [], 0, 0
    for match in _MARKER.finditer(marked_text):
        pieces.append(marked_text[last:match.start()])
        positions.setdefault(int(match.group(1)), match.start() - removed)
        removed += match.end() - match.start()
        last = match.end()
    pieces.append(marked_text[last:])
    if "".join(pieces) != text:
        return None
    return [bisect.bisect_right(token_ends, positions[i]) if i in positions else 0 for i in range(n_marks)]
