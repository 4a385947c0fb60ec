import dataclasses
import typing

import pytest

from kvtier.config import ConfigError, KvtierConfig, parse_bytes
from kvtier.config_types import REMOTE_SCHEMES, Accepts
from kvtier.errors import UsageError
from kvtier.manager import ONLINE_POLICIES

SIZE = 'a byte size (an integer, or like "4GiB", "512MB")'
URL = "a URL starting with redis://, rediss://, redis+cluster://, rediss+cluster://, unix:// (empty: no remote tier)"


def test_defaults_validate():
    cfg = KvtierConfig()
    assert cfg.block_size == 16 and cfg.transfer_impl == "auto"


def test_yaml_then_env_then_overrides(tmp_path):
    path = tmp_path / "kvtier.yaml"
    path.write_text("block_size: 32\nhost_capacity_bytes: 2GiB\npolicy: lru\nwrite_through: true\ncache_salt: 1234\n")
    env = {"KVTIER_POLICY": "arc", "KVTIER_SM_BUDGET": "8", "KVTIER_DISK_FSYNC": "yes", "OTHER": "x"}
    cfg = KvtierConfig.load(path, env=env, chunk_blocks=4)
    assert cfg.block_size == 32 and cfg.host_capacity_bytes == 2 * 2**30 and cfg.cache_salt == "1234"
    assert cfg.policy == "arc" and cfg.sm_budget == 8 and cfg.chunk_blocks == 4 and cfg.write_through is True
    assert cfg.disk_fsync is True


@pytest.mark.parametrize("variable, value, line", [
    ("KVTIER_HOST_CAPACITY_BYTES", "4XB", f"KVTIER_HOST_CAPACITY_BYTES: host_capacity_bytes expects {SIZE}, got '4XB'"),
    ("KVTIER_DISK_CAPACITY_BYTES", "-1", f"KVTIER_DISK_CAPACITY_BYTES: disk_capacity_bytes expects {SIZE}, got '-1'"),
    ("KVTIER_POLICY", "belady", f"KVTIER_POLICY: policy expects one of {', '.join(ONLINE_POLICIES)}, got 'belady'"),
    ("KVTIER_REMOTE_URL", "http://127.0.0.1:6379", f"KVTIER_REMOTE_URL: remote_url expects {URL}, got "
                                                  "'http://127.0.0.1:6379'"),
    ("KVTIER_REMOTE_PART_BYTES", "0", "KVTIER_REMOTE_PART_BYTES: remote_part_bytes expects a positive byte size "
                                      "(an integer, or like \"4GiB\", \"512MB\"), got '0'"),
    ("KVTIER_BLOCK_SIZE", "many", "KVTIER_BLOCK_SIZE: block_size expects a positive integer, got 'many'"),
    ("KVTIER_WRITE_THROUGH", "maybe", "KVTIER_WRITE_THROUGH: write_through expects true or false (or 1/0, yes/no, "
                                      "on/off), got 'maybe'"),
    ("KVTIER_PIN_BUDGET_FRAC", "1.5", "KVTIER_PIN_BUDGET_FRAC: pin_budget_frac expects a number within [0, 1], "
                                      "got '1.5'"),
    ("KVTIER_HOST_CAPACITY", "1GiB", "KVTIER_HOST_CAPACITY: unknown configuration key 'host_capacity' "
                                     "(did you mean 'host_capacity_bytes'?)"),
])
def test_a_bad_variable_is_one_line_naming_it_and_what_the_key_accepts(variable, value, line):
    with pytest.raises(ConfigError) as caught:
        KvtierConfig.load(env={variable: value})
    assert str(caught.value) == line


@pytest.mark.parametrize("yaml_text, line", [
    ("host_capacity_bytes: 4XB\n", f"host_capacity_bytes expects {SIZE}, got '4XB'"),
    ("disk_capacity_bytes: -5\n", f"disk_capacity_bytes expects {SIZE}, got -5"),
    ("policy: nope\n", f"policy expects one of {', '.join(ONLINE_POLICIES)}, got 'nope'"),
    ("remote_url: notaurl\n", f"remote_url expects {URL}, got 'notaurl'"),
    ("blok_size: 16\n", "unknown configuration key 'blok_size' (did you mean 'block_size'?)"),
])
def test_a_bad_yaml_key_is_one_line_naming_the_file_and_the_key(tmp_path, yaml_text, line):
    path = tmp_path / "kvtier.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        KvtierConfig.load(path, env={})
    assert str(caught.value) == f"{path}: {line}"


@pytest.mark.parametrize("values", [{"blok_size": 16}, {"block_size": "many"}, {"block_size": 0},
                                    {"transfer_impl": "magic"}, {"host_capacity_bytes": "4 parsecs"},
                                    {"write_through": "maybe"}, {"pin_budget_frac": 1.5}, {"block_size": True},
                                    {"block_size": 1.5}, {"model_name": ["x"]}, {"disk_path": None},
                                    {"remote_timeout_s": -0.1}, {"host_capacity_bytes": True}])
def test_bad_values_are_one_line_errors_naming_the_key(values):
    with pytest.raises(ConfigError) as caught:
        KvtierConfig.from_mapping(values)
    (key,) = values
    line = str(caught.value)
    assert line.startswith(("config: unknown configuration key 'blok_size'", f"config: {key} expects "))
    assert "\n" not in line and isinstance(caught.value, UsageError)


def test_direct_construction_and_replace_are_checked_like_loading():
    with pytest.raises(ConfigError, match="^block_size expects a positive integer, got 0$"):
        KvtierConfig(block_size=0)
    with pytest.raises(ConfigError, match="^policy expects one of"):
        dataclasses.replace(KvtierConfig(), policy="nope")


def test_every_field_has_a_kind_that_says_what_it_accepts():
    for field in dataclasses.fields(KvtierConfig):
        kind = typing.get_type_hints(KvtierConfig, include_extras=True)[field.name]
        assert any(isinstance(m, Accepts) for m in typing.get_args(kind)[1:]), field.name


def test_every_scheme_and_online_policy_is_accepted():
    for scheme in REMOTE_SCHEMES:
        assert KvtierConfig.from_mapping({"remote_url": f"{scheme}host:1"}).remote_url == f"{scheme}host:1"
    for policy in ONLINE_POLICIES:
        assert KvtierConfig.load(env={"KVTIER_POLICY": policy}).policy == policy


def test_variables_that_go_together_apply_together_in_any_order():
    for names in (("CERT", "KEY"), ("KEY", "CERT")):
        env = {"KVTIER_REMOTE_URL": "rediss://host:1", **{f"KVTIER_REMOTE_TLS_{n}_FILE": f"/{n}" for n in names}}
        cfg = KvtierConfig.load(env=env)
        assert (cfg.remote_tls_cert_file, cfg.remote_tls_key_file) == ("/CERT", "/KEY")
    with pytest.raises(ConfigError, match="^KVTIER_REMOTE_TLS_CERT_FILE: .*set together$"):
        KvtierConfig.load(env={"KVTIER_REMOTE_TLS_CERT_FILE": "/c"})


def test_unknown_env_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown configuration key 'nonsense'"):
        KvtierConfig.load(env={"KVTIER_NONSENSE": "1"})


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        KvtierConfig.load(path, env={})


def test_parse_bytes():
    assert parse_bytes("4KiB") == 4096 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes(7) == 7
    with pytest.raises(ConfigError):
        parse_bytes("lots")
