"""Every option of every ``kvtier`` command, given bad values, ends in one line on stderr and exit 2, before any work
starts: the sweep walks the commands' own parsers, so an option added tomorrow is covered too. Each option's type is
a checked converter with bad values listed here, or text with a reason and the bad values its command checks."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
from collections.abc import Iterator

import pytest
import torch

from kvtier import command_options as checked
from kvtier.bench import policies, serving, tiers
from kvtier.bench.cli import BENCHMARKS
from kvtier.cli import SUBCOMMANDS, OneLineParser, command_parser, main
from kvtier.router import cli as router_cli
from kvtier.runner import demo
from kvtier.sim import cli as sim_cli

NOWHERE = "/no/such/dir/out.json"
# bad values of each checked type (an option whose type is missing here fails the first test)
BAD_VALUES: dict[object, list[str]] = {
    int: ["x", "1.5"],
    checked.positive_int: ["0", "-1", "x"],
    checked.non_negative_int: ["-1", "x"],
    checked.non_negative_float: ["-1", "nan", "inf", "x"],
    checked.positive_float: ["0", "-1", "nan", "x"],
    checked.fraction: ["0", "1.5", "x"],
    checked.byte_size: ["0", "lots", "-1MiB"],
    checked.output_path: [NOWHERE],
    checked.directory: ["/no/such/dir"],
    checked.torch_device: ["gpu", "tpu"] + ([] if torch.cuda.is_available() else ["cuda"]),
    checked.remote_url: ["http://127.0.0.1:1", "nope"],
    demo.model_arg: ["huge"],
    sim_cli.fractions_arg: ["0", "2", "x"],
    sim_cli.blocks_arg: ["0", "x"],
    sim_cli.tiers_arg: ["4,x", "-1", "1,2,3,4"],
    sim_cli.max_gap_arg: ["-1", "x"],
    router_cli.port_arg: ["0", "99999", "x"],
    router_cli.worker_arg: ["w1:8000", "ftp://x"],
    router_cli.events_arg: ["nope"],
    serving.configs_arg: ["e", ""],
    tiers.sizes_arg: ["0", "x,1"],
    policies.regimes_arg: ["nope", "agentic,nope"],   # empty: none of them (--regimes "" skips the synthetic ones)
    policies.policies_arg: ["nope"],
    policies.admission_arg: ["nope"],
}
BAD_CHOICE = ["nope"]
# options that take any text: why, and the bad values their command checks when it starts
TEXT: dict[tuple[str, str], tuple[str, list[str]]] = {
    ("sim", "--trace"): ("a path, checked when read", ["/no/such/trace"]),
    ("router", "--host"): ("an address, checked when bound", ["999.1.1.1"]),
    ("router", "--tokenizer"): ("a path, checked when loaded", ["/no/such/tokenizer.json"]),
    ("router", "--api-key"): ("a secret with an optional salt", [":salt"]),
    ("router", "--api-key-file"): ("a path, checked when read", ["/no/such/keys"]),
    ("router", "--admin-key"): ("a secret: any text", []),
    ("bench router", "--trace"): ("a path, checked when read", ["/no/such/trace"]),
    ("bench policies", "--weka"): ("a path, checked when read", ["/no/such/trace"]),
    ("bench policies", "--weka-more"): ("paths, checked when read", ["/no/such/trace"]),
    ("bench policies", "--mooncake"): ("paths, checked when read", ["/no/such/trace"]),
}
# what a command needs besides the option under test (its required options)
BASE = {"sim": ["--format", "weka"], "router": ["--port", "1", "--worker", "http://127.0.0.1:1"]}
DEADLINE_S = 120  # only ever reached when something is broken


def commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for name in SUBCOMMANDS:
        if name != "bench":
            yield name, command_parser(name)
    for name, (module, _) in BENCHMARKS.items():
        parser = OneLineParser(prog=f"kvtier bench {name}")
        importlib.import_module(module).add_arguments(parser)
        yield f"bench {name}", parser


def valued_options() -> Iterator[tuple[str, argparse.Action]]:
    for command, parser in commands():
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help", "config") and action.nargs != 0:
                yield command, action


def bad_cases() -> Iterator[tuple[str, str, str]]:
    for command, action in valued_options():
        option = action.option_strings[-1]
        if (command, option) in TEXT:
            values = TEXT[command, option][1]
        else:
            values = (BAD_VALUES.get(action.type, []) if action.type is not None else []) + \
                (BAD_CHOICE if action.choices is not None else [])
        yield from ((command, option, value) for value in values)


def test_every_option_takes_a_checked_type_or_says_why_it_takes_text():
    unchecked = [f"kvtier {command} {action.option_strings[-1]}" for command, action in valued_options()
                 if action.choices is None and action.type not in BAD_VALUES
                 and (command, action.option_strings[-1]) not in TEXT]
    assert not unchecked, f"give these a checked type (kvtier.command_options) and list its bad values: {unchecked}"


@pytest.mark.parametrize("command, option, value", list(bad_cases()))
def test_a_bad_value_of_any_option_is_one_line_and_exit_2(command, option, value, capsys, monkeypatch):
    for variable in [v for v in os.environ if v.startswith("KVTIER_")]:
        monkeypatch.delenv(variable)
    words = command.split()
    base = BASE.get(command, [])
    if option in ("--port", "--worker"):  # the option under test replaces its own base value
        base = [word for pair in zip(base[::2], base[1::2]) if pair[0] != option for word in pair]
    signal.signal(signal.SIGALRM, _stuck)
    signal.alarm(DEADLINE_S)  # a value the command took would start its work: fail, do not hang
    try:
        code = main([*words, *base, f"{option}={value}"])
    except SystemExit as exc:  # argparse's own exit, as in the installed command
        code = exc.code
    finally:
        signal.alarm(0)
    err = capsys.readouterr().err
    assert code == 2, (command, option, value, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (command, option, value, err)


def _stuck(signum, frame) -> None:
    raise AssertionError("the command took the bad value and started its work")
