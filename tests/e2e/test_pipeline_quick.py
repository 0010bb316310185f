"""The main job, quick: every step on the real SmolLM2 and the real demo corpora.

The run is the e2e tier's one training run (``quick_run`` in tests/e2e/conftest.py), shared with
test_eval_smollm2.py."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

PROGRESS = re.compile(r"^      train stage (\d)/2 step (\d+)/4 loss \d+\.\d{4} \| [\d,]+ tok/s \| "
                      r"\d+:\d\d elapsed, (?:~\d+:\d\d left|warm-up step)$", re.M)


@pytest.fixture(scope="module")
def run(quick_run):
    """The session's quick pipeline run (tests/e2e/conftest.py): ``llamapro run --quick`` with fuse."""
    return quick_run


def test_expanded_checkpoint_with_proof(run):
    d, _ = run
    meta = json.loads((d / "expanded" / "llamapro.json").read_text())
    assert meta["num_layers"] == 36 and meta["verification"]["ok"]
    assert meta["verification"]["bit_identical_logits"]


def test_training_checkpoints_and_metrics(run):
    d, _ = run
    assert list((d / "ray").rglob("checkpoint_*"))
    ev = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [e["layers"] for e in ev if e["event"] == "stage_start"] == [[5, 11, 17], [5, 11, 17, 23, 29, 35]]
    meta = json.loads((d / "model" / "llamapro.json").read_text())
    assert meta["kind"] == "trained" and meta["training"]["originals_frozen"]


def test_report_with_real_plots(run):
    from PIL import Image

    d, _ = run
    html = (d / "report" / "report.html").read_text()
    pngs = sorted((d / "report").glob("*.png"))
    assert len(pngs) >= 3
    for p in pngs:
        assert f'src="{p.name}"' in html
        with Image.open(p) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    res = json.loads((d / "eval" / "results.json").read_text())
    assert set(res["sets"]) == {"debian-manuals", "python-docs", "perl-docs"}  # perl-docs: not replayed
    assert all(s["base"]["ppl"] > 1 and s["trained"]["ppl"] > 1 for s in res["sets"].values())


