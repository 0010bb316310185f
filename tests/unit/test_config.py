import pytest

from llamapro.config import Config, ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  name: x\nexpand:\n  blocks: 4\n")
    cfg = load_config(f, ["expand.strategy=top", "expand.positions=1,3", "run.seed=7"])
    assert isinstance(cfg, Config)
    assert cfg.run.name == "x" and cfg.run.seed == 7
    assert cfg.expand.blocks == 4 and cfg.expand.strategy == "top" and cfg.expand.positions == [1, 3]


def test_unknown_key_names_the_dotted_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("expand:\n  blokcs: 4\n")
    with pytest.raises(ConfigError, match=r"expand\.blokcs.*Valid keys in expand: blocks"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown config key.*nosuch"):
        load_config(None, ["nosuch.x=1"])


def test_type_and_value_errors():
    with pytest.raises(ConfigError, match="expand.blocks: expected an integer"):
        load_config(None, ["expand.blocks=many"])
    with pytest.raises(ConfigError, match="expand.strategy"):
        load_config(None, ["expand.strategy=sideways"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/c.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["justakey"])


def test_malformed_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("expand: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_shipped_configs_load():
    from pathlib import Path

    for f in sorted(Path(__file__).resolve().parents[2].glob("jobs/configs/*.yaml")):
        load_config(f)  # every shipped config is valid as written
