"""train.compile: when auto compiles (a pure decision, every blocker named), and that a compiled
model trains exactly as the eager one does: same losses, same trained weights within bf16
rounding, frozen weights untouched, parameter names unchanged (checkpoints and export see no
difference)."""

from __future__ import annotations

import pytest
import torch

from llamapro.config.train import TrainConfig
from llamapro.errors import ConfigError
from llamapro.training import params as train_params
from llamapro.training.compile import MIN_PARAMS, MIN_STEPS, compile_choice, compile_layers, eager
from llamapro.training.loss import causal_lm_ce_sum
from tests.tiny_models import tiny_model

OK = dict(bf16_autocast=True, zero3=False, lora=False, quantized=False, distill=False,
          checkpointing="off", n_params=MIN_PARAMS, total_steps=MIN_STEPS)


def test_auto_compiles_only_where_it_pays():
    assert compile_choice("auto", **OK)[0]
    for key, value, words in [("bf16_autocast", False, "fp32"), ("n_params", MIN_PARAMS - 1, "parameters"),
                              ("total_steps", MIN_STEPS - 1, "steps"), ("zero3", True, "ZeRO-3"),
                              ("lora", True, "LoRA"), ("quantized", True, "quantized"),
                              ("distill", True, "distillation"), ("checkpointing", "frozen", "checkpointing")]:
        on, why = compile_choice("auto", **dict(OK, **{key: value}))
        assert not on and words in why, (key, why)
    assert compile_choice("off", **OK) == (False, "train.compile: off")
    # on forces it where auto would not (fp32, a small model, a short run) ...
    assert compile_choice("on", **dict(OK, bf16_autocast=False, n_params=10, total_steps=1))[0]
    # ... but never where it cannot apply, and says why
    on, why = compile_choice("on", **dict(OK, zero3=True))
    assert not on and "ZeRO-3" in why and "eagerly" in why


def test_config_reads_compile():
    assert TrainConfig().compile == "auto"
    assert TrainConfig(compile=True).compile == "on" and TrainConfig(compile=False).compile == "off"
    with pytest.raises(ConfigError, match="train.compile"):
        TrainConfig(compile="sometimes")


def _trainable(model, layers):
    params = []
    for name, p in model.named_parameters():
        keep = any(f"layers.{i}." in name for i in layers)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    return params


def test_compiled_layers_train_like_eager_ones():
    """Four SGD steps on layers 1 and 3 of a tiny Llama (bf16 frozen, fp32 trainable, autocast,
    chunked loss: the worker's bf16 recipe), compiled against eager: same losses, same updates to
    the trained weights up to bf16 rounding, frozen weights unchanged, same parameter names; evaluation under
    ``eager()`` gives the eager model's loss."""
    torch.manual_seed(0)
    data = [torch.randint(3, 125, (2, 32)) for _ in range(4)]
    runs = {}
    for compiled in (False, True):
        model = tiny_model("llama", num_layers=4)
        names = [n for n, _ in model.named_parameters()]
        frozen0 = {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = _trainable(model, [1, 3])
        train_params.hold_frozen_in(model, torch.bfloat16)
        model.train()
        if compiled:
            assert compile_layers(model) == 4
        opt = torch.optim.SGD(params, lr=0.5)  # updates proportional to the gradients
        losses = []
        for ids in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                s, n = causal_lm_ce_sum(model, ids, ids, chunked=True)
            (s / n).backward()
            opt.step()
            opt.zero_grad()
            losses.append((s / n).item())
        model.eval()
        with torch.no_grad(), eager(), torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = causal_lm_ce_sum(model, data[0], data[0], chunked=True)
        held_out = (s / n).item()
        assert [n for n, _ in model.named_parameters()] == names  # in place: no _orig_mod. prefix
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen0[name]), name
        runs[compiled] = (losses, held_out, {name: p.detach() - start[name] for name, p in model.named_parameters()
                                             if p.requires_grad})
    (le, ee, we), (lc, ec, wc) = runs[False], runs[True]
    assert max(abs(a - b) for a, b in zip(le, lc)) < 2e-2, (le, lc)
    assert abs(ee - ec) < 2e-2
    # what training did to the new blocks: the same, up to bf16 rounding of the fused kernels
    assert sum(we[n].abs().sum() for n in we) > 0
    for n in we:
        assert (we[n] - wc[n]).norm() <= 0.05 * we[n].norm() + 1e-6, n
