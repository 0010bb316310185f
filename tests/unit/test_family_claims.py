"""Every family llamapro claims (README's list, llamapro/expansion/families.py's registry) expands into an
exact identity: a tiny random model of each, expanded on disk by `llamapro expand`'s own path, then
loaded with plain transformers gives the base's logits bit for bit.

The families of tests/tiny_models.py are expanded by tests/unit/test_expansion.py with every
strategy; here are the others, so that no claim goes untested."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from llamapro.expansion import api as steps
from llamapro.expansion.families import supported_model_types
from tests.tiny_models import _COMMON, FAMILY_CONFIGS

README = Path(__file__).resolve().parents[2] / "README.md"

# what a tiny config of each needs beyond tests/tiny_models.py's common sizes
EXTRA = {
    "granite": {}, "olmo": {}, "olmo2": {}, "cohere": {}, "stablelm": {}, "smollm3": {},
    "helium": {"head_dim": 8}, "glm": {"head_dim": 8}, "ministral": {"head_dim": 8, "sliding_window": 8},
    "seed_oss": {"head_dim": 8}, "arcee": {}, "apertus": {},
}
UNTESTED = [t for t in supported_model_types() if t not in FAMILY_CONFIGS]

# README's names -> model types ("Identity by construction": "The list is per family ...")
README_NAMES = {
    "Llama": ["llama"], "Mistral": ["mistral"], "Qwen2": ["qwen2"], "Qwen3": ["qwen3"],
    "Gemma 1/2/3": ["gemma", "gemma2", "gemma3_text"], "Phi-3": ["phi3"], "Granite": ["granite"],
    "OLMo/OLMo2": ["olmo", "olmo2"], "Cohere": ["cohere"], "StableLM": ["stablelm"],
    "SmolLM3": ["smollm3"], "Mixtral": ["mixtral"], "Qwen2-MoE/Qwen3-MoE": ["qwen2_moe", "qwen3_moe"],
    "StarCoder2": ["starcoder2"], "Phi-1/2": ["phi"], "GPT-NeoX": ["gpt_neox"],
}


def readme_families() -> list[str]:
    text = " ".join(README.read_text().split())
    m = re.search(r"The list is per family \(`llamapro/expansion/families.py`\): (.*?)\. Other families", text)
    assert m, "README's family list (\"The list is per family ...\") was not found; update this test"
    names = re.sub(r"\([^)]*\)", "", m.group(1))
    return [n.strip() for n in re.split(r",| and ", names) if n.strip()]


def test_every_family_readme_claims_is_registered_and_tested():
    names = readme_families()
    unknown = [n for n in names if n not in README_NAMES]
    assert not unknown, (f"README claims families this test does not map to model types: {unknown}; "
                         "add them to README_NAMES")
    claimed = {t for n in names for t in README_NAMES[n]}
    assert claimed <= set(supported_model_types()), claimed - set(supported_model_types())
    assert set(UNTESTED) <= set(EXTRA), f"registered families without a tiny config here: {set(UNTESTED) - set(EXTRA)}"


@pytest.mark.parametrize("model_type", UNTESTED)
def test_claimed_family_expands_to_an_identity(model_type, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, num_hidden_layers=2, **_COMMON, **EXTRA[model_type])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # nothing left at zero, so a writer we forgot cannot hide
        for p in base.parameters():
            p.normal_(0.0, 0.2)
    base.save_pretrained(tmp_path / "base")
    meta = steps.expand(str(tmp_path / "base"), str(tmp_path / "out"), blocks=2, strategy="even",
                        progress=False)
    assert meta["verification"]["ok"] and meta["verification"]["greedy_generation_equal"]
    assert meta["new_layer_indices"] and len(meta["new_layer_indices"]) == 2
    expanded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert expanded.config.num_hidden_layers == 4
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(expanded(ids).logits, base(ids).logits), model_type
