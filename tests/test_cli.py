"""The ``kvtier`` command as a user meets it: every bad input is one line on stderr naming the problem and a
non-zero exit, never a traceback; ``--config`` YAML < ``KVTIER_*`` < flags on every command; the router
says what it is doing and notices a dead worker by itself. Real ``kvtier`` processes throughout."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from kvtier.bench.cli import BENCHMARKS
from kvtier.cli import SUBCOMMANDS, OneLineParser, command_parser, main
from kvtier.command_options import parse_with_config
from kvtier.runner.demo import demo_config
from kvtier.runner.model import ModelConfig
from kvtier.testing.vllm_server import free_port

KVTIER = [str(Path(sys.executable).with_name("kvtier"))]  # the console script pip installed
DEADLINE_S = 120  # only ever reached when something is broken


def kvtier(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")} | (env or {})
    return subprocess.run([*KVTIER, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


@pytest.fixture
def bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text("router:\n  port: [8000\n")
    return path


# --- bad input: one line, no traceback ------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["demo", "--model", "huge"], ["--model", "huge", "tiny, small"]),
    (["demo", "--turns", "0"], ["--turns", "positive"]),
    (["demo", "--new-tokens", "-1"], ["--new-tokens"]),
    (["demo", "--remote", "notaurl"], ["remote_url", "redis://", "notaurl"]),
    (["demo", "--model", "tiny", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["router", "--port", "18080", "--worker", "w1:8000"], ["--worker", "http://host:port", "w1:8000"]),
    (["router", "--port", "99999", "--worker", "http://127.0.0.1:1"], ["--port", "99999"]),
    (["router", "--worker", "http://127.0.0.1:1"], ["--port"]),
    (["router", "--port", "18080", "--worker", "http://127.0.0.1:1", "--events", "nope"], ["--events", "nope"]),
    (["router", "--port", "18080", "--worker", "http://127.0.0.1:1", "--tokenizer", "/no/such/tokenizer.json"],
     ["/no/such/tokenizer.json"]),
    (["sim", "--format", "synthetic", "--capacity-frac", "2"], ["--capacity-frac", "(0, 1]"]),
    (["sim", "--format", "weka", "--trace", "/no/such/trace"], ["/no/such/trace"]),
    (["sim", "--format", "synthetic", "--tiers", "4,x"], ["--tiers"]),
    (["sim", "--format", "synthetic", "--json", "/no/such/dir/out.json"], ["--json", "/no/such/dir"]),
    (["demo", "--json", "/no/such/dir/out.json"], ["--json", "/no/such/dir"]),
    (["frobnicate"], ["unknown command 'frobnicate'", "demo"]),
    (["--frobnicate"], ["--frobnicate"]),
])
def test_bad_arguments_are_one_line(args, expected):
    assert_one_line_error(kvtier(*args), *expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_cuda_is_one_line():
    assert_one_line_error(kvtier("demo", "--device", "cuda"), "--device", "no CUDA device")


def test_a_router_port_in_use_is_one_line(busy_port):
    result = kvtier("router", "--port", str(busy_port), "--worker", "http://127.0.0.1:1")
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{busy_port}", "Address already in use")


@pytest.mark.parametrize("command", ["demo", "sim", "router"])
def test_a_malformed_or_missing_config_file_is_one_line(command, bad_yaml, tmp_path):
    assert_one_line_error(kvtier(command, "--config", str(bad_yaml)), str(bad_yaml), "not valid YAML", "line 3")
    missing = tmp_path / "missing.yaml"
    assert_one_line_error(kvtier(command, "--config", str(missing)), "configuration file not found", str(missing))


@pytest.mark.parametrize("yaml_text, env, expected", [
    ("host_capacity: 1GiB\n", {}, ["unknown configuration key 'host_capacity'", "host_capacity_bytes"]),
    ("", {"KVTIER_HOST_CAPACITY_BYTES": "4XB"}, ["KVTIER_HOST_CAPACITY_BYTES", "byte size", "4GiB", "4XB"]),
    ("demo:\n  turns: many\n", {}, ["demo.turns", "many"]),
    ("demo:\n  tunrs: 3\n", {}, ["demo.tunrs", "no such option", "turns"]),
    ("", {"KVTIER_DEMO_TURNS": "0"}, ["KVTIER_DEMO_TURNS", "positive"]),
    ("router: [1, 2]\n", {}, ["'router' must be a mapping"]),
])
def test_bad_configured_values_are_one_line(tmp_path, yaml_text, env, expected):
    path = tmp_path / "kvtier.yaml"
    path.write_text(yaml_text)
    command = "router" if yaml_text.startswith("router") else "demo"
    args = ["--port", "1", "--worker", "http://127.0.0.1:1"] if command == "router" else ["--model", "tiny"]
    assert_one_line_error(kvtier(command, "--config", str(path), *args, env=env), *expected)


@pytest.mark.parametrize("args, env, expected", [
    (["demo", "--turns", "1"], {"KVTIER_HOST_CAPACITY_BYTES": "1KiB"}, ["host_capacity_bytes=1024", "smallest G2"]),
    (["demo", "--turns", "1"], {"KVTIER_HOST_CAPACITY_BYTES": "0"}, ["host_capacity_bytes=0", "smallest G2"]),
    (["demo", "--turns", "1"], {"KVTIER_DISK_PATH": "/proc/nope"}, ["disk_path='/proc/nope'", "cannot be created"]),
    (["sim", "--format", "weka", "--trace", "{readme}"], {}, ["README.md", "not a Weka trace", ".tar.xz"]),
    (["sim", "--format", "weka", "--trace", "{fake}"], {}, ["fake.tar.xz", "not a Weka trace"]),
    (["bench", "router", "--workers", "0"], {}, ["--workers", "positive integer"]),
    (["bench", "router", "--workers", "-1"], {}, ["--workers", "positive integer"]),
])
def test_what_ended_in_a_traceback_is_one_line_and_exit_2(args, env, expected, tmp_path):
    fake = tmp_path / "fake.tar.xz"
    fake.write_bytes(b"not an archive")
    readme = Path(__file__).resolve().parents[1] / "README.md"
    result = kvtier(*[a.replace("{fake}", str(fake)).replace("{readme}", str(readme)) for a in args], env=env)
    assert result.returncode == 2, result
    assert_one_line_error(result, *expected)


@pytest.mark.parametrize("command, args", [("sim", ["--format", "synthetic"]), ("demo", ["--model", "tiny"]),
                                           ("router", ["--port", "1", "--worker", "http://127.0.0.1:1"])])
def test_a_typo_in_any_section_is_caught_by_whichever_command_loads_the_file(command, args, tmp_path):
    """Each section of the file is checked against its own command's options, and its top level against the engine's
    keys, whichever command reads it: the first use of a file finds its typos, not the day another command runs."""
    typo = tmp_path / "kvtier.yaml"
    other = "sim" if command == "router" else "router"
    typo.write_text({"router": "router:\n  prot: 8000\n", "sim": "sim:\n  polcy: lru\n"}[other])
    result = kvtier(command, "--config", str(typo), *args)
    assert result.returncode == 2, result
    assert_one_line_error(result, f"{other}.{'prot' if other == 'router' else 'polcy'}", "no such option")
    typo.write_text("host_capacity_byte: 1GiB\n")
    assert_one_line_error(kvtier(command, "--config", str(typo), *args), "did you mean 'host_capacity_bytes'")


# --- what the command says about itself -------------------------------------------------------------------------
def test_version_and_help_describe_kvtier():
    result = kvtier("--version")
    assert result.returncode == 0 and result.stdout.startswith("kvtier ") and result.stdout.split()[1][0].isdigit()
    help_text = kvtier("--help").stdout
    assert help_text.splitlines()[2].startswith("kvtier keeps the KV cache")
    assert all(name in help_text for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = command_parser(name)
    for action in parser._actions:
        assert action.help, f"kvtier {name} {action.option_strings} has no help"
    help_text = " ".join(parser.format_help().split())
    defaults = {"demo": "(default: small)", "sim": "(default: agent)", "router": "(default: 127.0.0.1)",
                "bench": "kvtier bench NAME --help"}
    assert defaults[name] in help_text


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_option_has_help_and_the_common_options(name):
    parser = OneLineParser(prog=f"kvtier bench {name}")
    importlib.import_module(BENCHMARKS[name][0]).add_arguments(parser)
    for action in parser._actions:
        assert action.help, f"kvtier bench {name} {action.option_strings} has no help"
    assert {"--quick", "--json", "--plot"} <= set(parser._option_string_actions)


# --- --config < KVTIER_* < flags ------------------------------------------------------------------------------------
def test_router_options_come_from_yaml_then_environment_then_flags(tmp_path):
    path = tmp_path / "kvtier.yaml"
    path.write_text("router:\n  port: 8000\n  worker: [http://a:1, http://b:2]\n  max-inflight: 8\n"
                    "  log_level: warning\n")

    def parse(argv: list[str], env: dict[str, str]):
        return parse_with_config(command_parser("router"), "router", argv, str(path), env)

    args = parse(["--approx-ttl", "7"], {"KVTIER_ROUTER_MAX_INFLIGHT": "16", "KVTIER_ROUTER_APPROX_TTL": "5"})
    assert args.port == 8000 and args.worker == ["http://a:1", "http://b:2"] and args.log_level == "WARNING"
    assert args.max_inflight == 16 and args.approx_ttl == 7.0
    two = {"KVTIER_ROUTER_WORKER": "http://c:3 http://d:4"}
    assert parse([], two).worker == ["http://c:3", "http://d:4"]
    assert parse(["--worker", "http://e:5"], two).worker == ["http://e:5"]  # replaced, not extended


def test_the_demo_honours_yaml_environment_and_flags(tmp_path, monkeypatch):
    path = tmp_path / "kvtier.yaml"
    path.write_text("policy: lru\nremote_url: redis://yaml:1\nlower_tier_deadline_ms: 5\nrouter:\n  port: 1\n")
    for name in [k for k in os.environ if k.startswith("KVTIER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KVTIER_LOWER_TIER_DEADLINE_MS", "900")
    tiny = ModelConfig.preset("tiny")
    config = demo_config(tiny, str(tmp_path), str(path))
    assert config.policy == "lru" and config.remote_url == "redis://yaml:1" and config.lower_tier_deadline_ms == 900
    assert config.disk_path == str(tmp_path) and config.host_capacity_bytes < 2**30  # the demo's own sizes
    assert demo_config(tiny, str(tmp_path), str(path), remote_url="redis://flag:2").remote_url == "redis://flag:2"


# --- the demo says when G4 is unreachable, and reaches G4 when it is there -------------------------------------------
def test_the_demo_warns_once_when_g4_is_unreachable(tmp_path):
    port = free_port()  # nothing listens there
    result = kvtier("demo", "--model", "tiny", "--turns", "2", "--remote", f"redis://127.0.0.1:{port}",
                    "--json", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "unreachable" in line]
    assert warnings and warnings[0].startswith(f"kvtier demo: warning: G4 redis://127.0.0.1:{port} is unreachable")
    assert "UNREACHABLE" in result.stdout
    assert json.loads((tmp_path / "out.json").read_text())["tiers"]["G4_unreachable"]


def test_the_demo_session_reaches_g4_when_a_remote_is_given(redis_server, tmp_path):
    out = tmp_path / "out.json"
    # a generous deadline for G4 reads: on a busy machine a late read would be recomputed, not wrong
    result = kvtier("demo", "--model", "tiny", "--remote", redis_server.url, "--json", str(out),
                    env={"KVTIER_LOWER_TIER_DEADLINE_MS": "60000"})
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["identical"] and data["hit_tokens"]["G4"] > 0 and data["hit_tokens"]["G3"] > 0
    assert redis_server.client().dbsize() > 0


# --- the router: a start-up line, and a dead worker noticed without any request ---------------------------------
def test_the_router_says_what_it_does_and_notices_a_dead_worker(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: dead from the start, though never asked
    port = free_port()
    proc = subprocess.Popen([*KVTIER, "router", "--port", str(port), "--worker", dead, "--health-interval", "0.2"],
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert f"kvtier router on http://127.0.0.1:{port}" in first and dead in first
        assert "no KV events" in first and "approximate block keys" in first
        deadline = time.monotonic() + DEADLINE_S
        alive = True
        while alive and time.monotonic() < deadline:
            try:
                alive = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["workers"][0]["alive"]
            except requests.ConnectionError:
                pass  # not listening yet
            time.sleep(0.1)
        assert not alive
        proc.terminate()
        rest = proc.communicate(timeout=DEADLINE_S)[1]
        warning = [line for line in rest.splitlines() if "unreachable" in line]
        assert warning and "cannot connect to 127.0.0.1" in warning[0] and "Error(" not in warning[0]
        assert "Traceback" not in rest
    finally:
        proc.kill()
        proc.wait()


def test_main_exit_code_for_an_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
