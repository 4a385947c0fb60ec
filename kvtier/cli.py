"""kvtier keeps the KV cache of agent sessions alive below the GPU (pinned host memory, local NVMe, Redis or
Valkey) and brings it back faster than prefill would recompute it.

Each subcommand lives in its own module exposing ``add_arguments`` and ``run``; modules are imported only
when their subcommand is used, so ``kvtier sim`` never imports torch kernels. Bad input of any kind (a flag,
the configuration file, a ``KVTIER_*`` variable) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from kvtier.command_options import check_section, parse_with_config
from kvtier.config import COMMAND_SECTIONS, KvtierConfig, read_yaml_mapping
from kvtier.errors import UsageError

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvtier.runner.demo", "an agentic coding session with and without kvtier (the main job)"),
    "sim": ("kvtier.sim.cli", "replay a trace through the block manager and compare eviction policies"),
    "router": ("kvtier.router.cli", "KV-aware router with an OpenAI/Anthropic-compatible front"),
    "bench": ("kvtier.bench.cli", "benchmarks: kvtier against its ceilings, baselines and peers"),
}

CONFIG_HELP = ("YAML file: engine keys (kvtier.config.KvtierConfig) at the top level and this command's options "
               "under a section named after it; KVTIER_<KEY> and KVTIER_<COMMAND>_<OPTION> variables override "
               "it, flags override both (see kvtier.yaml in the repository)")


class _DefaultsShown(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (the problem and where to look) instead of usage + error."""

    def __init__(self, **kwargs) -> None:
        super().__init__(formatter_class=_DefaultsShown, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def kvtier_version() -> str:
    try:
        return version("kvtier")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def top_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kvtier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"kvtier {kvtier_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=f"kvtier {name}", description=SUBCOMMANDS[name][1])
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        parser = top_parser()
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # --help / --version exit here; anything else is a one-line error
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"kvtier: unknown command {name!r} (commands: {', '.join(SUBCOMMANDS)}; see kvtier --help)",
              file=sys.stderr)
        return 2
    try:
        parser = command_parser(name)
        config_path = _config_path(name, argv[1:])
        if config_path is not None:
            check_config_file(config_path, name)
        args = parse_with_config(parser, name, argv[1:], config_path, os.environ)
        return int(importlib.import_module(SUBCOMMANDS[name][0]).run(args) or 0)
    except UsageError as exc:
        print(f"kvtier {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def check_config_file(path: str, command: str) -> None:
    """The whole file, whichever command loads it: its top level against the engine's keys and every other
    command's section against that command's options, so a typo is caught the first time the file is used (the
    command's own section is read with its options)."""
    data = read_yaml_mapping(path)
    KvtierConfig.from_mapping({k: v for k, v in data.items() if k not in COMMAND_SECTIONS}, path)
    for other in COMMAND_SECTIONS:
        if other != command and other in data:
            check_section(command_parser(other), other, path)


def _config_path(name: str, argv: list[str]) -> str | None:
    """``--config`` alone, before the configured defaults exist (so required options may still be missing)."""
    pre = OneLineParser(prog=f"kvtier {name}", add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    return known.config


if __name__ == "__main__":
    raise SystemExit(main())
