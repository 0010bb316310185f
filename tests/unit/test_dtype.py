"""train.dtype: auto follows the bf16 probe (forced here, not read from the hardware); with bf16 the
frozen weights are held in bf16, the trainable ones stay fp32, and a short run's loss stays close
to fp32's."""

from __future__ import annotations

import pytest
import torch

from llamapro.config.train import TrainConfig
from llamapro.errors import ConfigError
from llamapro.training import params as train_params
from llamapro.training import precision
from llamapro.training.loss import causal_lm_ce_sum
from tests.tiny_models import tiny_model

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: on a loaded shared machine two OpenMP threads waiting on each other cost more
    than the work itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _force_probe(monkeypatch, native: bool):
    calls = []

    def probe(device):
        calls.append(device)
        return native, f"forced {'native' if native else 'emulated'}"

    monkeypatch.setattr(precision, "native_bf16", probe)
    return calls


@pytest.mark.parametrize("native,expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_follows_the_probe(monkeypatch, native, expected):
    calls = _force_probe(monkeypatch, native)
    dtype, info = precision.resolve_dtype("auto", CPU)
    assert calls == [CPU]
    assert dtype is expected
    assert info["compute"] == str(expected).replace("torch.", "")
    assert info["requested"] == "auto" and "forced" in info["reason"] and info["probe"]


def test_explicit_dtypes(monkeypatch):
    calls = _force_probe(monkeypatch, False)
    assert precision.resolve_dtype("float32", CPU)[0] is torch.float32
    assert calls == []  # no probe when the config says fp32
    dtype, info = precision.resolve_dtype("bfloat16", CPU)
    assert dtype is torch.bfloat16 and "WARNING" in info["reason"]  # forced, though not native
    with pytest.raises(ConfigError, match="train.dtype"):
        TrainConfig(dtype="float16")


def test_real_probe_answers_with_a_reason():
    native, why = precision.native_bf16(CPU)
    assert isinstance(native, bool) and why.startswith("cpu ")


def _trainable(model, new_layers):
    for p in model.parameters():
        p.requires_grad_(False)
    layers = train_params.decoder_layers(model)
    for i in new_layers:
        layers[i].requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def test_frozen_held_in_bf16_trainable_fp32():
    model = tiny_model("llama", num_layers=4)
    params = _trainable(model, [1, 3])
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert train_params.hold_frozen_in(model, torch.bfloat16) == n_frozen
    for p in model.parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16)
    ids = torch.randint(3, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, n = causal_lm_ce_sum(model, ids, ids, chunked=True)
    (s / n).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bf16_loss_curve_close_to_fp32():
    """Thirty AdamW steps on the new blocks of a tiny expanded model: the bf16 run (frozen bf16,
    fp32 masters, autocast, chunked loss) follows the fp32 run within 2% of the loss."""
    torch.manual_seed(0)
    # counting sequences (mod the vocabulary): learnable, so the loss must fall
    data = [(torch.randint(3, 100, (4, 1)) + torch.arange(32)) % 125 + 3 for _ in range(6)]
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", num_layers=4)
        params = _trainable(model, [1, 3])
        if dtype == torch.bfloat16:
            train_params.hold_frozen_in(model, dtype)
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for step in range(30):
            ids = data[step % len(data)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                s, n = causal_lm_ce_sum(model, ids, ids, chunked=True)
            (s / n).backward()
            opt.step()
            opt.zero_grad()
            losses.append((s / n).item())
        curves[dtype] = losses
    f32, b16 = curves[torch.float32], curves[torch.bfloat16]
    assert f32[-1] < f32[0] - 0.3 and b16[-1] < b16[0] - 0.3, (f32, b16)  # both learn
    assert max(abs(a - b) / a for a, b in zip(f32, b16)) < 0.02, (f32, b16)
