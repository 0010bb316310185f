"""`llamapro fuse`: residual and weighted fusion of a trained run into one standard HF directory.

alpha = 0 is the base (logits and, after `strip`, tensors), alpha = 1 the trained model, the
alphas between move monotonically from one to the other, and alpha = auto picks by the gate.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llamapro.artifacts import read_metadata, write_metadata
from llamapro.tensors import content_digest
from llamapro.cli import main
from llamapro.config.eval import EvalConfig, GateConfig
from llamapro.publish.fuse import CURVE_PNG, FuseError, NoAlphaPassesGate, choose_alpha, fuse
from llamapro.expansion.api import strip
from eval_support import greedy_blocks, make_run
from test_report import assert_real_png, images_of

REPO = Path(__file__).resolve().parents[2]
NEW = [2, 5]  # make_run: a 4-layer Llama grown by 2 blocks, "even"
SOURCES = {2: 1, 5: 3}
WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _tensors(d: Path) -> dict:
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _logits(d: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=IDS).logits


def _new_block(sd: dict, j: int) -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in sorted(sd.items()) if k.startswith(f"model.layers.{j}.")])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is many times faster than two
    threads spinning against other processes (see eval.num_threads)."""
    from llamapro.eval import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("fuse")
    run = make_run(root, "run", perturb=0.2)
    fused = {a: Path(fuse(run, root / f"alpha-{a}", "weighted", a, report=False)["out"])
             for a in (0.0, 0.25, 0.5, 0.75, 1.0)}
    return root, run, fused


def _without_base(root: Path, run: Path, name: str, frozen: bool = True, perturb_originals: float = 0.0) -> Path:
    """A copy of ``run`` whose recorded base is gone (and, optionally, whose originals were trained)."""
    from transformers import AutoModelForCausalLM

    dst = root / name
    shutil.copytree(run, dst)
    meta = read_metadata(dst / "model")
    if perturb_originals:
        m = AutoModelForCausalLM.from_pretrained(dst / "model", dtype=torch.float32)
        with torch.no_grad():
            m.model.layers[0].mlp.up_proj.weight.add_(perturb_originals)
        m.save_pretrained(dst / "model")
    meta["base"] = dict(meta["base"], path=str(root / "no-such-base"))
    meta["training"] = dict(meta["training"], originals_frozen=frozen)
    write_metadata(dst / "model", meta)
    return dst


def test_alpha_zero_gives_back_the_base(runs):
    root, run, fused = runs
    out = fused[0.0]
    assert torch.equal(_logits(out), _logits(root / "base"))  # exact, not close
    sd, base = _tensors(out), _tensors(root / "base")
    for j, src in SOURCES.items():  # each new block: its source's tensors, writers exactly zero
        for k, v in sd.items():
            if k.startswith(f"model.layers.{j}."):
                rest = k.split(".", 3)[3]
                want = torch.zeros_like(v) if rest in WRITERS else base[f"model.layers.{src}.{rest}"]
                assert torch.equal(v, want), k
    res = strip(str(out), str(root / "restored-0"), progress=False)
    assert res["equals_base"]
    assert content_digest(root / "restored-0") == content_digest(root / "base")
    meta = json.loads((out / "llamapro.json").read_text())
    assert meta["kind"] == "fused" and meta["fusion"]["alpha"] == 0.0
    assert "fingerprint checked" in meta["fusion"]["identity_from"]
    assert not meta["fusion"]["originals_interpolated"] and meta["fusion"]["interpolated_tensors"] == 18
    card = (out / "README.md").read_text()
    assert "| fusion | weighted, alpha 0 |" in card and "**alpha = 0**" in card


def test_without_the_base_frozen_originals_rebuild_the_identity(runs):
    root, run, fused = runs
    nobase = _without_base(root, run, "run-nobase")
    out = fuse(nobase, root / "nobase-0", "weighted", 0.0, report=False)
    assert "own original layers" in out["fusion"]["identity_from"]
    assert content_digest(root / "nobase-0") == content_digest(fused[0.0])
    a = fuse(nobase, root / "nobase-half", "weighted", 0.5, report=False)
    assert a["fusion"]["interpolated_tensors"] == 18
    assert _tensors(root / "nobase-half").keys() == _tensors(fused[0.5]).keys()
    for k, v in _tensors(root / "nobase-half").items():
        assert torch.equal(v, _tensors(fused[0.5])[k]), k


