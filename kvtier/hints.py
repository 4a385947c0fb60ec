"""``agent_hints``: what an agent client tells the server about a request's future, and how it maps to retention.

A client sends the hints in a request body (``nvext.agent_hints``, or vLLM ``kv_transfer_params``); kvtier's
router also derives them from what agent clients send anyway (``kvtier.router.signals``). This is the one
schema: the router validates with it before anything is forwarded, and the engine and both plug-ins parse with
it. It is strict: an unknown field or a value out of range is a ``HintError`` naming it, so a typo never
silently turns into "no hint"; and bounded (lengths, counts, encoded size), since hints come from untrusted
clients. Everything is expressed in tokens; ``block_plan`` turns it into per-block retention.

Dynamo's ``nvext.agent_hints`` fields ``osl``, ``priority`` and ``latency_sensitivity`` mean here what they mean
there (``priority`` also sets retention, see ``AgentHints``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

DEFAULT_PRIORITY = 50
DEFAULT_PRIORITY_DURATION_S = 300.0    # a request priority without a duration holds this long (5 min)
MAX_SESSION_ID_CHARS = 256
MAX_HINT_LIST = 64                     # pins, priorities, ephemeral ranges
MAX_HINTS_BYTES = 4096                 # the hints of one request, encoded as JSON
MAX_SECONDS = 7 * 24 * 3600.0          # leases, durations and delays: a week at most
# beside agent_hints in kv_transfer_params: the tenant whose share of the pin budget the request's pins count
# against. kvtier router sets it from the API key's salt (a client's own value never passes the router).
TENANT_FIELD = "kvtier_tenant"


class HintError(ValueError):
    """Hints that do not parse or do not make sense."""


class TokenRange(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Tokens ``[start, end)`` of the request's prompt."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise HintError(f"token range must satisfy 0 <= start < end, got [{self.start}, {self.end})")


class Pin(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Keep these tokens' KV for ``lease_s`` seconds (renewable). ``target="system_and_tools"`` means
    the first ``AgentHints.prefix_tokens`` tokens, i.e. the system prompt and tool definitions."""

    range: TokenRange | None = None
    target: Literal["system_and_tools"] | None = None
    lease_s: float | None = None

    def __post_init__(self) -> None:
        if (self.range is None) == (self.target is None):
            raise HintError("a pin names exactly one of 'range' or 'target'")
        if self.lease_s is not None:
            _check_seconds("pin lease_s", self.lease_s, positive=True)


