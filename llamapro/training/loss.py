"""Next-token cross-entropy without full-vocabulary logits for the whole batch.

A causal LM's last step, ``logits = hidden @ W.T`` followed by cross-entropy, is the largest
activation of a small model's training step: 4 x 256 tokens x 49,152 vocabulary entries is 200 MB
in fp32, and autograd keeps it (and its log-softmax, and their gradients) alive until backward -
about 1 GB for SmolLM2. Here the loss is computed chunk by chunk and, because the loss is the end
of the graph, the gradients w.r.t. the hidden states (and the head's weight, if it trains) are
computed in the same pass and kept instead of the logits: a few MB. The arithmetic is the same as
``F.cross_entropy``'s (fp32 logits, log-sum-exp), in a different order.

Used where it is exact: a plain bias-free linear head with no logit soft-capping or scaling, and
ZeRO stage < 3 (stage 3 partitions the head's weight; those runs take the standard path).

Also here: the plain masked cross-entropy over full logits, and the distillation term
(:func:`kl_to_teacher`, KL to the base model's distribution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
CHUNK_TOKENS = 256


class _ChunkedLinearCE(torch.autograd.Function):
    """Sum over labelled positions of -log softmax(h @ W.T)[label]; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, need_h: bool, need_w: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for i in range(0, hidden.shape[0], chunk):
            h, y = hidden[i:i + chunk], labels[i:i + chunk]
            mask = y != IGNORE
            yc = y.clamp_min(0)
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, -1)
            tgt = logits.gather(1, yc[:, None]).squeeze(1)
            total += ((lse - tgt) * mask).sum()
            if need_h or need_w:
                # d(sum CE)/d logits = softmax - onehot, on labelled rows only; reuse the buffer
                p = logits.sub_(lse[:, None]).exp_()
                p[torch.arange(len(yc), device=p.device), yc] -= 1
                p.mul_(mask[:, None].to(p.dtype))
                if need_h:
                    grad_h[i:i + chunk] = (p.to(h.dtype) @ weight).to(grad_h.dtype)
                if need_w:
                    grad_w.addmm_(p.t(), h.float())
            del logits
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, g):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = saved.pop(0) * g if need_h else None
        gw = saved.pop(0).mul_(g) if need_w else None
        return gh, gw, None, None, None, None


def chunked_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """Next-token CE summed over labelled positions, and their count. ``hidden`` is (B, T, H), the
    decoder's final (normed) states; ``labels`` (B, T) holds the input tokens (-100: unlabelled)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and h.requires_grad, grad and weight.requires_grad
    s = _ChunkedLinearCE.apply(h, weight, y, chunk, need_h, need_w)
    return s, int((y != IGNORE).sum())


def supports_chunked_loss(model: nn.Module) -> bool:
    """True when ``model``'s logits are exactly ``decoder(x) @ lm_head.weight.T``."""
    cfg = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if cfg is None or not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return hasattr(model, "get_decoder") and model.get_decoder() is not None


def causal_lm_ce_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     chunked: bool) -> tuple[torch.Tensor, int]:
    """The training/eval loss of a HF causal LM: (sum of token CE, token count)."""
    if chunked:
        out = model.get_decoder()(input_ids=input_ids, use_cache=False)
        return chunked_ce_sum(out.last_hidden_state, model.get_output_embeddings().weight, labels)
    logits = model(input_ids=input_ids, use_cache=False).logits
    return masked_ce_sum(logits, labels)


def masked_ce_sum(logits, labels) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp_min(0),
                           reduction="none")
    return (loss * mask.reshape(-1)).sum(), int(mask.sum())


def kl_to_teacher(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """Distillation: mean over labelled positions of KL(teacher || student) at ``temperature``,
    scaled by temperature^2 (the teacher is the same model with the new blocks skipped)."""
    mask = (labels[:, 1:] != IGNORE).reshape(-1)
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, -1).reshape(-1, student_logits.shape[-1])
    t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, -1).reshape(-1, teacher_logits.shape[-1])
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1) * temperature**2
