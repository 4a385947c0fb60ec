"""A command's options from a configuration file and the environment, below its flags.

Precedence for ``kvtier <command>``: the option's default < the YAML file's ``<command>:`` section <
``KVTIER_<COMMAND>_<OPTION>`` variables < flags on the command line. Option names are the flags' names
(``max-inflight`` or ``max_inflight``); a repeatable flag takes a YAML list or a space-separated variable.
The values become the parser's defaults, so argparse still converts and checks them, and a flag given on the
command line wins. Also the argument types the commands share.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

from kvtier.config import ENV_PREFIX, KvtierConfig, parse_bool, parse_bytes, read_yaml_mapping
from kvtier.errors import ConfigError, UsageError


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expects an integer of 0 or more, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expects a finite number of 0 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expects a finite number above 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expects a fraction within (0, 1], got {text!r}")
    return value


def byte_size(text: str) -> int:
    """A positive size: bytes, or with a unit ("128MiB")."""
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expects a positive size like 128MiB, got {text!r}")
    return value


def torch_device(text: str) -> str:
    """cpu or cuda[:N], and only a CUDA device this machine has."""
    import torch  # here: the commands without a device never import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu or cuda[:N])") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: expects cpu or cuda[:N]")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here (torch {torch.__version__} sees none); "
                                         "use --device cpu")
    return text


def output_path(text: str) -> str:
    """A file to write results to: its directory must exist now, not after a long run."""
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"no directory {directory!r} to write {text!r} into")
    return text


def directory(text: str) -> str:
    """A directory that exists now."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no directory {text!r}")
    return text


def remote_url(text: str) -> str:
    """A G4 URL, checked as the engine checks ``remote_url``."""
    try:
        return KvtierConfig.from_mapping({"remote_url": text}).remote_url
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_with_config(parser: argparse.ArgumentParser, command: str, argv: list[str], config_path: str | None,
                      env: Mapping[str, str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` over defaults from ``config_path``'s section for ``command`` and the
    environment. A repeatable flag given on the command line replaces the configured list, not extends it."""
    options = _options(parser)
    configured = _configured(options, command, config_path, env)
    lists = {dest: value for dest, value in configured.items() if isinstance(options[dest], argparse._AppendAction)}
    for dest in configured:
        options[dest].required = False
    parser.set_defaults(**{dest: value for dest, value in configured.items() if dest not in lists})
    args = parser.parse_args(argv)
    for dest, value in lists.items():
        if not getattr(args, dest):  # the flag was not given
            setattr(args, dest, value)
    return args


def check_section(parser: argparse.ArgumentParser, command: str, config_path: str) -> None:
    """The file's section for ``command`` against that command's options (names and values), as if it ran."""
    _configured(_options(parser), command, config_path, {})


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def _configured(options: Mapping[str, argparse.Action], command: str, config_path: str | None,
                env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, tuple[Any, str]] = {}
    if config_path is not None:
        section = read_yaml_mapping(config_path).get(command, {})
        if not isinstance(section, dict):
            raise UsageError(f"{config_path}: '{command}' must be a mapping of option names to values")
        for name, raw in section.items():
            source = f"{config_path}: {command}.{name}"
            values[_dest(str(name), options, source)] = (raw, source)
    prefix = f"{ENV_PREFIX}{command.upper()}_"
    for variable, raw in env.items():
        if variable.startswith(prefix):
            values[_dest(variable[len(prefix):].lower(), options, variable)] = (raw, variable)
    return {dest: _value(options[dest], raw, source) for dest, (raw, source) in values.items()}


def _dest(name: str, options: Mapping[str, argparse.Action], source: str) -> str:
    dest = name.replace("-", "_")
    if dest not in options:
        known = ", ".join(sorted(a.option_strings[-1].lstrip("-") for a in options.values()))
        raise UsageError(f"{source}: no such option (options: {known})")
    return dest


def _value(action: argparse.Action, raw: Any, source: str) -> Any:
    """A configured value in the form the flag would produce, checked like the flag."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        try:
            return parse_bool(raw)
        except UsageError:
            raise UsageError(f"{source}: expects true or false, got {raw!r}") from None
    if isinstance(action, argparse._AppendAction):
        items = raw.split() if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise UsageError(f"{source}: expects a list (YAML) or space-separated values, got {raw!r}")
        return [_one(action, item, source) for item in items]
    return _one(action, raw, source)


def _one(action: argparse.Action, raw: Any, source: str) -> Any:
    if isinstance(raw, (dict, list)) or raw is None:
        raise UsageError(f"{source}: expects a single value, got {raw!r}")
    convert = action.type or str
    try:
        value = convert(str(raw)) if callable(convert) else raw
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{source}: {exc}") from None
    except (TypeError, ValueError):
        raise UsageError(f"{source}: expects {getattr(convert, '__name__', 'another value')}, got {raw!r}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{source}: expects one of {', '.join(map(str, action.choices))}, got {raw!r}")
    return value

