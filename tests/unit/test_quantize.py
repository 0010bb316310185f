"""train.quantize_base (nf4 / int8): the originals load quantized and frozen, a few real optimizer
steps change only the new blocks, and the result exports with the originals bit-identical."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llamapro.artifacts import read_metadata
from llamapro.expansion import api as steps
from llamapro.training.quantize import (
    QuantizeError,
    load_quantized_base,
    trainable_names,
    weight_bytes,
    write_full_precision,
)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A tiny Llama whose Linear inputs are multiples of 64 (bitsandbytes' CPU 4-bit block), 4 -> 6 layers."""
    from eval_support import char_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("qb")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, num_hidden_layers=4,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    m.save_pretrained(root / "base")
    char_tokenizer(root / "base")
    steps.expand(str(root / "base"), str(root / "grown"), blocks=2, strategy="even", progress=False, verify=False)
    return root / "grown"


def _snapshot(model) -> dict:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("kind,linear", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_base_trains_only_the_new_blocks(grown, tmp_path, kind, linear):
    new = read_metadata(grown)["new_layer_indices"]
    model = load_quantized_base(grown, kind)
    layers = model.model.layers
    assert all(type(layers[i].self_attn.q_proj).__name__ == linear for i in range(6) if i not in new)
    assert all(type(layers[i].mlp.down_proj) is torch.nn.Linear for i in new)
    assert layers[new[0]].mlp.down_proj.weight.dtype == torch.float32
    names = trainable_names(model)
    assert names and all(n.startswith(tuple(f"model.layers.{i}." for i in new)) for n in names)
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(grown, dtype=torch.float32)
    assert weight_bytes(model) < weight_bytes(full)

    model.train()
    before = _snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        ids = torch.randint(3, 128, (2, 24), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(lambda x: x == x and x < 10, losses))
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= set(names)  # nothing outside the new blocks moved, quantized or not
    assert {f"model.layers.{i}.mlp.down_proj.weight" for i in new} <= changed  # identity blocks moved

    out = tmp_path / "fp"
    res = write_full_precision(model, grown, out)
    assert res["replaced_tensors"] == len([n for n in model.state_dict() if n.startswith(
        tuple(f"model.layers.{i}." for i in new))])
    got, src = load_file(out / "model.safetensors"), load_file(grown / "model.safetensors")
    assert set(got) == set(src)
    trained = model.state_dict()
    for k, v in got.items():
        if k.startswith(tuple(f"model.layers.{i}." for i in new)):
            assert torch.equal(v, trained[k].float()), k
        else:
            assert torch.equal(v, src[k]), k  # the originals come back bit-identical
    assert read_metadata(out)["training"]["quantize_base"] == kind
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 6 and "quantization_config" not in reloaded.config.to_dict()


def test_bad_quantize_base_is_refused(grown):
    with pytest.raises(QuantizeError, match="nf4 or int8"):
        load_quantized_base(grown, "fp4")


def test_quantize_base_config_is_validated():
    """train.quantize_base through the same dotted overrides `llamapro train` takes: the valid
    combinations load, every setting that would train a quantized original is a ConfigError that
    names the key and the fix."""
    from llamapro.config import ConfigError, load_config
    from llamapro.config.train import TrainConfig, baseline_of

    assert load_config(None, []).train.quantize_base == "none"
    for kind in ("nf4", "int8"):
        for extra in ([], ["train.zero_stage=0"], ["train.zero_stage=1"], ["train.lora_new_blocks=true"],
                      ["train.num_stages=2", "train.distill_weight=0.1"]):
            assert load_config(None, [f"train.quantize_base={kind}", *extra]).train.quantize_base == kind
    bad = [
        (["train.quantize_base=fp4"], r"train\.quantize_base: 'fp4' is not one of none, nf4, int8"),
        (["train.quantize_base=nf4", "train.mode=full"], r"train\.quantize_base: nf4 applies to mode llamapro.*"
         r"not mode full: use train\.mode: llamapro, or set train\.quantize_base: none"),
        (["train.quantize_base=int8", "train.original_lr=1e-6"],
         r"train\.quantize_base: int8 keeps the original layers frozen.*set train\.original_lr: 0"),
        (["train.quantize_base=nf4", "train.original_lr=1e-6", "train.final_originals_ratio=0.2"],
         r"train\.quantize_base:.*final_originals_ratio: 0, or set train\.quantize_base: none"),
        (["train.quantize_base=nf4", "train.train_norms=true", "train.train_lm_head=true"],
         r"train\.quantize_base:.*set train\.train_norms, train\.train_lm_head: false"),
        (["train.quantize_base=nf4", "train.zero_stage=3"],
         r"train\.quantize_base: nf4 cannot run under ZeRO-3.*train\.zero_stage: 2 or lower"),
    ]
    for overrides, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, overrides)
    # a baseline in another mode drops the quantized base instead of being refused
    assert baseline_of(TrainConfig(quantize_base="nf4"), "full").quantize_base == "none"


def test_train_model_loader_quantizes_when_asked(grown):
    """llamapro.training.model.load_model (what each worker loads a stage from) follows quantize_base:
    the originals' Linear layers quantized, the new blocks full precision in the compute dtype."""
    from llamapro.training.model import load_model

    new = read_metadata(grown)["new_layer_indices"]
    plain = load_model(str(grown), torch.float32)
    assert not hasattr(plain, "llamapro_quantized")
    for kind, linear in (("nf4", "Linear4bit"), ("int8", "Linear8bitLt")):
        m = load_model(str(grown), torch.bfloat16, quantize_base=kind, new_layers=new)
        assert m.llamapro_quantized["kind"] == kind
        layers = m.model.layers
        assert all(type(layers[i].mlp.up_proj).__name__ == linear for i in range(6) if i not in new)
        assert all(layers[i].mlp.up_proj.weight.dtype == torch.bfloat16 for i in new)


def test_nf4_keeps_training_after_a_heldout_evaluation(grown):
    """A held-out evaluation (eval mode, no grad) between steps must not switch bitsandbytes' 4-bit
    layers to its inference-only CPU layout (AVX512-BF16 CPUs), whose kernel has no backward: the
    gradient to the lowest new block would silently go wrong. It stays what it was before."""
    new = read_metadata(grown)["new_layer_indices"]
    model = load_quantized_base(grown, "nf4", compute_dtype="bfloat16")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    lowest = model.model.layers[min(new)].mlp.down_proj.weight  # zero-init: its grad is not

    def grad():
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        g = lowest.grad.clone()
        model.zero_grad()
        return g

    before = grad()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    assert not getattr(model.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False)
    after = grad()
    assert before.abs().sum() > 0 and torch.equal(before, after)
