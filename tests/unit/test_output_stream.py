"""The run's final write without LoRA streams one tensor at a time (training/output.stream_trained)
and gives the same files, byte for byte, as loading the whole model in fp32, laying the trained
tensors over it and calling save_pretrained (what write_final did before)."""

from __future__ import annotations

import pytest
import torch

from llamapro.artifacts import read_metadata
from llamapro.config.train import TrainConfig
from llamapro.expansion import api as steps
from llamapro.tensors import copy_side_files, tensor_table
from llamapro.training import output
from llamapro.training.model import load_model, overlay_trained


def _grown(root, dtype, tied):
    from eval_support import char_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, num_hidden_layers=4,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    m.to(dtype).save_pretrained(root / "base")
    char_tokenizer(root / "base")
    steps.expand(str(root / "base"), str(root / "grown"), blocks=2, strategy="even", progress=False,
                 verify=False)
    return root / "grown"


def _trained(grown, extra=()):
    """fp32 'trained' tensors for every parameter of the new blocks (and ``extra`` names), with
    values no bf16 tensor can hold, so a cast or a copy from the checkpoint would show."""
    new = read_metadata(grown)["new_layer_indices"]
    g = torch.Generator().manual_seed(1)
    table = tensor_table(grown)
    names = [k for k in table if k.startswith(tuple(f"model.layers.{i}." for i in new))] + list(extra)
    return {k: torch.randn(table[k].shape, generator=g) / 3 for k in names}


def _before(grown, trained, out, **save_kw):
    """write_final's model write before streaming: whole model in fp32, trained laid over, saved."""
    model = load_model(str(grown), torch.float32)
    overlay_trained(model, trained)
    model.save_pretrained(out, **save_kw)
    copy_side_files(grown, out)


def _same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir() if p.name != "llamapro.json")
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.mark.parametrize("dtype,tied", [(torch.bfloat16, True), (torch.float32, False)],
                         ids=["bf16-checkpoint-tied", "fp32-checkpoint-untied"])
def test_write_final_streams_the_same_bytes_as_loading_the_model(tmp_path, monkeypatch, dtype, tied):
    grown = _grown(tmp_path, dtype, tied)
    extra = ("model.norm.weight",) if tied else ("model.norm.weight", "lm_head.weight")
    trained = _trained(grown, extra)  # a trained final norm (and untied head) too: not only new blocks
    _before(grown, trained, tmp_path / "before")

    def no_full_load(*a, **k):
        raise AssertionError("the whole model was loaded for a run without LoRA")

    monkeypatch.setattr(output, "load_model", no_full_load)
    state = {"global_step": 3, "tokens": 96, "elapsed": 1.0, "early_stopped": [], "best_eval": None}
    output.write_final({"out_dir": str(tmp_path / "run"), "model_dir": str(grown)}, TrainConfig(),
                       trained, state, [])
    after = tmp_path / "run" / "model"
    _same_files(tmp_path / "before", after)
    # and the bytes are what they claim: fp32 everywhere, trained tensors exact, originals as stored
    from safetensors.torch import load_file

    got, src = load_file(after / "model.safetensors"), load_file(grown / "model.safetensors")
    assert {t.dtype for t in got.values()} == {torch.float32}
    assert ("lm_head.weight" in got) is not tied
    for k, v in got.items():
        assert torch.equal(v, trained[k] if k in trained else src[k].float()), k
    rec = read_metadata(after)
    assert rec["kind"] == "trained" and rec.training["steps"] == 3


def test_sharded_stream_matches_sharded_save(tmp_path):
    grown = _grown(tmp_path, torch.bfloat16, True)
    trained = _trained(grown)
    _before(grown, trained, tmp_path / "before", max_shard_size="40KB")
    (tmp_path / "after").mkdir()
    assert output.stream_trained(grown, trained, tmp_path / "after", max_shard_size="40KB")
    copy_side_files(grown, tmp_path / "after")
    assert len(list((tmp_path / "after").glob("model-*-of-*.safetensors"))) > 2
    _same_files(tmp_path / "before", tmp_path / "after")


def test_stream_declines_when_the_trained_state_is_not_the_checkpoints(tmp_path):
    """A trained tensor the checkpoint does not hold (renamed keys, another shape): nothing is
    written and write_final falls back to loading the model."""
    grown = _grown(tmp_path, torch.float32, True)
    (tmp_path / "a").mkdir()
    assert not output.stream_trained(grown, {"model.layers.99.mlp.up_proj.weight": torch.zeros(2)},
                                     tmp_path / "a")
    k = next(iter(_trained(grown)))
    assert not output.stream_trained(grown, {k: torch.zeros(3, 3)}, tmp_path / "a")
    assert not any((tmp_path / "a").iterdir())
