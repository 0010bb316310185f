"""SmolLM2-135M-Instruct: a run's new blocks packed, applied to a fresh copy of the base, generate
exactly what the export generates; the pack is a fraction of the export's size."""

import json
import shutil

import pytest
import torch

pytestmark = pytest.mark.e2e

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


def _greedy(model_dir, tok):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out.append(m.generate(**ids, max_new_tokens=16, do_sample=False)[0].tolist())
    return out


def test_pack_apply_to_a_fresh_base_generates_like_the_export(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from llamapro.expansion import api as steps
    from llamapro.artifacts import write_metadata
    from llamapro.cli import main
    from llamapro.demo import ensure_demo_model
    from llamapro.publish.export import export

    base = ensure_demo_model()
    run = tmp_path / "run"
    steps.expand(str(base), str(run / "model"), blocks=6, strategy="even", verify=False, progress=False)
    # a short stand-in for training (real training is tested elsewhere): the new blocks' writers
    # get small values, so the model answers differently from the base; originals untouched
    meta = json.loads((run / "model" / "llamapro.json").read_text())
    sd = load_file(run / "model" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for i in meta["new_layer_indices"]:
        for k in (f"model.layers.{i}.mlp.down_proj.weight", f"model.layers.{i}.self_attn.o_proj.weight"):
            sd[k] = torch.randn(sd[k].shape, generator=g) * 0.02
    save_file(sd, run / "model" / "model.safetensors", metadata={"format": "pt"})
    del sd
    meta.update(kind="trained", training={"mode": "llamapro", "steps": 1, "originals_frozen": True})
    write_metadata(run / "model", meta)
    (run / "metrics.jsonl").write_text("")

    export(str(run), str(tmp_path / "export"))
    assert main(["pack", str(run), str(tmp_path / "pack")]) == 0
    fresh = tmp_path / "fresh-base"
    shutil.copytree(base, fresh)
    assert main(["apply", str(fresh), str(tmp_path / "pack"), str(tmp_path / "applied"), "-q"]) == 0
    capsys.readouterr()

    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    exported, applied = _greedy(tmp_path / "export", tok), _greedy(tmp_path / "applied", tok)
    assert exported == applied
    assert exported != _greedy(base, tok)  # the blocks matter: not a vacuous comparison

    pack_mb = sum(f.stat().st_size for f in (tmp_path / "pack").iterdir()) / 1e6
    export_mb = sum(f.stat().st_size for f in (tmp_path / "export").glob("*.safetensors")) / 1e6
    print(f"pack {pack_mb:.1f} MB, export {export_mb:.1f} MB")
    assert pack_mb < export_mb / 5