def test_trained_originals_need_the_base(runs):
    root, run, _ = runs
    trained = _without_base(root, run, "run-trained-originals", frozen=False, perturb_originals=0.05)
    with pytest.raises(FuseError, match="original layers were trained.*--base"):
        fuse(trained, root / "never", "weighted", 0.5)
    assert not (root / "never").exists()
    # with the base given, everything that differs from it is interpolated: alpha 0 is the base again
    res = fuse(trained, root / "trained-0", "weighted", 0.0, base=str(root / "base"), report=False)
    assert res["fusion"]["originals_interpolated"]
    assert torch.equal(_logits(root / "trained-0"), _logits(root / "base"))
    # a base that is not the recorded one is refused
    other = root / "other-base"
    shutil.copytree(root / "base", other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, rms_norm_eps=1e-3)))
    with pytest.raises(FuseError, match="fingerprint"):
        fuse(trained, root / "never", "weighted", 0.5, base=str(other))


def test_alpha_one_is_the_trained_model(runs):
    root, run, fused = runs
    got, want = _tensors(fused[1.0]), _tensors(run / "model")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert torch.equal(_logits(fused[1.0]), _logits(run / "model"))


def test_intermediate_alphas_move_monotonically(runs):
    root, run, fused = runs
    alphas = sorted(fused)
    sds = {a: _tensors(fused[a]) for a in alphas}
    logits = {a: _logits(fused[a]) for a in alphas}
    for j in NEW:
        to_init = [(_new_block(sds[a], j) - _new_block(sds[0.0], j)).norm().item() for a in alphas]
        to_trained = [(_new_block(sds[a], j) - _new_block(sds[1.0], j)).norm().item() for a in alphas]
        assert all(x < y for x, y in zip(to_init, to_init[1:])), to_init
        assert all(x > y for x, y in zip(to_trained, to_trained[1:])), to_trained
        # linear in weight space: the distance is alpha times the whole way
        assert np.allclose(to_init, [a * to_init[-1] for a in alphas], rtol=1e-5)
    d_base = [(logits[a] - logits[0.0]).abs().mean().item() for a in alphas]
    d_trained = [(logits[a] - logits[1.0]).abs().mean().item() for a in alphas]
    assert all(x < y for x, y in zip(d_base, d_base[1:])), d_base
    assert all(x > y for x, y in zip(d_trained, d_trained[1:])), d_trained
    # the original layers and everything outside the blocks never move
    for k, v in sds[0.5].items():
        if not k.startswith(("model.layers.2.", "model.layers.5.")):
            assert torch.equal(v, sds[1.0][k]), k


def test_residual_keeps_the_trained_blocks(runs):
    root, run, _ = runs
    res = fuse(run, root / "residual", "residual", report=False)
    got, want = _tensors(root / "residual"), _tensors(run / "model")
    assert all(torch.equal(got[k], want[k]) for k in want)
    meta = json.loads((root / "residual" / "llamapro.json").read_text())
    assert meta["kind"] == "fused" and meta["fusion"]["method"] == "residual" and res["fusion"]["alpha"] == 1.0
    assert "`llamapro fuse --method residual`" in (root / "residual" / "README.md").read_text()
    with pytest.raises(FuseError, match="alpha applies to --method weighted"):
        fuse(run, root / "never", "residual", 0.5)


