"""The real SmolLM2-135M-Instruct: 30 -> 36 layers with `even`, proven identical."""

import contextlib
import io
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

PROMPTS = [
    "What is the capital of France?",
    "List three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
]


@pytest.fixture(scope="module")
def demo_base():
    from llamapro.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="module")
def expanded(demo_base, tmp_path_factory):
    # `llamapro expand` in this process (the CLI's own main; `python -m llamapro.cli` as a command
    # runs in tests/e2e/conftest.py's quick_run): no second interpreter importing torch again
    from llamapro.cli import main

    out = tmp_path_factory.mktemp("smol") / "expanded"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["expand", str(demo_base), str(out), "--blocks", "6", "--strategy", "even", "-q"])
    assert code == 0, buf.getvalue()
    assert "PROVEN" in buf.getvalue()
    return out


def test_metadata_records_the_expansion(expanded, demo_base):
    meta = json.loads((expanded / "llamapro.json").read_text())
    assert meta["num_original_layers"] == 30 and meta["num_layers"] == 36
    assert meta["new_layer_indices"] == [5, 11, 17, 23, 29, 35]
    assert meta["zeroed_in_new_blocks"] == ["mlp.down_proj.weight", "self_attn.o_proj.weight"]
    v = meta["verification"]
    assert v["ok"] and v["bit_identical_logits"] and v["greedy_generation_equal"]
    assert v["max_abs_logit_diff"] == 0.0


def test_plain_transformers_generates_identically(expanded, demo_base):
    # a fresh interpreter that never imports llamapro
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert 'llamapro' not in sys.modules
tok = AutoTokenizer.from_pretrained({str(expanded)!r})
exp = AutoModelForCausalLM.from_pretrained({str(expanded)!r}, dtype=torch.float32).eval()
base = AutoModelForCausalLM.from_pretrained({str(demo_base)!r}, dtype=torch.float32).eval()
assert exp.config.num_hidden_layers == 36 and base.config.num_hidden_layers == 30
assert exp.lm_head.weight.data_ptr() == exp.model.embed_tokens.weight.data_ptr()
out = []
for p in {PROMPTS!r}:
    ids = tok.apply_chat_template([{{"role": "user", "content": p}}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        a = exp.generate(**ids, max_new_tokens=24, do_sample=False)
        b = base.generate(**ids, max_new_tokens=24, do_sample=False)
    out.append([torch.equal(a, b), tok.decode(a[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)])
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(same for same, _ in results), results
    assert "Paris" in results[0][1]


def test_strip_gives_back_the_base(expanded, demo_base, tmp_path, capsys):
    from llamapro.cli import main
    from llamapro.tensors import content_digest

    assert main(["strip", str(expanded), str(tmp_path / "restored"), "-q"]) == 0, capsys.readouterr().err
    assert content_digest(tmp_path / "restored") == content_digest(demo_base)
