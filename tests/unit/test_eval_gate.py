"""Evaluation numbers, the regression gate and `llamapro eval`'s exit codes on constructed runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llamapro.config import ConfigError, load_config
from llamapro.config.eval import EvalConfig, GateConfig, LmEvalConfig
from llamapro.errors import EXIT_GATE_FAILED
from llamapro.eval import (
    EvalError,
    LmEvalUnavailable,
    check_gate,
    evaluate_checkpoint,
    heldout_loss,
    lm_eval_available,
    load_prompts,
    prefix_agreement,
    require_lm_eval,
    resolve_base,
)
from eval_support import counting_blocks, eval_cli as _cli, greedy_blocks, make_run

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "jobs" / "data" / "regression_prompts.jsonl"


def _set(base_ppl, trained_ppl, role="other"):
    lb, lt = math.log(base_ppl), math.log(trained_ppl)
    return {"role": role, "blocks": 4, "tokens": 100, "base": {"loss": lb, "ppl": base_ppl},
            "trained": {"loss": lt, "ppl": trained_ppl}, "loss_change": lt - lb,
            "ppl_change": trained_ppl / base_ppl - 1}


# --- the gate on constructed numbers (no model) ---------------------------------------------------

GATE = GateConfig(retention_sets=["python-docs"], domain_sets=["debian"],
                  max_retention_ppl_increase=0.01, min_domain_ppl_decrease=0.05)


def test_gate_passes_within_thresholds():
    sets = {"python-docs": _set(12.0, 12.1), "debian": _set(20.0, 15.0)}  # +0.83%, -25%
    g = check_gate(sets, None, GATE)
    assert g["passed"] and [c["passed"] for c in g["checks"]] == [True, True]
    assert g["summary"].startswith("Regression gate passed")


def test_gate_fails_on_retention_with_a_plain_sentence():
    sets = {"python-docs": _set(12.0, 12.3), "debian": _set(20.0, 15.0)}  # +2.5%
    g = check_gate(sets, None, GATE)
    assert not g["passed"]
    assert g["summary"] == ("Regression gate FAILED: retention set python-docs: perplexity 12 -> 12.3 "
                            "(+2.50%), more than the allowed rise of 1.00%.")


def test_gate_fails_when_the_domain_did_not_improve_enough():
    sets = {"python-docs": _set(12.0, 12.0), "debian": _set(20.0, 19.5)}  # -2.5% < 5%
    g = check_gate(sets, None, GATE)
    assert not g["passed"] and "short of the required fall of at least 5.00%" in g["summary"]


def test_gate_greedy_thresholds_and_missing_inputs():
    sets = {"python-docs": _set(12.0, 12.0), "debian": _set(20.0, 10.0)}
    greedy = {"prompts": 10, "exact_match": 0.6, "prefix_agreement": 0.8}
    gate = GateConfig(retention_sets=["python-docs"], min_greedy_exact_match=0.7)
    g = check_gate(sets, greedy, gate)
    assert not g["passed"] and "exact-match rate 60.0%, below the required 70.0%" in g["summary"]
    assert check_gate(sets, greedy, GateConfig(min_greedy_prefix_agreement=0.8))["passed"]
    with pytest.raises(EvalError, match="no regression prompts"):
        check_gate(sets, None, gate)
    with pytest.raises(EvalError, match=r"\['nope'\]"):
        check_gate(sets, None, GateConfig(retention_sets=["nope"]))
    off = check_gate(sets, None, GateConfig(enabled=False, retention_sets=["nope"]))
    assert off["passed"] and not off["enabled"]


def test_prefix_agreement():
    assert prefix_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9]) == 0.5
    assert prefix_agreement([], []) == 1.0 and prefix_agreement([5], []) == 0.0


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.gate\.max_retention_ppl_increase"):
        GateConfig(max_retention_ppl_increase=-0.1)
    with pytest.raises(ConfigError, match=r"eval\.gate\.domain_sets"):
        GateConfig(retention_sets=["a"], domain_sets=["a"])
    with pytest.raises(ConfigError, match=r"eval\.gate"):
        EvalConfig(sets=["a"], gate=GateConfig(retention_sets=["b"]))
    with pytest.raises(ConfigError, match=r"eval\.lm_eval\.tasks"):
        LmEvalConfig(enabled=True)
    p = tmp_path / "c.yaml"
    p.write_text("eval:\n  gate:\n    max_retention_ppl_increse: 0.01\n")
    with pytest.raises(ConfigError, match=r"eval\.gate\.max_retention_ppl_increse"):
        load_config(p, [])


def test_shipped_eval_config_and_prompts_load():
    cfg = load_config(REPO / "jobs" / "configs" / "eval_demo.yaml", [])
    assert cfg.eval.gate.retention_sets and cfg.eval.gate.domain_sets
    assert set(cfg.eval.set_names()) <= set(cfg.data.source_names())
    first = (REPO / "jobs" / "configs" / "eval_demo.yaml").read_text().splitlines()[:6]
    assert any("llamapro eval --config jobs/configs/eval_demo.yaml" in line for line in first)
    prompts = load_prompts(PROMPTS)
    assert 10 <= len(prompts) <= 20
    assert all(p["source"] and p["reference"] for p in prompts)


def test_bad_prompt_file_names_the_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(EvalError, match=r"p\.jsonl:2"):
        load_prompts(p)
    p.write_text('{"text": "no prompt"}\n')
    with pytest.raises(EvalError, match="non-empty \"prompt\""):
        load_prompts(p)


def test_lm_eval_hook_reports_clearly_when_missing(tmp_path):
    """Runs on every machine: where lm_eval is installed, a child process in which it cannot be
    imported (``sys.modules['lm_eval'] = None``, as on a machine without it) gets the clear error."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['lm_eval'] = None  # Python's own marker: importing it fails, find_spec is None\n"
        "from llamapro.eval.harness import lm_eval_available, require_lm_eval\n"
        "from llamapro.errors import LmEvalUnavailable\n"
        "assert not lm_eval_available()\n"
        "try:\n"
        "    require_lm_eval()\n"
        "except LmEvalUnavailable as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    if not lm_eval_available():  # the real absence, in this process too
        with pytest.raises(LmEvalUnavailable, match="pip install lm-eval"):
            require_lm_eval()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pip install lm-eval" in r.stdout and "eval.lm_eval.enabled=false" in r.stdout


