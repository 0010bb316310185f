"""Distillation (train.distill_weight) without Ray: the teacher is exactly the base, the KL term and
its gradient are what they should be (0 at the identity init, a hand-computed value when the new
blocks differ), only the trainable new blocks get a gradient, and a training step adds
``distill_weight * KL`` to the loss it backpropagates."""

from __future__ import annotations

import copy

import pytest
import torch

from llamapro.config.train import TrainConfig
from llamapro.expansion.strategies import plan
from llamapro.expansion.surgery import expand_model, skip_layers
from llamapro.training.loss import IGNORE, kl_to_teacher, masked_ce_sum
from llamapro.training.params import select_parameters
from llamapro.training.stages import build_stages
from llamapro.training.worker import TrainRecipe
from tests.tiny_models import tiny_model

SEQ = 12


def _pair():
    """A tiny base and its expansion (2 new blocks, identity at init), new blocks trainable."""
    base = tiny_model("llama", num_layers=4)
    exp = copy.deepcopy(base)
    new = list(expand_model(exp, plan(4, 2, "even")).placement.new_indices)
    exp.train()  # as the worker runs it (the tiny config has no dropout)
    stage = build_stages(new)[0]
    groups = select_parameters(exp, TrainConfig(), new, stage)
    assert groups and {g["name"] for g in groups} == {"new_x1"}
    return base, exp, new


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (3, SEQ), generator=g)
    y = x.clone()
    y[0, :5] = IGNORE  # an unlabelled prompt
    y[2, -3:] = IGNORE  # and an unlabelled tail
    return x, y


def _perturb_new_blocks(model, new, seed=1):
    """Give every parameter of the new blocks (their zeroed writers too) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f"layers.{i}." in name for i in new):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _hand_kl(student, teacher, labels, temperature):
    """KL(teacher || student) at ``temperature``, x temperature^2, averaged over the positions whose
    next token is labelled; written out in float64 from the definition."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == IGNORE:
                continue
            p = torch.softmax(teacher[b, t].double() / temperature, -1)
            q = torch.softmax(student[b, t].double() / temperature, -1)
            total += float((p * (p.log() - q.log())).sum())
            count += 1
    return total / count * temperature**2


def _grad_owners(model):
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_teacher_is_the_base_and_kl_is_zero_with_zero_gradient_at_identity():
    base, exp, new = _pair()
    x, y = _batch(base.config.vocab_size)
    with torch.no_grad():
        base_logits = base(input_ids=x).logits
        with skip_layers(exp, new):
            teacher = exp(input_ids=x).logits
    # the new blocks skipped, the expanded model computes exactly its base
    torch.testing.assert_close(teacher, base_logits, rtol=0, atol=1e-6)
    assert exp.config.num_hidden_layers == 6  # and skip_layers put everything back
    student = exp(input_ids=x).logits
    kl = kl_to_teacher(student, teacher, y, 2.0)
    assert kl.requires_grad and abs(kl.item()) < 1e-7
    kl.backward()
    kl_grads = {n: p.grad.clone() for n, p in exp.named_parameters() if p.grad is not None}
    assert kl_grads and all(any(f"layers.{i}." in n for i in new) for n in kl_grads)
    assert max(g.abs().max().item() for g in kl_grads.values()) < 1e-6
    # the same parameters do get a real gradient from the CE loss: "zero" above is the KL's minimum
    exp.zero_grad(set_to_none=True)
    s, n = masked_ce_sum(exp(input_ids=x).logits, y)
    (s / n).backward()
    assert max(p.grad.abs().max().item() for p in exp.parameters() if p.grad is not None) > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_value_and_gradient_against_the_definition(temperature):
    base, exp, new = _pair()
    _perturb_new_blocks(exp, new)
    x, y = _batch(base.config.vocab_size)
    with torch.no_grad():
        teacher = base(input_ids=x).logits
        student = exp(input_ids=x).logits
    expected = _hand_kl(student, teacher, y, temperature)
    assert expected > 1e-2  # the perturbed student really differs from the base
    s = student.clone().requires_grad_(True)
    kl = kl_to_teacher(s, teacher, y, temperature)
    assert kl.item() == pytest.approx(expected, rel=1e-4)  # float32 vs float64
    kl.backward()
    # d/ds [T^2 KL(p || softmax(s/T))] = T (softmax(s/T) - p), averaged over the labelled positions;
    # nothing at the last position (no next token) nor where the next token is unlabelled
    mask = torch.zeros(y.shape, dtype=torch.bool)
    mask[:, :-1] = y[:, 1:] != IGNORE
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    want = temperature * (q - p) * mask[..., None] / mask.sum()
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-4, atol=1e-7)
    assert (s.grad[~mask] == 0).all()