def test_lora_adapter_is_merged_before_blending(runs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, run, _ = runs
    ck = root / "with-adapter"
    shutil.copytree(run / "model", ck)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                   layers_to_transform=NEW, layers_pattern="layers"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(ck)
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    r1 = fuse(ck, root / "lora-1", "weighted", 1.0)
    assert r1["merged_adapter"] == str(ck) and not (root / "lora-1" / "adapter_config.json").exists()
    got = _tensors(root / "lora-1")
    assert not any("lora" in k for k in got)
    assert all(torch.allclose(got[k], merged[k], atol=1e-6) for k in got)
    fuse(ck, root / "lora-0", "weighted", 0.0)
    assert torch.equal(_logits(root / "lora-0"), _logits(root / "base"))


def _heldout(root: Path, run: Path) -> dict:
    # retention: what the base itself writes (it scores it best); domain: what the trained model writes
    return {"retention": greedy_blocks(root / "exp", skip=NEW), "domain": greedy_blocks(run / "model")}


def _ec(**gate) -> EvalConfig:
    return EvalConfig(gate=GateConfig(retention_sets=["retention"], domain_sets=["domain"], **gate))


def test_auto_picks_the_largest_domain_gain_that_passes_the_gate(runs):
    root, run, _ = runs
    held = _heldout(root, run)
    loose = fuse(run, root / "auto-loose", "weighted", "auto", heldout=held,
                 eval_cfg=_ec(max_retention_ppl_increase=10.0), report=False)["fusion"]
    curve = loose["curve"]
    assert [p["alpha"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0] and loose["alpha"] == 1.0
    ret = [p["sets"]["retention"]["ppl_change"] for p in curve]
    gain = [p["domain_gain"] for p in curve]
    assert ret[0] == 0.0 and gain[0] == 0.0  # alpha 0 is the base: the reference itself
    assert gain[-1] > 0.2 and ret[-1] > 0.05  # the trade-off this tiny model was built to have
    # a retention limit between alpha 0.5 and 0.75: the gate cuts the grid there
    assert ret[2] < ret[3]
    thr = (ret[2] + ret[3]) / 2
    res = fuse(run, root / "auto-cut", "weighted", "auto", heldout=held, eval_cfg=_ec(max_retention_ppl_increase=thr))
    f = res["fusion"]
    passing = [p for p in f["curve"] if p["sets"]["retention"]["ppl_change"] <= thr]
    assert [p["gate"]["passed"] for p in f["curve"]] == [p in passing for p in f["curve"]]
    assert f["alpha"] == max(passing, key=lambda p: p["domain_gain"])["alpha"] == 0.5
    assert json.loads((root / "auto-cut" / "llamapro.json").read_text())["fusion"]["alpha"] == 0.5
    # the fused model is the alpha-0.5 point of the grid
    assert all(torch.equal(v, _tensors(runs[2][0.5])[k]) for k, v in _tensors(root / "auto-cut").items())
    card = (root / "auto-cut" / "README.md").read_text()
    assert ("| 0.5 (chosen) |" in card and "| 1 | " in card and "FAIL" in card
            and f"![perplexity against alpha]({CURVE_PNG})" in card)
    assert "**Regression gate: passed.**" in card  # the card evaluates *this* model (alpha 0.5)
    assert_real_png(root / "auto-cut" / CURVE_PNG)
    # the run's report shows the curve
    html = (run / "report" / "report.html").read_text()
    assert CURVE_PNG in images_of(html) and "alpha = auto" in html
    assert_real_png(run / "report" / CURVE_PNG)
    assert json.loads((run / "fusion" / "results.json").read_text())["alpha"] == 0.5
    # a gate no alpha can pass: refused, nothing written
    with pytest.raises(NoAlphaPassesGate, match="none of the alphas"):
        fuse(run, root / "auto-none", "weighted", "auto", heldout=held, eval_cfg=_ec(min_domain_ppl_decrease=0.9))
    assert not (root / "auto-none").exists()


def _pt(alpha, gain, passed):
    return {"alpha": alpha, "domain_gain": gain, "gate": {"passed": passed, "summary": "s",
                                                          "checks": [{"passed": passed}]}}


def test_choose_alpha_on_constructed_curves():
    assert choose_alpha([_pt(0, 0, True), _pt(0.5, 0.1, True), _pt(1, 0.2, False)])["alpha"] == 0.5
    # not the largest alpha
    assert choose_alpha([_pt(0, 0, True), _pt(0.5, 0.3, True), _pt(1, 0.2, True)])["alpha"] == 0.5
    # tie: nearer the base
    assert choose_alpha([_pt(0, 0, True), _pt(0.5, 0.2, True), _pt(1, 0.2, True)])["alpha"] == 0.5
    assert choose_alpha([_pt(0, 0, True), _pt(0.5, -0.1, True)])["alpha"] == 0  # no gain: the base
    with pytest.raises(NoAlphaPassesGate):
        choose_alpha([_pt(0, 0, False), _pt(1, 0.2, False)])


def test_cli(runs, capsys):
    root, run, _ = runs
    for name, blocks in _heldout(root, run).items():
        np.savez(root / f"{name}.npz", **blocks)
    opts = ["--method", "weighted", "--alpha", "auto", "--alphas", "0,0.5,1",
            "--heldout", f"domain={root / 'domain.npz'}", "--heldout", f"retention={root / 'retention.npz'}",
            "--domain", "domain", "--retention", "retention", "-q"]
    assert main(["fuse", str(run), str(root / "cli-auto"), "eval.gate.max_retention_ppl_increase=10", *opts]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fused -> .*cli-auto \(weighted, alpha 1, 6 layers", out) and "alpha 0.5" in out
    assert len(re.findall(r"^alpha [\d.]+ ", out, re.M)) == 3
    assert main(["fuse", str(run), str(root / "cli-none"), "eval.gate.min_domain_ppl_decrease=0.9", *opts]) == 4
    assert "none of the alphas" in capsys.readouterr().err and not (root / "cli-none").exists()
    assert main(["fuse", str(run), str(root / "cli-res"), "--method", "residual", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["fusion"]["method"] == "residual"


@pytest.mark.parametrize("args, message", [
    (["--method", "weighted", "--alpha", "1.5"], "outside [0, 1]"),
    (["--method", "weighted", "--alpha", "-0.1"], "outside [0, 1]"),
    (["--method", "weighted", "--alpha", "half"], "neither a number in [0, 1] nor auto"),
    (["--method", "residual", "--alpha", "0.5"], "alpha applies to --method weighted"),
    (["--method", "weighted", "--alpha", "auto"], "needs a new-domain held-out set"),
    (["--method", "weighted", "--alpha", "auto", "--domain", "domain", "--retention", "retention"],
     "have no held-out data"),
])
def test_cli_bad_arguments_write_nothing(runs, capsys, args, message):
    root, run, _ = runs
    assert main(["fuse", str(run), str(root / "bad"), *args, "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not (root / "bad").exists() and not list(root.glob(".bad.tmp-*"))


def test_cli_bad_sources_write_nothing(runs, capsys):
    root, run, _ = runs
    baseline = root / "baseline"
    shutil.copytree(run, baseline)
    meta = read_metadata(baseline / "model")
    write_metadata(baseline / "model", dict(meta, new_layer_indices=[], training=dict(meta["training"], mode="full")))
    unfinished = root / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "metrics.jsonl", unfinished)
    trained = _without_base(root, run, "cli-trained-originals", frozen=False)
    for src, message in ((root / "missing", "does not exist"),
                         (root / "base", "not an expanded checkpoint"),
                         (baseline, "records no inserted layers (a full baseline)"),
                         (unfinished, "training has not finished"),
                         (trained, "original layers were trained")):
        assert main(["fuse", str(src), str(root / "bad"), "--method", "weighted", "--alpha", "0.5", "-q"]) == 2
        assert message in capsys.readouterr().err, src
        assert not (root / "bad").exists()
    # an existing OUT is kept as it was without --force, and replaced with it
    out = root / "kept"
    assert main(["fuse", str(run), str(out), "--method", "weighted", "--alpha", "0.5", "-q"]) == 0
    before = content_digest(out)
    assert main(["fuse", str(run), str(out), "--method", "weighted", "--alpha", "0", "-q"]) == 2
    assert "already exists" in capsys.readouterr().err and content_digest(out) == before
    assert main(["fuse", str(run), str(out), "--method", "weighted", "--alpha", "0", "--force", "-q"]) == 0
    assert content_digest(out) == content_digest(runs[2][0.0])
    assert main(["fuse", str(run), str(run / "model"), "--method", "residual", "--force", "-q"]) == 2


def test_job_entrypoint(runs, capsys):
    import runpy

    root, run, _ = runs
    job = runpy.run_path(str(REPO / "jobs" / "fuse.py"))["main"]
    cfg = REPO / "jobs" / "configs" / "eval_demo.yaml"
    assert job(["--config", str(cfg), f"run.output_dir={root}", "run.name=run", "fuse.method=weighted",
                "fuse.alpha=0.25", f"fuse.out={root / 'job-out'}"]) == 0
    assert "alpha 0.25" in capsys.readouterr().out
    card = (root / "job-out" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "**alpha = 0.25**" in card
    assert job(["--config", str(cfg), f"run.output_dir={root}", "run.name=missing"]) == 2
    doc = (REPO / "jobs" / "fuse.py").read_text()
    assert ("ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\\n"
            "        python jobs/fuse.py --config") in doc
