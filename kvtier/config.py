"""kvtier's one configuration schema, loadable from YAML, ``KVTIER_*`` environment variables and plug-ins'
extra configs.

Precedence: defaults < YAML file < environment < explicit keyword overrides. Every field's type
(``kvtier.config_types``) says what it accepts, and every value is checked against it when the configuration is
made or loaded: an unknown key or a value of the wrong type or range is a ``ConfigError`` naming the key (or the
variable), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from kvtier.config_types import (TRANSFER_IMPLS, ByteSize, Flag, Fraction, NonNegativeFloat, NonNegativeInt,
                                 PolicyName, PositiveByteSize, PositiveInt, RemoteUrl, Text, TransferImpl, convert,
                                 parse_bool, parse_bytes)
from kvtier.errors import ConfigError

__all__ = ["KvtierConfig", "ConfigError", "read_yaml_mapping", "parse_bool", "parse_bytes", "TRANSFER_IMPLS",
           "ENV_PREFIX", "COMMAND_SECTIONS", "OTHER_VARIABLES"]

ENV_PREFIX = "KVTIER_"
# Sections of a kvtier.yaml that hold a command's options rather than engine keys, and the matching
# ``KVTIER_<SECTION>_<OPTION>`` variables (see ``kvtier.cli``); the engine configuration skips both.
COMMAND_SECTIONS = ("demo", "sim", "router", "bench")
# kvtier's variables that are not configuration keys: the sim's trace cache, the vLLM CPU build for tests,
# the kernels' measured dispatch table, the benchmarks' peer environments and shared data
OTHER_VARIABLES = ("KVTIER_CACHE", "KVTIER_VLLM_CPU_PYTHON", "KVTIER_DISPATCH_TABLE", "KVTIER_PEERS_DIR",
                   "KVTIER_SHARED")


@dataclass
class KvtierConfig:
    """Every kvtier setting. Each field's type is its schema (what it accepts, its range), so the keys a file,
    a variable or a plug-in's extra config may set are exactly these fields."""

    # --- model / keys -----------------------------------------------------------------------------------
    block_size: PositiveInt = 16              # tokens per block (the hash-chain unit)
    chunk_blocks: PositiveInt = 16            # blocks per chunk below G1
    cache_salt: Text = ""                     # tenant salt; different salts never share entries
    model_name: Text = "model"
    # --- kernels (G1 <-> G2) ----------------------------------------------------------------------------
    transfer_impl: TransferImpl = "auto"
    sm_budget: NonNegativeInt = 0             # max CTAs' SMs a transfer may occupy; 0 = all
    # --- G2 pinned host pool -----------------------------------------------------------------------------
    host_capacity_bytes: ByteSize = 4 * 2**30
    # --- G3 disk ------------------------------------------------------------------------------------------
    disk_path: Text = ""                      # empty: no disk tier
    disk_capacity_bytes: ByteSize = 64 * 2**30
    disk_io_threads: PositiveInt = 8
    disk_use_direct_io: Flag = True
    disk_fsync: Flag = False                  # also fdatasync after each chunk write (flushes the device cache)
    disk_max_pending_bytes: PositiveByteSize = 2**30  # writes queued beyond this are skipped (slow disk)
    # --- G4 remote ----------------------------------------------------------------------------------------
    remote_url: RemoteUrl = ""                # empty: no remote tier
    remote_password: Text = ""
    remote_username: Text = ""
    remote_ttl_s: NonNegativeInt = 0          # 0: no expiry
    remote_timeout_s: NonNegativeFloat = 0.5
    remote_part_bytes: PositiveByteSize = 8 * 2**20  # large chunks are split into parts of this size
    remote_connections: PositiveInt = 4       # batches are split over this many pipelined connections
    remote_tls_ca_file: Text = ""             # rediss:// only: CA bundle to verify the server; empty: system CAs
    remote_tls_cert_file: Text = ""           # client certificate (mutual TLS), with remote_tls_key_file
    remote_tls_key_file: Text = ""
    # --- manager ------------------------------------------------------------------------------------------
    policy: PolicyName = "agent"
    pin_budget_frac: Fraction = 0.5           # share of each tier that pins may hold
    tenant_pin_budget_frac: Fraction = 1.0    # share of that budget one tenant's pins may hold (see kvtier.hints)
    pin_lease_s: NonNegativeFloat = 600.0
    admission_min_hits: NonNegativeInt = 1    # G3/G4 admission: seen at least this often (1: whatever G2 evicts;
                                              # agent contexts are re-read once, after G2 let them go)
    write_through: Flag = False
    # --- engine -------------------------------------------------------------------------------------------
    lower_tier_deadline_ms: NonNegativeFloat = 200.0  # wait no longer than this for G3/G4; recompute instead
    layerwise_load: Flag = False              # GPU: load chunks layer by layer (see KvtierEngine.wait_layer)
    events_endpoint: Text = ""                # e.g. tcp://*:5557 ; empty: no event publishing
    events_replay_endpoint: Text = ""

    def __post_init__(self) -> None:
        """Every way of making a configuration (defaults, ``load``, ``dataclasses.replace``) is checked here."""
        for name, kind in _SCHEMA.items():
            setattr(self, name, convert(name, kind, getattr(self, name)))
        tls = (self.remote_tls_ca_file, self.remote_tls_cert_file, self.remote_tls_key_file)
        if self.remote_url and any(tls) and not self.remote_url.startswith("rediss"):
            raise ConfigError(f"remote_tls_* files need a rediss:// remote_url, got {self.remote_url!r}")
        if bool(self.remote_tls_cert_file) != bool(self.remote_tls_key_file):
            raise ConfigError("remote_tls_cert_file and remote_tls_key_file must be set together")

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
            config = config._replace({k: v for k, v in data.items() if k not in COMMAND_SECTIONS}, str(yaml_path))
        env = os.environ if env is None else env
        command_prefixes = tuple(f"{ENV_PREFIX}{section.upper()}_" for section in COMMAND_SECTIONS)
        variables = {variable[len(ENV_PREFIX):].lower(): variable for variable in env
                     if variable.startswith(ENV_PREFIX) and not variable.startswith(command_prefixes)
                     and variable not in OTHER_VARIABLES}
        config = config._replace({key: env[variable] for key, variable in variables.items()},
                                 ", ".join(variables.values()), variables)
        return config._replace(overrides, "arguments")

    def _replace(self, values: Mapping[str, Any], source: str, sources: Mapping[str, str] | None = None
                 ) -> KvtierConfig:
        """``values`` over this configuration, all at once (keys that go together may come in any order); an
        error names ``source``, or for one key's value ``sources[key]`` (the environment variable)."""
        changes: dict[str, Any] = {}
        for name, raw in values.items():
            where = sources[name] if sources else source
            if name not in _SCHEMA:
                close = difflib.get_close_matches(str(name), _SCHEMA, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else " (the keys are listed in kvtier/config.py)"
                raise ConfigError(f"{where}: unknown configuration key {name!r}{hint}")
            try:
                changes[name] = convert(name, _SCHEMA[name], raw)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        try:
            return dataclasses.replace(self, **changes) if changes else self
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


# every field and its type (the ``Annotated`` kinds of kvtier.config_types): the one list of keys
_SCHEMA: dict[str, Any] = typing.get_type_hints(KvtierConfig, include_extras=True)


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