class PriorityRange(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Priority 0-100 for a token range, for ``duration_s`` seconds; then it decays to the default."""

    range: TokenRange
    priority: int
    duration_s: float

    def __post_init__(self) -> None:
        _check_priority(self.priority)
        _check_seconds("priority duration_s", self.duration_s, positive=True)


class AgentHints(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """A request's hints. ``priority`` (0-100, default 50) keeps the request's KV for ``priority_duration_s``
    (default 5 min) and is also the request's scheduling priority on vLLM workers started with
    ``--scheduling-policy priority`` (higher first). ``session_final``: the session's last request; its KV goes
    first once it ends and it renews no pins. ``osl`` and ``latency_sensitivity`` are for the router (expected
    output tokens count as decode load; a request waiting for a worker is queued as if it arrived that many
    seconds earlier), as in Dynamo."""

    session_id: str | None = None
    priority: int | None = None                 # the whole request, for priority_duration_s
    priority_duration_s: float | None = None
    pins: list[Pin] = []
    priorities: list[PriorityRange] = []
    ephemeral: list[TokenRange] = []            # reasoning / scratch tokens that will not be re-sent
    prefix_tokens: int | None = None            # length of the system prompt + tool definitions
    next_call_delay_s: float | None = None      # e.g. a tool call is running; the session returns after it
    osl: int | None = None                      # expected output tokens
    latency_sensitivity: float | None = None    # seconds earlier in the router's queue
    prefetch: bool = False                      # bring this session's KV up before the next call
    session_final: bool = False

    def __post_init__(self) -> None:
        if self.session_id is not None and not 0 < len(self.session_id) <= MAX_SESSION_ID_CHARS:
            raise HintError(f"session_id must be 1 to {MAX_SESSION_ID_CHARS} characters, got {len(self.session_id)}")
        for name in ("pins", "priorities", "ephemeral"):
            if len(getattr(self, name)) > MAX_HINT_LIST:
                raise HintError(f"{name} has more than {MAX_HINT_LIST} entries")
        if self.priority is not None:
            _check_priority(self.priority)
        if self.priority_duration_s is not None:
            _check_seconds("priority_duration_s", self.priority_duration_s, positive=True)
        for name in ("prefix_tokens", "osl"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**31:
                raise HintError(f"{name} must be within 0..2^31, got {value}")
        for name in ("next_call_delay_s", "latency_sensitivity"):
            if getattr(self, name) is not None:
                _check_seconds(name, getattr(self, name), positive=False)
        if any(p.target == "system_and_tools" for p in self.pins) and not self.prefix_tokens:
            raise HintError("pinning 'system_and_tools' needs prefix_tokens")

    @property
    def retention_priority(self) -> tuple[int, float] | None:
        """(priority, duration) for the whole request, or None."""
        if self.priority is None:
            return None
        return self.priority, self.priority_duration_s or DEFAULT_PRIORITY_DURATION_S


def _check_priority(priority: int) -> None:
    if not 0 <= priority <= 100:
        raise HintError(f"priority must be within 0..100, got {priority}")


def _check_seconds(name: str, value: float, positive: bool) -> None:
    """A duration in seconds: finite, within a week, positive or at least not negative."""
    if not (0 < value if positive else 0 <= value) or not value <= MAX_SECONDS:
        raise HintError(f"{name} must be {'positive' if positive else 'non-negative'} seconds, at most "
                        f"{MAX_SECONDS:.0f}, got {value}")


def parse_hints(raw: AgentHints | dict[str, Any] | str | bytes | None) -> AgentHints:
    """Hints from a decoded request body (dict), raw JSON, or ``None`` (no hints)."""
    if raw is None:
        return AgentHints()
    if isinstance(raw, AgentHints):
        return raw
    try:
        if isinstance(raw, (str, bytes, bytearray)):
            if len(raw) > MAX_HINTS_BYTES:
                raise HintError(f"agent_hints are larger than {MAX_HINTS_BYTES} bytes")
            return msgspec.json.decode(raw, type=AgentHints)
        if isinstance(raw, dict):
            hints = msgspec.convert(raw, type=AgentHints)
            if len(msgspec.json.encode(hints)) > MAX_HINTS_BYTES:
                raise HintError(f"agent_hints are larger than {MAX_HINTS_BYTES} bytes")
            return hints
    except HintError:
        raise
    except msgspec.ValidationError as exc:
        raise HintError(f"agent_hints: {exc}") from None
    except msgspec.DecodeError as exc:
        raise HintError(f"agent_hints is not valid JSON: {exc}") from None
    raise HintError(f"agent_hints must be a mapping or JSON text, got {type(raw).__name__}")


def hints_from_body(body: dict[str, Any]) -> AgentHints:
    """Find the hints in a request body: ``nvext.agent_hints`` or ``kv_transfer_params.agent_hints``."""
    for outer in ("nvext", "kv_transfer_params"):
        holder = body.get(outer)
        if isinstance(holder, dict) and "agent_hints" in holder:
            return parse_hints(holder["agent_hints"])
    return AgentHints()


@dataclass
class BlockPlan:
    """Per-block retention derived from hints, as block index lists (block i = tokens [i*bs, (i+1)*bs))."""

    pins: dict[float | None, list[int]] = field(default_factory=dict)       # lease (None: default) -> blocks
    priorities: list[tuple[list[int], int, float]] = field(default_factory=list)  # (blocks, priority, duration)
    ephemeral: list[int] = field(default_factory=list)


def _blocks_overlapping(rng: TokenRange, block_size: int, num_blocks: int) -> range:
    return range(rng.start // block_size, min(num_blocks, -(-rng.end // block_size)))


def block_plan(hints: AgentHints, num_blocks: int, block_size: int) -> BlockPlan:
    """Map token-level hints onto the request's ``num_blocks`` full blocks.

    A block is pinned or prioritised if it overlaps the range (keeping a little extra is harmless). A block
    is ephemeral if it overlaps an ephemeral range: its prefix hash includes tokens that will not be re-sent,
    so no later request can hit it.
    """
    if block_size <= 0 or num_blocks < 0:
        raise HintError(f"bad block geometry: {num_blocks} blocks of {block_size} tokens")
    plan = BlockPlan()
    for pin in () if hints.session_final else hints.pins:  # a session that is over renews no pins
        rng = pin.range if pin.range is not None else TokenRange(0, int(hints.prefix_tokens or 0))
        plan.pins.setdefault(pin.lease_s, []).extend(_blocks_overlapping(rng, block_size, num_blocks))
    if hints.retention_priority is not None:
        priority, duration = hints.retention_priority
        plan.priorities.append((list(range(num_blocks)), priority, duration))
    for pr in hints.priorities:
        plan.priorities.append((list(_blocks_overlapping(pr.range, block_size, num_blocks)), pr.priority,
                                pr.duration_s))
    seen: set[int] = set()
    for rng in hints.ephemeral:
        seen.update(_blocks_overlapping(rng, block_size, num_blocks))
    plan.ephemeral = sorted(seen)
    return plan
