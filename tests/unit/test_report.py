"""The report: Markdown + self-contained HTML whose images exist and are real PNGs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from llamapro.config.eval import EvalConfig, GateConfig
from llamapro.eval import evaluate_checkpoint, load_prompts
from llamapro.report import build_report, plot_stack
from eval_support import counting_blocks, greedy_blocks, make_run

PROMPTS = Path(__file__).resolve().parents[2] / "jobs" / "data" / "regression_prompts.jsonl"


def assert_real_png(p: Path, min_w=400, min_h=250):
    assert p.is_file() and p.stat().st_size > 2000, p
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.format == "PNG" and im.width >= min_w and im.height >= min_h, (p, im.size)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, f"{p} is (nearly) one colour"
        assert len(im.convert("RGB").resize((64, 64)).getcolors(64 * 64)) > 8, f"{p} looks empty"


def images_of(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = make_run(root, "run", perturb=0.3)
    held = {"retention": greedy_blocks(root / "exp", skip=[2, 5]), "domain": counting_blocks()}
    cfg = EvalConfig(max_new_tokens=4, gate=GateConfig(retention_sets=["retention"], domain_sets=["domain"]))
    res = evaluate_checkpoint(run / "model", held, load_prompts(PROMPTS, 3), cfg, out_dir=run / "eval")
    return root, run, res


def test_report_files_and_real_pngs(evaluated):
    _, run, res = evaluated
    page = build_report(run, res)
    out = run / "report"
    assert page == out / "report.html"
    html = page.read_text()
    md = (out / "report.md").read_text()
    imgs = images_of(html)
    assert set(imgs) == {"loss.png", "throughput.png", "perplexity.png", "stack.png", "greedy.png"}
    for name in imgs:
        assert "/" not in name  # relative, beside the page
        assert_real_png(out / name)
    # self-contained: inline CSS, no scripts, nothing fetched from elsewhere
    assert "<style>" in html and "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<link" not in html
    # Markdown shows the same pictures and the real numbers
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == imgs
    r = res["sets"]["retention"]
    assert f"{r['base']['ppl']:.4g}" in md and f"{r['trained']['ppl']:.4g}" in md
    assert f"{r['ppl_change']:+.2%}" in md
    assert "**Regression gate: FAILED.**" in md and "FAIL" in html
    assert "peak memory per training worker | not recorded" in md
    assert "Rollback verified" in md and res["rollback"]["base_fingerprint"] in md
    assert "| 2 | 1 | 0 |" in md and "| 5 | 3 | 1 |" in md  # inserted layer, its source, its stage


def test_report_reads_results_from_disk_and_peak_memory(evaluated, tmp_path):
    _, run, _ = evaluated
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "step", "step": 9, "stage": 1, "loss": 4.0, "tokens": 2000,
                            "tokens_per_s": 50.0, "step_s": 0.5, "peak_rss_bytes": 3 << 30}) + "\n")
        f.write("not json\n")
    page = build_report(run, out_dir=tmp_path / "r")  # results from RUN/eval/results.json
    md = (tmp_path / "r" / "report.md").read_text()
    assert "peak memory per training worker | 3.00 GiB" in md and "Held-out perplexity" in md
    assert "perplexity.png" in images_of(page.read_text())


def test_report_of_a_bare_checkpoint(evaluated, tmp_path):
    root, _, _ = evaluated
    page = build_report(root / "exp", out_dir=tmp_path / "bare")  # expanded, never trained/evaluated
    html = page.read_text()
    assert images_of(html) == ["stack.png"]
    assert_real_png(tmp_path / "bare" / "stack.png")
    md = (tmp_path / "bare" / "report.md").read_text()
    assert "NOT EVALUATED" in md and "No training metrics" in md


def test_stack_diagram_of_a_deep_model(tmp_path):
    new = [i * 5 + 4 for i in range(8)]  # 32 -> 40 layers, LLaMA-Pro-8B's layout
    meta = {"num_layers": 40, "num_original_layers": 32, "new_layer_indices": new,
            "new_layer_sources": {str(i): i - 1 - new.index(i) for i in new}, "strategy": "even",
            "training": {"originals_frozen": True,
                         "stages": [{"index": 0, "layers": new[:4]}, {"index": 1, "layers": new}]}}
    assert plot_stack(meta, tmp_path / "s.png")
    assert_real_png(tmp_path / "s.png", min_h=800)


def test_battery_and_not_replayed_retention_in_results_gate_and_report(evaluated, tmp_path):
    """The battery through the real eval path (trained model and its base via skipped blocks),
    the gate's battery check, the replayed / not replayed names, and the report's table."""
    import json as _json

    from llamapro.config.eval import BatteryConfig

    root, run, _ = evaluated
    data = tmp_path / "battery"
    (data / "PIQA").mkdir(parents=True)
    rows = [{"question": f"item {i}", "options": f"A. x{i}\nB. yy{i}\nC. zzz",
             "answer": "ABC"[i % 3] + ". " + [f"x{i}", f"yy{i}", "zzz"][i % 3]} for i in range(9)]
    (data / "PIQA" / "validation.jsonl").write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    held = {"retention": greedy_blocks(root / "exp", skip=[2, 5]), "domain": counting_blocks()}
    cfg = EvalConfig(max_new_tokens=4, prompts="", check_rollback=False,
                     battery=BatteryConfig(enabled=True, tasks=["piqa"], data_dir=str(data), batch_size=4),
                     gate=GateConfig(retention_sets=["retention"], domain_sets=["domain"],
                                     max_retention_ppl_increase=10.0, min_domain_ppl_decrease=-0.99,
                                     max_accuracy_drop=0.0))
    res = evaluate_checkpoint(run / "model", held, None, cfg, out_dir=tmp_path / "eval",
                              replayed={"retention": False})
    e = res["battery"]["tasks"]["piqa"]
    assert e["n"] == 9 and e["metric"] == "acc" and e["licence"] == "AFL-3.0"
    assert len(e["base_items"]["acc"]) == 9 and 0.0 <= e["acc"]["base"] <= 1.0
    (c,) = [c for c in res["gate"]["checks"] if c["check"] == "max_accuracy_drop"]
    assert c["set"] == "battery:piqa" and c["passed"] == (not (c["value"] > 0 and c["ci"][1] < 0))
    assert res["sets"]["retention"]["replayed"] is False
    assert "retention set retention (not replayed)" in res["gate"]["summary"]
    md = (build_report(run, res, out_dir=tmp_path / "r").parent / "report.md").read_text()
    assert "Knowledge battery" in md and "| piqa | acc | 9 |" in md and "AFL-3.0" in md
    assert "retention (not replayed)" in md
