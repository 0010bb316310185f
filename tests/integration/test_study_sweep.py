"""The evidence study end to end at tiny scale (issue 17): `benchmarks/study.py` runs ONE real Ray Tune
experiment over train.mode x train.lr (real Ray Train + DeepSpeed trials of a tiny Llama), a
baseline trial trains the unexpanded base (baseline_of), a llamapro trial its own expansion; each
method's LR is chosen by the same objective among its own grid (a hopeless LR is in two grids and
never wins); then `llamapro compare` on each method's best run writes the table, the plot and the
verdicts; running the same command again retrains nothing and re-evaluates nothing."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import tiny_model
from tests.unit.eval_support import char_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]  # 5 tiny trials + compare
ROOT = Path(__file__).resolve().parents[2]
GOOD, HOPELESS = 3e-3, 1e-9


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    tiny_model("llama", num_layers=4).save_pretrained(d / "base")
    char_tokenizer(d / "base")
    rng = random.Random(0)
    for name, words in (("dom", "apt dpkg mirror sources.list debconf kernel initramfs grub".split()),
                        ("ret", "def class import return lambda yield list dict".split()),
                        ("kept", "my sub foreach chomp print local our bless".split())):
        (d / name).mkdir()
        with open(d / name / "part-0.jsonl", "w") as f:
            for _ in range(120):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(30, 60)))})
                        + "\n")
    bat = d / "battery" / "PIQA"
    bat.mkdir(parents=True)
    bat.joinpath("validation.jsonl").write_text("\n".join(json.dumps(
        {"question": f"apt {i}", "options": f"A. dpkg{i % 3}\nB. lambda{i % 4}", "answer": f"A. dpkg{i % 3}"})
        for i in range(16)))
    cfg = {
        "run": {"name": "study", "output_dir": str(d / "ignored"), "seed": 0},
        "model": {"base": str(d / "base")},
        "expand": {"blocks": 2, "strategy": "even", "verify": True},
        "data": {"seq_len": 32, "actors": 1, "sources": [
            {"name": "dom", "paths": [str(d / "dom")], "weight": 0.7, "eval_fraction": 0.1},
            {"name": "ret", "paths": [str(d / "ret")], "weight": 0.3, "eval_fraction": 0.1},
            {"name": "kept", "paths": [str(d / "kept")], "weight": 0.0, "eval_fraction": 0.1}]},
        "train": {"max_steps": 6, "lr": GOOD, "micro_batch_size": 4, "num_workers": 1, "eval_every": 6,
                  "eval_batches": 1, "checkpoint_every": 6, "zero_stage": 2, "warmup_ratio": 0.0,
                  "num_stages": 2, "dtype": "float32"},
        "eval": {"prompts": "", "check_rollback": False, "max_blocks": 4,
                 "battery": {"enabled": True, "tasks": ["piqa"], "data_dir": str(d / "battery"), "batch_size": 8},
                 "gate": {"domain_sets": ["dom"], "retention_sets": ["ret", "kept"], "replayed_sets": ["ret"],
                          "max_retention_ppl_increase": 100.0, "min_domain_ppl_decrease": -0.99,
                          "max_accuracy_drop": 1.0}},
        "tune": {"name": "sweep", "num_samples": 1, "max_concurrent": 1, "forgetting_penalty": 1.0,
                 "scheduler": {"type": "fifo"},
                 "space": {"train.mode": {"grid": ["llamapro", "full", "lora"]},
                           "train.lr": {"grid": [GOOD, HOPELESS]}},
                 "mode_space": {"full": {"train.lr": {"grid": [HOPELESS, 1e-3]}},
                                "lora": {"train.lr": {"grid": [GOOD]}}}},
    }
    p = d / "study.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = d / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    # --extend 0: the LRs beyond a grid's edge are tests/unit/test_study.py's; here they would add
    # two trials at absurd LRs (this grid's step is 3e6x)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "study.py"), "--config", str(p), "--out", str(out),
           "--extend", "0"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    models = sorted((out / "sweep" / "trials").glob("*/model/model.safetensors"))
    mtimes = {str(m): m.stat().st_mtime_ns for m in models}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return {"dir": d, "out": out, "first": first, "again": again, "mtimes": mtimes}


def _rows(out: Path) -> list[dict]:
    with open(out / "sweep" / "results.csv") as f:
        return list(csv.DictReader(f))


def test_one_experiment_baselines_from_the_base_llamapro_expanded(study):
    out = study["out"]
    rows = _rows(out)
    assert sorted((r["train.mode"], float(r["train.lr"])) for r in rows) == sorted(
        [("llamapro", GOOD), ("llamapro", HOPELESS), ("full", HOPELESS), ("full", 1e-3),
         ("lora", GOOD)])
    assert {r["status"] for r in rows} == {"completed"}
    base_layers = json.loads((study["dir"] / "base" / "config.json").read_text())["num_hidden_layers"]
    for r in rows:
        td = Path(r["trial_dir"])
        layers = json.loads((td / "model" / "config.json").read_text())["num_hidden_layers"]
        meta = json.loads((td / "model" / "llamapro.json").read_text())
        assert meta["training"]["mode"] == r["train.mode"]
        if r["train.mode"] == "llamapro":
            assert (td / "expanded").is_dir() and layers == base_layers + 2
        else:  # trained from the unexpanded base, in one stage, at the same budget
            assert not (td / "expanded").exists() and layers == base_layers
            assert meta["training"]["trained_from"] == str(study["dir"] / "base")
            assert yaml.safe_load((td / "config.yaml").read_text())["train"]["num_stages"] == 1
        assert meta["training"]["tokens"] == 6 * 4 * 32


def test_each_method_at_its_own_best_lr(study):
    out = study["out"]
    rows = _rows(out)
    chosen = json.loads((out / "chosen_lrs.json").read_text())
    assert set(chosen) == {"llamapro", "full", "lora"}
    for mode, b in chosen.items():
        mine = [r for r in rows if r["train.mode"] == mode]
        assert b["trial_id"] == max(mine, key=lambda r: float(r["objective"]))["trial_id"]
    # the hopeless LR learns nothing; the good one learns: the per-method choice is never it
    assert chosen["llamapro"]["train.lr"] == GOOD and chosen["full"]["train.lr"] == 1e-3
    md = (out / "chosen_lrs.md").read_text()
    # every LR tried with its objective, then the chosen one (on the grid's edge, not extended here)
    assert re.search(r"\| full \| 1e-09 \(-?[\d.]+\), 0\.001 \(-?[\d.]+\) \| 0\.001 \(still the edge\) \|", md), md
    assert re.search(r"\| llamapro \| 1e-09 \(-?[\d.]+\), 0\.003 \(-?[\d.]+\) \| 0\.003 \(still the edge\) \|",
                     md), md
    assert re.search(r"\| lora \| 0\.003 \(-?[\d.]+\) \| 0\.003 \|", md), md
    assert "Best per method" in (out / "sweep" / "results.md").read_text()


def test_compare_of_the_best_runs_table_plot_verdicts(study):
    out = study["out"]
    s = json.loads((out / "compare.json").read_text())
    rows = {r["label"]: r for r in s["rows"]}
    assert set(rows) == {"llamapro", "full", "lora"}
    chosen = json.loads((out / "chosen_lrs.json").read_text())
    for mode, r in rows.items():
        assert r["mode"] == mode and r["run"] == chosen[mode]["trial_dir"]
        assert r["not_replayed_sets"] == ["kept"] and r["replayed_sets"] == ["ret"]
        assert r["not_replayed_rise"] is not None and set(r["battery"]) == {"piqa"}
        assert r["domain_gain"] > 0  # each chosen run learned the domain
    assert s["verdicts"]["full"].startswith("reference")
    assert s["verdicts"]["llamapro"].split(":")[0] in ("meets the target", "misses the target")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(out.glob("base-battery-*.json"))) == 1  # the base's answers scored once
    assert "| llamapro | llamapro |" in (out / "compare.md").read_text()


def test_rerun_resumes_without_retraining_or_reevaluating(study):
    again = study["again"]
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("evaluated before with the same settings, reused") == 3
    models = sorted((study["out"] / "sweep" / "trials").glob("*/model/model.safetensors"))
    assert {str(m): m.stat().st_mtime_ns for m in models} == study["mtimes"] and len(models) == 5
