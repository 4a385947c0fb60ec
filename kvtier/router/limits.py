"""Bounds on what a client can make the router parse, store or forward.

A body is parsed only up to ``MAX_JSON_DEPTH`` levels of nesting (deeper input would exhaust Python's stack
in the parser, the template renderer or the encoder that forwards it). Agent hints and the signals they are
derived from are bounded by their schema (:mod:`kvtier.hints`, :mod:`kvtier.router.signals`).
"""

from __future__ import annotations

import json
from typing import Any

from kvtier.router.translate import BadRequest, need

MAX_JSON_DEPTH = 100


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
