"""`llamapro export`: a standard HF directory that plain transformers loads; atomic; adapters merged;
`llamapro strip` on it gives back the base exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamapro.tensors import content_digest
from llamapro.eval import check_gate, write_results
from llamapro.config.eval import GateConfig
from llamapro.publish.export import export
from llamapro.expansion.api import strip
from eval_support import eval_cli as _cli, make_run

REPO = Path(__file__).resolve().parents[2]


def _tensors(d: Path) -> dict:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _snapshot(d: Path) -> dict:
    """Every file's bytes' identity (name -> size, sha of content for small files)."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = make_run(root, "run", perturb=0.2)
    sets = {"retention": {"role": "retention", "blocks": 4, "tokens": 80, "base": {"loss": 2.0, "ppl": 7.389},
                          "trained": {"loss": 2.001, "ppl": 7.396}, "loss_change": 0.001, "ppl_change": 0.001},
            "domain": {"role": "domain", "blocks": 4, "tokens": 80, "base": {"loss": 3.0, "ppl": 20.09},
                       "trained": {"loss": 2.5, "ppl": 12.18}, "loss_change": -0.5, "ppl_change": -0.3935}}
    gate = check_gate(sets, None, GateConfig(retention_sets=["retention"], domain_sets=["domain"]))
    write_results(run / "eval", {"sets": sets, "gate": gate, "greedy": None,
                                 "rollback": {"applicable": True, "equals_base": True}})
    return root, run


def test_export_is_a_plain_hf_dir_that_transformers_loads(run, capsys):
    root, r = run
    out = root / "exported"
    assert _cli(["export", str(r), str(out), "--max-shard-size", "100KB", "-q"]) == 0
    assert "exported ->" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "llamapro.json",
            "model.safetensors.index.json"} <= names
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded as asked
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    meta = json.loads((out / "llamapro.json").read_text())
    assert meta["kind"] == "exported" and meta["new_layer_indices"] == [2, 5]
    assert meta["export"]["gate"]["passed"] and meta["export"]["num_layers"] == 6
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "- llamapro" in front
    for needle in (meta["base"]["fingerprint"], "[2, 5]", "| strategy | even |", "| domain | text | 0.7 | 70% |",
                   "| 1 | top | [2, 5] | 5 |", "+0.10%", "**Regression gate: passed.**", "llamapro strip"):
        assert needle in card, needle

    # a fresh interpreter that never imports llamapro (or peft) loads and generates
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()
ids = tok("Debian is", return_tensors="pt")["input_ids"]
with torch.no_grad():
    g = m.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    logits = m(input_ids=ids).logits
torch.save(logits, {str(root / 'exported_logits.pt')!r})
assert 'llamapro' not in sys.modules and 'peft' not in sys.modules
print(json.dumps({{"layers": m.config.num_hidden_layers, "new_tokens": g.shape[1] - ids.shape[1],
                  "text": tok.decode(g[0])}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["layers"] == 6 and res["new_tokens"] == 6 and res["text"].startswith("Debian is")
    # the export computes exactly what the trained checkpoint computes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(r / "model")
    m = AutoModelForCausalLM.from_pretrained(r / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = m(input_ids=tok("Debian is", return_tensors="pt")["input_ids"]).logits
    assert torch.equal(ref, torch.load(root / "exported_logits.pt"))


def test_strip_of_the_export_gives_back_the_base(run):
    root, r = run
    out = root / "exported-for-strip"
    export(r, out)
    res = strip(str(out), str(root / "restored"), progress=False)
    assert res["equals_base"]
    assert content_digest(root / "restored") == content_digest(root / "base")


def test_export_never_overwrites_without_force(run, capsys):
    root, r = run
    out = root / "twice"
    assert _cli(["export", str(r), str(out), "-q"]) == 0
    before = _snapshot(out)
    assert _cli(["export", str(r), str(out), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err and _snapshot(out) == before
    assert _cli(["export", str(r / "model"), str(out), "--force", "-q"]) == 0  # a checkpoint dir works too
    assert (out / "config.json").is_file()
    assert _cli(["export", str(r), str(r / "model"), "--force", "-q"]) == 2  # never onto its source
    assert "being exported" in capsys.readouterr().err


def test_lora_adapter_is_merged(run):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, r = run
    ck = root / "with-adapter"
    shutil.copytree(r / "model", ck)
    base = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                         layers_to_transform=[2, 5], layers_pattern="layers"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    pm.save_pretrained(ck)  # adapter_config.json + adapter_model.safetensors beside the full weights
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}

    out = root / "merged"
    res = export(ck, out)
    assert res["merged_adapter"] == str(ck)
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    got = _tensors(out)
    assert not any("lora" in k for k in got)
    before = _tensors(r / "model")
    changed = {k for k in got if not torch.equal(got[k], before[k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.layers.5.")) for k in changed)
    for k in got:
        assert torch.allclose(got[k], merged[k], atol=1e-6), k


CHILD = r"""
import sys, time
import transformers.modeling_utils as mu
real = mu.safe_save_file
n = 0
def slow_save(*args, **kw):  # write one shard, then dawdle: the parent kills us mid-export
    global n
    real(*args, **kw)
    n += 1
    print(f"SHARD {n}", flush=True)
    time.sleep(2 if n < 2 else 600)
mu.safe_save_file = slow_save
from llamapro.publish.export import export
export(sys.argv[1], sys.argv[2], force=True, max_shard_size="50KB")
print("FINISHED", flush=True)
"""


def test_interrupted_export_leaves_the_previous_one_intact(run):
    root, r = run
    out = root / "kept"
    export(r, out)
    before = _snapshot(out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(r), str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, cwd=str(REPO))
    try:
        seen = []
        for line in child.stdout:  # blocks until the child writes; it always does or exits
            seen.append(line.strip())
            if line.startswith("SHARD 2"):
                os.kill(child.pid, signal.SIGKILL)  # mid-write: shards on disk, the rest not yet
                break
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert "SHARD 2" in seen and "FINISHED" not in seen, seen
    assert child.returncode == -signal.SIGKILL
    # the previous export is exactly as it was; the half-written one is only a hidden temporary
    assert _snapshot(out) == before
    partial = [p for p in root.iterdir() if p.name.startswith(".kept.tmp-")]
    assert len(partial) == 1 and list(partial[0].glob("model-*.safetensors"))
    assert not (partial[0] / "README.md").exists()
    visible = {p.name for p in root.iterdir() if not p.name.startswith(".")}
    assert "kept" in visible and not any(n.startswith("kept") and n != "kept" for n in visible)
    # the next export names the leftover and still succeeds
    res = export(r, out, force=True)
    assert res["stale_partial_exports"] == [partial[0].name]