def test_kl_gradient_reaches_only_the_new_blocks_and_a_step_along_it_lowers_kl():
    base, exp, new = _pair()
    _perturb_new_blocks(exp, new)
    x, y = _batch(base.config.vocab_size)

    def kl_now():
        with torch.no_grad(), skip_layers(exp, new):
            teacher = exp(input_ids=x).logits
        return kl_to_teacher(exp(input_ids=x).logits, teacher, y, 1.0)

    kl = kl_now()
    kl.backward()
    owners = _grad_owners(exp)
    trainable = {n for n, p in exp.named_parameters() if p.requires_grad}
    assert owners == trainable  # every trainable parameter, nothing frozen
    assert owners and all(any(f"layers.{i}." in n for i in new) for n in owners)
    assert all(exp.get_parameter(n).grad.abs().max() > 0 for n in owners)
    with torch.no_grad():
        for n in owners:
            p = exp.get_parameter(n)
            p -= 0.05 * p.grad / p.grad.norm()
    after = kl_now().item()
    assert after < kl.item() - 1e-4


class _Engine:
    """What ``train_step`` uses of a DeepSpeed engine; records the loss it backpropagates."""

    def __init__(self, model):
        self.module, self.losses = model, []

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        self.losses.append(loss.detach().clone())
        loss.backward()

    def step(self):
        pass


class _Batches:
    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def _recipe(new, batches, **train):
    r = TrainRecipe({"train": train})
    r.device, r.bf16, r.ds_bf16, r.chunked = torch.device("cpu"), False, False, False
    r.new_layers, r.batches = new, _Batches(batches)
    return r


@pytest.mark.parametrize("weight", [0.0, 3.0])
def test_a_train_step_adds_the_weighted_kl_to_the_base(weight):
    base, exp, new = _pair()
    _perturb_new_blocks(exp, new)
    batches = [_batch(base.config.vocab_size, seed) for seed in (0, 1)]
    recipe = _recipe(new, batches, distill_weight=weight, distill_temperature=2.0, grad_accum=2)
    engine = _Engine(exp)
    loss, kl, *_ = recipe.train_step(engine)
    want_loss, want_kl, ce = [], [], []
    with torch.no_grad():
        for x, y in batches:
            student = exp(input_ids=x).logits
            s, n = masked_ce_sum(student, y)
            k = _hand_kl(student, base(input_ids=x).logits, y, 2.0)  # the teacher is the base
            ce.append(float(s / n))
            want_kl.append(k if weight else 0.0)
            want_loss.append(ce[-1] + weight * k)
    assert [float(v) for v in engine.losses] == pytest.approx(want_loss, rel=1e-5)
    assert loss == pytest.approx(sum(want_loss) / 2, rel=1e-5)
    assert kl == pytest.approx(sum(want_kl) / 2, rel=1e-4, abs=1e-9)
    if weight:  # the distillation term is really there, and large next to rounding
        assert kl > 1e-2 and loss - sum(ce) / 2 > 1e-2
    # the step's gradient reached the new blocks only
    assert _grad_owners(exp) and all(any(f"layers.{i}." in n for i in new) for n in _grad_owners(exp))
