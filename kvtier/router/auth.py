"""Who may use the router: client API keys (each optionally bound to a tenant's cache salt) and an admin key.

Keys are compared in constant time (``hmac.compare_digest`` over SHA-256 digests, every key checked), so the
time an answer takes does not tell an attacker how much of a guess was right. A key bound to a tenant salt
makes that salt the request's salt: the client cannot read or pollute another tenant's cache or sessions.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

@dataclass(frozen=True)
class Tenant:
    """What a valid key grants: its tenant salt (``None``: the client chooses, as without keys)."""

    salt: str | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class Auth:
    """Client keys -> tenant, and the admin key. No client keys: the API is open; no admin key: no admin API."""

    keys: dict[str, str | None] = field(default_factory=dict)   # key -> tenant salt or None
    admin_key: str | None = None

    def __post_init__(self) -> None:
        for key in self.keys:
            if not key or any(c.isspace() for c in key):
                raise ValueError("an API key must be non-empty and contain no whitespace")
        if self.admin_key is not None and not self.admin_key.strip():
            raise ValueError("the admin key must not be empty")
        self._keys = [(_digest(k), Tenant(s or None)) for k, s in self.keys.items()]
        self._admin = _digest(self.admin_key) if self.admin_key else None

    @property
    def open(self) -> bool:
        return not self._keys

    @property
    def admin_enabled(self) -> bool:
        return self._admin is not None

    def client(self, request: web.Request) -> Tenant | None:
        """The tenant of the request's key; ``None`` when keys are required and it has no valid one."""
        if self.open:
            return Tenant()
        presented = _presented_key(request)
        if presented is None:
            return None
        digest = _digest(presented)
        found = None
        for known, tenant in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def admin(self, request: web.Request) -> bool:
        presented = _presented_key(request)
        return self._admin is not None and presented is not None and hmac.compare_digest(self._admin, _digest(presented))


def _presented_key(request: web.Request) -> str | None:
    """``Authorization: Bearer K`` (OpenAI clients) or ``x-api-key: K`` (Anthropic clients)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


def parse_key_entry(entry: str, separator: str | None) -> tuple[str, str | None]:
    """``key`` or ``key<separator>tenant-salt``; ``separator=None``: whitespace (a key file's line)."""
    parts = entry.split() if separator is None else [p.strip() for p in entry.split(separator, 1)]
    if not 1 <= len(parts) <= 2 or not parts[0]:
        raise ValueError(f"bad API key entry {entry[:4]!r}...: want 'key' or 'key{separator or ' '}tenant-salt'")
    return parts[0], (parts[1] if len(parts) == 2 and parts[1] else None)


def load_keys(flag_keys: list[str], key_file: str | None) -> dict[str, str | None]:
    """Client keys from ``--api-key`` (``key`` or ``key:salt``; ``kvtier router`` also takes them from
    ``KVTIER_ROUTER_API_KEY``, space-separated) and ``--api-key-file`` (one ``key [salt]`` a line, ``#``
    comments). ValueError for a malformed entry or a key given twice with different salts."""
    entries: list[tuple[str, str | None]] = [parse_key_entry(k, ":") for k in flag_keys]
    if key_file:
        for line in Path(key_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append(parse_key_entry(line, None))
    keys: dict[str, str | None] = {}
    for key, salt in entries:
        if key in keys and keys[key] != salt:
            raise ValueError(f"API key {key[:4]}... is given twice with different tenant salts")
        keys[key] = salt
    return keys
