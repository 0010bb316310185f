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


def test_baselines_of_a_staged_config_keep_the_budget_and_drop_what_is_llamapro_only():
    """run.baselines=[full,lora] on the shipped demo (3 stages, stage ratios, top LR scale): each
    baseline trains one stage at the same steps, LR and batch instead of being refused."""
    from llamapro.config.train import baseline_of

    tc = load_config("jobs/configs/demo.yaml", ["train.num_stages=3", "train.stage_ratios=[0.3]",
                                                "train.top_lr_scale=2.0"]).train
    assert tc.num_stages == 3 and tc.stage_ratios
    for mode in ("full", "lora", "freeze_last_n"):
        b = baseline_of(tc, mode)
        assert b.mode == mode and b.num_stages == 1 and not b.stage_ratios and not b.lora_new_blocks
        assert (b.max_steps, b.max_tokens, b.lr, b.micro_batch_size, b.num_workers) == \
            (tc.max_steps, tc.max_tokens, tc.lr, tc.micro_batch_size, tc.num_workers)
    assert baseline_of(tc, "llamapro") is tc


def test_each_baseline_trains_at_its_own_lr():
    from llamapro.pipeline import train_config_for

    cfg = load_config("jobs/configs/demo.yaml")
    assert cfg.run.baseline_lrs == {"full": 1e-4, "lora": 3e-3, "freeze_last_n": 1e-3}
    assert train_config_for(cfg) is cfg.train and cfg.train.lr == 1e-3
    for mode, lr in cfg.run.baseline_lrs.items():
        tc = train_config_for(cfg, mode)
        assert (tc.mode, tc.lr, tc.num_stages, tc.max_steps) == (mode, lr, 1, cfg.train.max_steps)
    # a baseline not named trains at train.lr
    cfg = load_config("jobs/configs/demo.yaml", ["run.baseline_lrs={lora: 3.0e-3}"])
    assert train_config_for(cfg, "full").lr == cfg.train.lr
    for bad, match in (("{ful: 1.0e-4}", "'ful' is not a baseline"), ("{full: 2}", "not a learning rate"),
                       ("{full: yes}", "not a learning rate"), ("[1.0e-4]", "baseline_lrs")):
        with pytest.raises(ConfigError, match=match):
            load_config("jobs/configs/demo.yaml", [f"run.baseline_lrs={bad}"])


def test_a_named_list_entry_is_set_by_its_name_and_a_wrong_name_is_named(tmp_path):
    """``data.sources.<name>.<key>=V`` (CLI overrides, tune.space keys): the entry by its name or
    index; an unknown name lists the names there are; a bare entry or list cannot be set."""
    from llamapro.config.tune import check_space_path

    cfg = load_config("jobs/configs/demo.yaml", ["data.sources.python-docs.weight=0.1",
                                                 "data.sources.0.eval_fraction=0.1"])
    assert [(s.name, s.weight) for s in cfg.data.sources] == [
        ("debian-manuals", 0.5), ("python-docs", 0.1), ("perl-docs", 0.0)]
    assert cfg.data.sources[0].eval_fraction == 0.1
    with pytest.raises(ConfigError, match="no entry named 'pyhton-docs'.*python-docs, perl-docs"):
        load_config("jobs/configs/demo.yaml", ["data.sources.pyhton-docs.weight=0.1"])
    with pytest.raises(ConfigError, match="set one key of one entry"):
        load_config("jobs/configs/demo.yaml", ["data.sources.python-docs=0.1"])
    check_space_path("data.sources.python-docs.weight", Config)
    with pytest.raises(ConfigError, match="name an entry of data.sources and one of its keys"):
        check_space_path("data.sources.python-docs", Config)
    with pytest.raises(ConfigError, match="no config key 'data.sources.x.wieght'"):
        check_space_path("data.sources.x.wieght", Config)
