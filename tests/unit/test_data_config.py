"""The data section of the config: strict keys, validation naming the dotted key."""

from pathlib import Path

import pytest

from llamapro.config import ConfigError, DataConfig, SourceConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return f


def test_data_section_loads_typed(tmp_path):
    f = _write(tmp_path, """
data:
  seq_len: 128
  sources:
    - {name: dom, paths: [a/*.jsonl], weight: 0.7, eval_fraction: 0.1}
    - {name: ret, paths: [b], weight: 0.3, kind: instruct}
""")
    cfg = load_config(f, ["data.seed=3"])
    assert isinstance(cfg.data, DataConfig) and cfg.data.seq_len == 128 and cfg.data.seed == 3
    assert [type(s) for s in cfg.data.sources] == [SourceConfig, SourceConfig]
    assert cfg.data.source_names() == ["dom", "ret"]
    assert cfg.data.source("ret").kind == "instruct"
    with pytest.raises(ConfigError, match="no data source named 'x'.*dom, ret"):
        cfg.data.source("x")


def test_defaults_need_no_data_section():
    cfg = load_config(None)
    assert cfg.data.sources == [] and cfg.data.seq_len == 1024


def test_shipped_data_demo_config_loads():
    cfg = load_config(ROOT / "jobs" / "configs" / "data_demo.yaml")
    assert cfg.data.source_names() == ["debian-manuals", "python-docs"]
    assert [s.weight for s in cfg.data.sources] == [0.7, 0.3]


def test_unknown_source_key_names_its_index(tmp_path):
    f = _write(tmp_path, "data:\n  sources:\n    - {name: a, paths: [x], colour: red}\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.colour"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"data\.seqlen"):
        load_config(None, ["data.seqlen=5"])


@pytest.mark.parametrize("source, match", [
    ("{paths: [x]}", r"data\.sources\[0\]\.name=''.*required"),
    ("{name: 'a b', paths: [x]}", r"data\.sources\[0\]\.name"),
    ("{name: a}", r"data\.sources\[0\]\.paths"),
    ("{name: a, paths: [x], format: xml}", r"data\.sources\[0\]\.format='xml'"),
    ("{name: a, paths: [x], kind: chat}", r"data\.sources\[0\]\.kind='chat'"),
    ("{name: a, paths: [x], text_unit: page}", r"data\.sources\[0\]\.text_unit"),
    ("{name: a, paths: [x], weight: -1}", r"data\.sources\[0\]\.weight=-1"),
    ("{name: a, paths: [x], eval_fraction: 1.5}", r"data\.sources\[0\]\.eval_fraction"),
    ("{name: a, paths: [x], eval_fraction: 1}", r"data\.sources\[0\]: eval_fraction=1 leaves"),
    ("{name: a, paths: [x], weight: 0}", r"every weight is 0"),
])
def test_source_validation(tmp_path, source, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, f"data:\n  sources:\n    - {source}\n"))


def test_duplicate_names_and_section_validation(tmp_path):
    f = _write(tmp_path, "data:\n  sources:\n    - {name: a, paths: [x]}\n"
                         "    - {name: a, paths: [y]}\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.name='a': used by another"):
        load_config(f)
    for ov, match in [("data.seq_len=4", "data.seq_len"), ("data.mixing=shuffle", "data.mixing"),
                      ("data.max_skip_fraction=2", "data.max_skip_fraction"),
                      ("data.actors=0", "data.actors"), ("data.cpus_per_actor=0", "cpus_per"),
                      ("data.actor_resources={CPU: 1}", r"actor_resources\.CPU: a built-in"),
                      ("data.actor_resources={data: 0}", r"actor_resources\.data=0: must be"),
                      ("data.actor_resources=[data]", "expected a mapping")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [ov])


def test_actor_resources_parse_from_an_override():
    assert load_config(None, ["data.actor_resources={data: 0.5}"]).data.actor_resources == {
        "data": 0.5}


def test_eval_only_source_is_allowed():
    cfg = DataConfig(sources=[SourceConfig(name="a", paths=["x"]),
                              SourceConfig(name="b", paths=["y"], weight=0, eval_fraction=1.0)])
    assert cfg.source("b").weight == 0
