"""The kinds of value a configuration key takes, as ``Annotated`` types of ``KvtierConfig``'s fields.

msgspec checks each value against its type and constraints; ``Accepts`` adds what msgspec does not do (byte
sizes such as ``"4GiB"``, the usual spellings of true and false, YAML numbers for text) and the words an error
uses for what the key accepts, so every key's message comes from its type instead of hand-written checks.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from kvtier.errors import ConfigError
from kvtier.manager.policies import ONLINE_POLICIES

TRANSFER_IMPLS = ("auto", "torch", "triton", "cuda", "staged", "dma")
REMOTE_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str) -> int:
    """``4096``, ``"4096"``, ``"4KiB"``, ``"1.5GB"`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"not a byte size: {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a byte size: {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_bool(value: bool | str) -> bool:
    """``true``/``false`` and the usual spellings of both (``1``, ``yes``, ``on`` ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not true or false: {value!r}")


def _text(value: Any) -> Any:
    """A YAML number where text is expected (``cache_salt: 1234``) is that text."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


@dataclass(frozen=True)
class Accepts:
    """``what`` completes "<key> expects ..."; ``read`` turns input msgspec would refuse into the field's type."""
    what: str
    read: Callable[[Any], Any] | None = None


def _one_of(values: tuple[str, ...]) -> str:
    return f"one of {', '.join(values)}"


_SIZE_TEXT = 'byte size (an integer, or like "4GiB", "512MB")'
ByteSize = Annotated[int, Meta(ge=0), Accepts(f"a {_SIZE_TEXT}", parse_bytes)]
PositiveByteSize = Annotated[int, Meta(gt=0), Accepts(f"a positive {_SIZE_TEXT}", parse_bytes)]
PositiveInt = Annotated[int, Meta(gt=0), Accepts("a positive integer")]
NonNegativeInt = Annotated[int, Meta(ge=0), Accepts("an integer >= 0")]
NonNegativeFloat = Annotated[float, Meta(ge=0), Accepts("a number >= 0")]
Fraction = Annotated[float, Meta(ge=0, le=1), Accepts("a number within [0, 1]")]
Flag = Annotated[bool, Accepts("true or false (or 1/0, yes/no, on/off)", parse_bool)]
Text = Annotated[str, Accepts("a string", _text)]
RemoteUrl = Annotated[str, Meta(pattern="^(?:$|" + "|".join(map(re.escape, REMOTE_SCHEMES)) + ")"),
                      Accepts(f"a URL starting with {', '.join(REMOTE_SCHEMES)} (empty: no remote tier)", _text)]
TransferImpl = Annotated[Literal[TRANSFER_IMPLS], Accepts(_one_of(TRANSFER_IMPLS))]
PolicyName = Annotated[Literal[ONLINE_POLICIES], Accepts(_one_of(ONLINE_POLICIES))]


def convert(name: str, kind: Any, raw: Any) -> Any:
    """``raw`` as a value of ``kind`` (one of the types above); a ConfigError naming ``name`` and what it takes."""
    accepts = next(m for m in typing.get_args(kind)[1:] if isinstance(m, Accepts))
    try:
        return msgspec.convert(accepts.read(raw) if accepts.read else raw, kind, strict=False)
    except (msgspec.ValidationError, ConfigError):
        raise ConfigError(f"{name} expects {accepts.what}, got {raw!r}") from None
