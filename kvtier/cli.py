"""The ``kvtier`` command. Each subcommand lives in its own module exposing ``add_arguments`` and ``run``;
modules are imported only when their subcommand is used, so ``kvtier sim`` never imports torch kernels."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvtier.runner.demo", "an agentic coding session with and without kvtier (the main job)"),
    "sim": ("kvtier.sim.cli", "replay a trace through the block manager and compare eviction policies"),
    "router": ("kvtier.router.cli", "KV-aware router with an OpenAI/Anthropic-compatible front"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvtier", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"kvtier {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
