import pytest

from kvtier.config import ConfigError, KvtierConfig, parse_bytes


def test_defaults_validate():
    cfg = KvtierConfig()
    assert cfg.block_size == 16 and cfg.transfer_impl == "auto"


def test_yaml_then_env_then_overrides(tmp_path):
    path = tmp_path / "kvtier.yaml"
    path.write_text("block_size: 32\nhost_capacity_bytes: 2GiB\npolicy: lru\nwrite_through: true\n")
    env = {"KVTIER_POLICY": "arc", "KVTIER_SM_BUDGET": "8", "OTHER": "x"}
    cfg = KvtierConfig.load(path, env=env, chunk_blocks=4)
    assert cfg.block_size == 32 and cfg.host_capacity_bytes == 2 * 2**30
    assert cfg.policy == "arc" and cfg.sm_budget == 8 and cfg.chunk_blocks == 4 and cfg.write_through is True


@pytest.mark.parametrize("values", [{"blok_size": 16}, {"block_size": "many"}, {"block_size": 0},
                                    {"transfer_impl": "magic"}, {"host_capacity_bytes": "4 parsecs"},
                                    {"write_through": "maybe"}, {"pin_budget_frac": 1.5},
                                    {"block_size": 1.5}, {"model_name": ["x"]}])
def test_bad_values_are_clear_errors(values):
    with pytest.raises(ConfigError):
        KvtierConfig.from_mapping(values)


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


def test_a_remote_url_of_another_scheme_and_a_bad_byte_size_are_refused_naming_what_is_accepted():
    with pytest.raises(ConfigError, match=r"remote_url must start with one of .*redis://"):
        KvtierConfig.from_mapping({"remote_url": "http://127.0.0.1:6379"})
    with pytest.raises(ConfigError, match=r"host_capacity_bytes expects a byte size .*4GiB.*'4XB'"):
        KvtierConfig.load(env={"KVTIER_HOST_CAPACITY_BYTES": "4XB"})
