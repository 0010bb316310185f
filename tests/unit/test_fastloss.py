"""The training-speed levers keep the numbers: the chunked loss and per-layer checkpointing give the
same loss and the same gradients as the plain path, on tiny models of two families."""

from __future__ import annotations

import pytest
import torch

from llamapro.training.loss import (
    causal_lm_ce_sum,
    chunked_ce_sum,
    masked_ce_sum,
    supports_chunked_loss,
)
from llamapro.training.params import apply_checkpointing
from tests.tiny_models import tiny_model


def _grads(model, x, y, chunked):
    model.zero_grad(set_to_none=True)
    s, n = causal_lm_ce_sum(model, x, y, chunked)
    (s / n).backward()
    return s.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _freeze_all_but(model, layer: int, head: bool):
    for name, p in model.named_parameters():
        p.requires_grad_(f"layers.{layer}." in name or (head and ("lm_head" in name or "embed" in name)))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("head", [False, True])
def test_chunked_loss_equals_plain_cross_entropy(family, head):
    torch.manual_seed(0)
    m = tiny_model(family, num_layers=3)
    assert supports_chunked_loss(m)
    _freeze_all_but(m, 1, head)
    x = torch.randint(0, m.config.vocab_size, (3, 19))
    y = x.clone()
    y[0, :7] = -100  # unlabelled prompt tokens
    s0, n0, g0 = _grads(m, x, y, chunked=False)
    s1, n1, g1 = _grads(m, x, y, chunked=True)
    assert n0 == n1 == int((y[:, 1:] != -100).sum())
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-4)
    assert set(g0) == set(g1) and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


def test_chunk_size_does_not_matter_and_no_grad_path():
    torch.manual_seed(1)
    h = torch.randn(2, 33, 16, requires_grad=True)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (2, 33))
    ref, n = masked_ce_sum(h @ w.t(), y)
    for chunk in (1, 7, 64, 1000):
        s, m = chunked_ce_sum(h, w, y, chunk=chunk)
        assert m == n
        torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-4)
    with torch.no_grad():
        s, _ = chunked_ce_sum(h, w, y)
    assert not s.requires_grad
    torch.testing.assert_close(s, ref.detach(), rtol=1e-6, atol=1e-4)


def test_softcapped_models_take_the_plain_path():
    m = tiny_model("llama", num_layers=2)
    m.config.final_logit_softcapping = 30.0
    assert not supports_chunked_loss(m)


@pytest.mark.parametrize("how,expected", [("off", []), ("frozen", [2, 4]), ("all", [1, 2, 3, 4])])
def test_checkpointing_picks_layers_and_keeps_gradients(how, expected):
    torch.manual_seed(2)
    m = tiny_model("llama", num_layers=5)
    x = torch.randint(0, m.config.vocab_size, (2, 12))
    for name, p in m.named_parameters():
        p.requires_grad_("layers.1." in name or "layers.3." in name)
    m.train()
    _, _, ref = _grads(m, x, x, chunked=True)
    assert apply_checkpointing(m, how) == expected
    got_flags = [i for i, layer in enumerate(m.model.layers) if layer.gradient_checkpointing]
    assert got_flags == expected
    _, _, g = _grads(m, x, x, chunked=True)
    assert set(g) == set(ref)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], rtol=1e-5, atol=1e-6)