# --- real evaluation on tiny models ---------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    same = make_run(root, "same", perturb=0.0, chat=True)
    bad = make_run(root, "bad", perturb=0.3)
    # retention = text the base itself would write; domain = plain counting sequences
    np.savez(root / "retention.npz", **greedy_blocks(root / "exp", skip=[2, 5]))
    dom = counting_blocks()
    with open(root / "domain.jsonl", "w") as f:
        for ids, labels in zip(dom["input_ids"], dom["labels"]):
            f.write(json.dumps({"input_ids": ids.tolist(), "labels": labels.tolist()}) + "\n")
    return root, same, bad


def test_heldout_loss_is_masked_next_token_ce(runs):
    from llamapro.loading import load_model

    _, same, _ = runs
    model = load_model(same / "model", dtype="float32")
    b = counting_blocks(3, seed=5)
    got = heldout_loss(model, b, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(b["input_ids"])).logits[:, :-1]
    y = torch.as_tensor(b["labels"])[:, 1:]
    m = y != -100
    ce = torch.nn.functional.cross_entropy(logits[m], y[m])
    assert got["tokens"] == int(m.sum()) and abs(got["loss"] - ce.item()) < 1e-5
    assert abs(got["ppl"] - math.exp(ce.item())) < 1e-3


def test_untrained_blocks_evaluate_exactly_as_the_base(runs, tmp_path):
    root, same, _ = runs
    cfg = EvalConfig(max_new_tokens=4, gate=GateConfig(retention_sets=["retention"]))
    held = {"retention": dict(np.load(root / "retention.npz")), "domain": counting_blocks()}
    r = evaluate_checkpoint(same / "model", held, load_prompts(PROMPTS, 2), cfg, out_dir=tmp_path)
    assert r["base"]["mode"] == "skip" and r["base"]["exact"]
    for s in r["sets"].values():
        assert s["ppl_change"] == 0.0 and s["base"]["loss"] == s["trained"]["loss"]
    g = r["greedy"]
    assert g["chat_template"] and g["exact_match"] == 1.0 and g["prefix_agreement"] == 1.0
    assert g["items"][0]["source"] and g["items"][0]["base"] == g["items"][0]["trained"]
    assert r["rollback"]["equals_base"]
    assert r["gate"]["passed"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["sets"] == r["sets"] and on_disk["greedy"]["items"][1]["prompt"]


def test_base_resolution(runs, tmp_path):
    _, same, _ = runs
    meta = json.loads((same / "model" / "llamapro.json").read_text())
    assert resolve_base(same / "model", meta, EvalConfig())["mode"] == "skip"
    trained = dict(meta, training=dict(meta["training"], originals_frozen=False))
    r = resolve_base(same / "model", trained, EvalConfig())
    assert r["mode"] == "path" and r["path"] == meta["base"]["path"]
    gone = dict(trained, base=dict(meta["base"], path=str(tmp_path / "gone")))
    r = resolve_base(same / "model", gone, EvalConfig())
    assert r["mode"] == "skip" and not r["exact"] and "NOT exactly" in r["why"]
    baseline = {"new_layer_indices": [], "training": {"trained_from": str(tmp_path / "gone")}}
    with pytest.raises(EvalError, match="--base"):
        resolve_base(same / "model", baseline, EvalConfig())
    with pytest.raises(EvalError, match="not a directory"):
        resolve_base(same / "model", meta, EvalConfig(base=str(tmp_path / "gone")))


def _eval_argv(root, run, *extra):
    return ["eval", "--run", str(run), "--heldout", f"retention={root / 'retention.npz'}",
            "--heldout", f"domain={root / 'domain.jsonl'}", "--retention", "retention",
            "--domain", "domain", "--prompts", str(PROMPTS), "--no-report", "-q",
            "eval.max_prompts=2", "eval.max_new_tokens=4", "eval.check_rollback=false", *extra]


def test_cli_gate_exit_codes(runs, capsys):
    root, same, bad = runs
    assert _cli(_eval_argv(root, same)) == 0
    out = capsys.readouterr()
    assert "Regression gate passed" in out.out and (same / "eval" / "results.json").is_file()

    # the same model, but the new domain must improve by 5%: it did not move at all
    assert _cli(_eval_argv(root, same, "eval.gate.min_domain_ppl_decrease=0.05")) == EXIT_GATE_FAILED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("Regression gate FAILED: domain set domain:")
    assert "short of the required fall of at least 5.00%" in err

    # perturbed inserted blocks: retention perplexity rises far beyond 1%
    assert _cli(_eval_argv(root, bad)) == EXIT_GATE_FAILED
    err = capsys.readouterr().err
    assert "retention set retention:" in err and "more than the allowed rise of 1.00%" in err
    res = json.loads((bad / "eval" / "results.json").read_text())
    assert not res["gate"]["passed"] and res["sets"]["retention"]["ppl_change"] > 0.01
    # --no-gate: evaluate and report, never 4
    assert _cli(_eval_argv(root, bad, "--no-gate")) == 0
    capsys.readouterr()


def test_cli_eval_writes_the_report_after_the_results(runs, capsys):
    """The report is drawn one layer above eval (llamapro.report.evaluate_and_report): `llamapro
    eval` without --no-report writes it beside the results and records its path in them."""
    root, same, _ = runs
    assert _cli([a for a in _eval_argv(root, same) if a != "--no-report"]) == 0
    page = same / "report" / "report.html"
    assert page.is_file() and 'src="perplexity.png"' in page.read_text()
    assert json.loads((same / "eval" / "results.json").read_text())["report"] == str(page)
    assert f"report      {page}" in capsys.readouterr().out


def test_cli_bad_input_exit_2(runs, capsys):
    root, same, _ = runs
    assert _cli(_eval_argv(root, same, "--retention", "nosuch")) == 2
    assert "nosuch" in capsys.readouterr().err
    assert _cli(["eval", "--run", str(root / "missing"), "-q"]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    if not lm_eval_available():
        argv = _eval_argv(root, same, "eval.lm_eval.enabled=true", "eval.lm_eval.tasks=arc_easy")
        assert _cli(argv) == 2
        assert "lm-evaluation-harness is not installed" in capsys.readouterr().err


def test_job_entrypoints_report_bad_input(tmp_path, capsys):
    import runpy

    for job in ("eval", "export"):
        main = runpy.run_path(str(REPO / "jobs" / f"{job}.py"))["main"]
        code = main(["--config", str(REPO / "jobs" / "configs" / "eval_demo.yaml"),
                     f"run.output_dir={tmp_path}", "eval.report=false"])
        assert code == 2 and "neither a run directory" in capsys.readouterr().err
        doc = (REPO / "jobs" / f"{job}.py").read_text()
        assert (f"ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\\n"
                f"        python jobs/{job}.py --config") in doc
        assert len(doc.splitlines()) < 60


# --- the knowledge battery in the gate -----------------------------------------------------------

def _battery(base_right: int, flipped: int, n: int = 400) -> dict:
    """A constructed battery result: the base answers ``base_right`` of ``n`` questions right, the
    trained model loses ``flipped`` of those (and gains none)."""
    from llamapro.eval.battery import compare_battery, wilson

    def res(items):
        k = items.count("1")
        return {"n": n, **{m: k / n for m in ("acc", "acc_norm")},
                **{m + "_ci": list(wilson(k, n)) for m in ("acc", "acc_norm")},
                **{m + "_items": items for m in ("acc", "acc_norm")}}

    base = "1" * base_right + "0" * (n - base_right)
    trained = "0" * flipped + base[flipped:]
    return {"tasks": compare_battery({"piqa": res(base)}, {"piqa": res(trained)}), "limit": n}


def test_gate_fails_on_a_real_accuracy_drop():
    gate = GateConfig(max_accuracy_drop=0.02)
    g = check_gate({}, None, gate, _battery(250, 40))  # 62.5% -> 52.5%: 10 points, CI below 0
    assert not g["passed"]
    (c,) = g["checks"]
    assert c["check"] == "max_accuracy_drop" and c["value"] == pytest.approx(0.1) and c["ci"][1] < 0
    assert "knowledge battery piqa acc 0.625 -> 0.525" in g["summary"] and "a real drop" in g["summary"]


def test_gate_passes_a_drop_inside_the_noise_or_the_allowance():
    gate = GateConfig(max_accuracy_drop=0.02)
    noisy = _battery(250, 40)  # the same 10-point drop, but a few wins offset it: the CI holds 0
    e = noisy["tasks"]["piqa"]["acc"]
    # rebuild with gains on other questions: 40 lost, 30 gained -> -2.5 points net (beyond the
    # allowed 2), but the paired interval holds 0
    from llamapro.eval.battery import paired_change
    base = "1" * 250 + "0" * 150
    trained = "0" * 40 + "1" * 210 + "1" * 30 + "0" * 120
    e.update(paired_change(base, trained))
    assert e["noise"] and e["change"] == pytest.approx(-0.025)
    big_noisy = _battery(6, 3, n=12)  # 25 points lost on 12 questions: inside the noise
    assert big_noisy["tasks"]["piqa"]["acc"]["noise"]
    for bat in (noisy, big_noisy, _battery(250, 4)):  # the last: 1 point, within the allowance
        g = check_gate({}, None, gate, bat)
        assert g["passed"], g["summary"]
    assert "inside the noise" in check_gate({}, None, gate, big_noisy)["checks"][0]["sentence"]
    with pytest.raises(EvalError, match="knowledge battery was not run"):
        check_gate({}, None, gate, None)


def test_battery_gate_config_is_checked():
    with pytest.raises(ConfigError, match="max_accuracy_drop"):
        GateConfig(max_accuracy_drop=2.0)
    with pytest.raises(ConfigError, match="eval.battery.enabled"):
        EvalConfig(gate=GateConfig(max_accuracy_drop=0.02))
    with pytest.raises(ConfigError, match="replayed_sets"):
        GateConfig(retention_sets=["a"], replayed_sets=["b"])
