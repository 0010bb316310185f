"""`llamapro compare` end to end on tiny runs: each run evaluated through the real eval path
(held-out sets with replayed / not replayed retention, the knowledge battery on a tiny task file,
greedy agreement), the table, the Pareto plot, the verdicts, and resuming without re-evaluating."""

from __future__ import annotations

import json

import numpy as np
import yaml

from llamapro.cli import main
from tests.unit.eval_support import counting_blocks, greedy_blocks, make_run


def test_compare_tiny_runs_table_plot_verdicts_and_resume(tmp_path, capsys):
    root = tmp_path
    runs = {"llamapro": make_run(root, "lp", perturb=0.05, seed=1),
            "full": make_run(root, "full", perturb=0.6, seed=2)}
    meta_p = runs["full"] / "model" / "llamapro.json"
    meta = json.loads(meta_p.read_text())
    meta["training"]["mode"] = "full"  # labelled as a full fine-tune: the verdict's reference
    meta["training"]["config"] = {"lr": 1e-4}
    meta_p.write_text(json.dumps(meta))
    arrays = {"domain": counting_blocks(), "replayed": greedy_blocks(root / "exp", skip=[2, 5]),
              "kept": greedy_blocks(root / "exp", seed=7, skip=[2, 5])}
    held = {}
    for name, blocks in arrays.items():
        held[name] = str(root / f"{name}.npz")
        np.savez(held[name], **blocks)
    data = root / "battery" / "PIQA"
    data.mkdir(parents=True)
    data.joinpath("validation.jsonl").write_text("\n".join(json.dumps(
        {"question": f"q{i}", "options": f"A. a{i}\nB. bb{i}", "answer": f"A. a{i}"}) for i in range(8)))
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"base": str(root / "base")},
        "data": {"seq_len": 24, "sources": [
            {"name": "domain", "paths": [held["domain"]], "weight": 0.7},
            {"name": "replayed", "paths": [held["replayed"]], "weight": 0.3},
            {"name": "kept", "paths": [held["kept"]], "weight": 0.0}]},
        "eval": {"prompts": "", "check_rollback": False, "max_blocks": 4,
                 "battery": {"enabled": True, "tasks": ["piqa"], "data_dir": str(root / "battery")},
                 "gate": {"domain_sets": ["domain"], "retention_sets": ["replayed", "kept"],
                          "max_retention_ppl_increase": 100.0, "min_domain_ppl_decrease": -0.99,
                          "max_accuracy_drop": 1.0}}}))
    # held-out arrays are given per run through the eval CLI's --heldout; compare evaluates
    # from the config, so first evaluate each run with the arrays, then compare reuses them
    from llamapro.eval.compare import eval_digest
    from llamapro.config import load_config
    from llamapro.eval import run_eval, write_results

    c = load_config(str(cfg), [])
    c.eval.report = False
    for run in runs.values():
        res = run_eval(c, run_dir=str(run), heldout=arrays)
        res["compare_digest"] = eval_digest(c)
        write_results(run / "eval", res)
    out = root / "study"
    argv = ["compare", "--config", str(cfg), "--out", str(out)] + [f"{k}={v}" for k, v in runs.items()]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "evaluated before with the same settings, reused" in text  # resumable
    md = (out / "compare.md").read_text()
    assert "Not-replayed retention sets (forgetting): kept. Replayed (in the training mixture): replayed" in md
    assert "| llamapro | llamapro |" in md and "| full | full | 0.0001 |" in md
    s = json.loads((out / "compare.json").read_text())
    rows = {r["label"]: r for r in s["rows"]}
    assert rows["full"]["not_replayed_rise"] > rows["llamapro"]["not_replayed_rise"]
    assert set(rows["llamapro"]["battery"]) == {"piqa"}
    assert s["verdicts"]["full"].startswith("reference")
    assert s["verdicts"]["llamapro"].split(":")[0] in ("meets the target", "misses the target")
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # a bad run directory is a clear error, exit 2
    assert main(["compare", "--config", str(cfg), "--out", str(out), f"x={root / 'nope'}"]) == 2
    assert "not a trained run directory" in capsys.readouterr().err
