"""Bounds on what a client can make the router parse, store or forward.

A body is parsed only up to ``MAX_JSON_DEPTH`` levels of nesting (deeper input would exhaust Python's stack
in the parser, the template renderer or the encoder that forwards it). ``agent_hints`` travel to the worker
in one HTTP header, and worker front ends cap a header near 8 KiB (aiohttp) or a header block at 16 KiB
(uvicorn's h11), so hints are bounded here: a session id, a few lists, and the whole encoded header.
"""

from __future__ import annotations

import json
from typing import Any

from kvtier.router.translate import BadRequest, need

MAX_JSON_DEPTH = 100
MAX_SESSION_ID_CHARS = 256
MAX_HINT_LIST = 64                  # pins, priorities, ephemeral ranges
MAX_HINTS_HEADER_BYTES = 4096
MAX_ABS_PRIORITY = 1_000_000
HINT_LISTS = ("pins", "priorities", "ephemeral")


def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object, or a :class:`BadRequest` saying why not."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    need(isinstance(body, dict), "the request body must be a JSON object")
    need(_depth_within(body, MAX_JSON_DEPTH), f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _no_constant(name: str) -> None:
    """NaN and Infinity are not JSON; accepting them would forward them to workers that refuse them."""
    raise ValueError(f"{name} is not a JSON value")


def _depth_within(value: Any, limit: int) -> bool:
    """Iterative (no recursion to exhaust): does every container sit at most ``limit`` levels deep?"""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def agent_hints(body: dict) -> dict:
    """``nvext.agent_hints``, checked to fit the bounds above (a superset of kvtier's schema: a Dynamo
    client's extra fields pass through to the worker, which validates the rest)."""
    nvext = body.get("nvext")
    if nvext is None:
        return {}
    need(isinstance(nvext, dict), "body.nvext must be an object")
    hints = nvext.get("agent_hints")
    if hints is None:
        return {}
    need(isinstance(hints, dict), "body.nvext.agent_hints must be an object")
    session = hints.get("session_id")
    need(session is None or isinstance(session, str), "agent_hints.session_id must be a string")
    need(session is None or len(session) <= MAX_SESSION_ID_CHARS,
         f"agent_hints.session_id is longer than {MAX_SESSION_ID_CHARS} characters")
    priority = hints.get("priority", 0)
    need(isinstance(priority, int) and not isinstance(priority, bool) and abs(priority) <= MAX_ABS_PRIORITY,
         f"agent_hints.priority must be an integer within [-{MAX_ABS_PRIORITY}, {MAX_ABS_PRIORITY}]")
    for name in HINT_LISTS:
        items = hints.get(name)
        need(items is None or (isinstance(items, list) and len(items) <= MAX_HINT_LIST),
             f"agent_hints.{name} must be an array of at most {MAX_HINT_LIST} entries")
    need(len(hints_header(hints)) <= MAX_HINTS_HEADER_BYTES,
         f"agent_hints encode to more than {MAX_HINTS_HEADER_BYTES} bytes (they travel in one HTTP header)")
    return hints


def hints_header(hints: dict) -> str:
    """The ``x-kvtier-agent-hints`` header value: compact ASCII JSON."""
    return json.dumps(hints, separators=(",", ":"))