@pytest.fixture(scope="module")
def plain(run):
    """RUN/export and RUN/fused loaded by plain transformers in ONE fresh interpreter that never
    imports llamapro (one interpreter start for both: torch and transformers import once)."""
    d, _ = run
    code = (f"import json, sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(d / 'export')!r}); "
            f"t = AutoTokenizer.from_pretrained({str(d / 'export')!r})\n"
            "ids = t('The Debian package manager', return_tensors='pt')\n"
            "out = m.generate(**ids, max_new_tokens=5, do_sample=False)[0]\n"
            f"f = AutoModelForCausalLM.from_pretrained({str(d / 'fused')!r})\n"
            "print(json.dumps({'llamapro_imported': 'llamapro' in sys.modules, 'text': t.decode(out),\n"
            "                  'new_tokens': len(out) - ids['input_ids'].shape[1],\n"
            "                  'export_layers': m.config.num_hidden_layers,\n"
            "                  'fused_layers': f.config.num_hidden_layers}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_export_loads_in_plain_transformers(run, plain):
    d, _ = run
    assert not plain["llamapro_imported"] and plain["export_layers"] == 36
    assert plain["new_tokens"] > 0, plain["text"]  # it generates
    assert (d / "export" / "README.md").read_text().startswith("---")


def test_served_answer(run):
    d, r = run
    s = json.loads((d / "summary.json").read_text())
    assert s["serve"]["model"] == "expanded" and s["serve"]["answer"].strip()
    assert "served answer" in r.stdout


def test_fused_model_is_half_way_and_loads_in_plain_transformers(run, plain):
    """`fuse.enabled` in the pipeline: RUN/fused is a standard model whose inserted blocks are
    (1 - alpha) x their identity initialisation + alpha x trained; with alpha 0.5 a zeroed
    residual writer becomes half its trained value, and an original layer is untouched."""
    from safetensors import safe_open

    d, r = run
    s = json.loads((d / "summary.json").read_text())
    assert s["fuse"]["method"] == "weighted" and s["fuse"]["alpha"] == 0.5
    assert "fuse (weighted, alpha 0.5)" in r.stdout

    def tensor(model_dir, key):
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                if key in h.keys():
                    return h.get_tensor(key).float()
        raise KeyError(key)

    new = json.loads((d / "expanded" / "llamapro.json").read_text())["new_layer_indices"][0]
    w = f"model.layers.{new}.self_attn.o_proj.weight"
    trained, fused = tensor(d / "export", w), tensor(d / "fused", w)
    assert trained.abs().max() > 0
    assert (fused - 0.5 * trained).abs().max() <= 1e-6 * max(1.0, float(trained.abs().max()))
    orig = "model.layers.0.mlp.down_proj.weight"
    assert bool((tensor(d / "fused", orig) == tensor(d / "export", orig)).all())
    assert not plain["llamapro_imported"] and plain["fused_layers"] == 36  # plain transformers loads it


def test_the_runs_pack_applied_to_a_fresh_base_generates_like_the_export(run, tmp_path):
    """The pipeline writes RUN/pack beside RUN/export: applied to a fresh copy of the base it gives
    the export's tensors and the export's greedy answers, at a fraction of the size; and the
    blocks matter (not a vacuous comparison): the applied model's logits are not the base's.
    (Was also test_pack_smollm2.py, on a stand-in for training: this is the real trained run.)"""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamapro.cli import main
    from llamapro.demo import ensure_demo_model

    d, _ = run
    s = json.loads((d / "summary.json").read_text())
    assert s["pack"] and (d / "pack" / "pack.json").is_file()
    fresh = tmp_path / "base"
    shutil.copytree(ensure_demo_model(), fresh)
    assert main(["apply", str(fresh), str(d / "pack"), str(tmp_path / "applied"), "-q"]) == 0

    def weights(m):
        out = {}
        for f in sorted(Path(m).glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, e = weights(tmp_path / "applied"), weights(d / "export")
    assert a.keys() == e.keys() and all(torch.equal(a[k], e[k].to(a[k].dtype)) for k in a)
    pack_bytes = sum(f.stat().st_size for f in (d / "pack").iterdir())
    assert pack_bytes < 0.2 * sum(f.stat().st_size for f in (d / "export").glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(str(d / "export"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answers, logits = [], []
    for m in (tmp_path / "applied", d / "export", fresh):
        model = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(**ids).logits)
            if m != fresh:
                answers.append(model.generate(**ids, max_new_tokens=12, do_sample=False)[0].tolist())
    assert answers[0] == answers[1]
    assert torch.equal(logits[0], logits[1])
    assert (logits[0] - logits[2]).abs().max().item() > 1e-4  # the trained blocks change the base


def test_console_shows_progress_and_ray_output_is_in_the_run_log(run):
    """issue 17: the demo's console shows step, stage, loss, tokens/s and time left; Ray's INFO
    logs and the workers' raw output go to RUN/logs/ray.log, not over the user's screen.
    (H-console's test, on this run.)"""
    d, r = run
    lines = PROGRESS.findall(r.stdout)
    assert lines and lines[-1][:2] == ("2", "4"), r.stdout[-3000:]  # QUICK: 2 stages, 4 steps
    screen = r.stdout + r.stderr
    for noise in ("Started a local Ray instance", "(RayTrainWorker", "(TrainController",
                  "(SplitCoordinator", "(ServeController", "Progress bars disabled"):
        assert noise not in screen, f"{noise!r} reached the screen:\n{screen[-3000:]}"
    log = (d / "logs" / "ray.log").read_text()
    assert f"Ray's logs: {d / 'logs' / 'ray.log'}" in r.stdout
    assert "Started a local Ray instance" in log and re.search(r"\(RayTrainWorker pid=\d+\) \[llamapro\] step", log)
