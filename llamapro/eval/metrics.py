"""The numbers of an evaluation: held-out loss and perplexity, greedy answers and their agreement
with the base's, and the per-set / greedy entries of the results built from them."""

from __future__ import annotations

import math


def ppl(loss: float) -> float:
    """Perplexity of a mean cross-entropy (capped so a hopeless model gives a finite number)."""
    return math.exp(min(loss, 700.0))


def heldout_loss(model, blocks: dict, batch_size: int = 4) -> dict:
    """Token-level mean next-token cross-entropy over labelled positions, and perplexity."""
    import torch

    from llamapro.training.loss import masked_ce_sum  # local: it imports torch

    dev = next(model.parameters()).device
    ids, labels = blocks["input_ids"], blocks["labels"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            x = torch.as_tensor(ids[i:i + batch_size], device=dev)
            y = torch.as_tensor(labels[i:i + batch_size], device=dev)
            s, n = masked_ce_sum(model(input_ids=x).logits, y)
            total += float(s)
            count += n
    loss = total / max(1, count)
    return {"loss": loss, "ppl": ppl(loss), "tokens": count, "blocks": int(len(ids))}


def encode_prompts(tokenizer, prompts: list[dict], chat_template: bool = True) -> list:
    """Token id tensors (1 x n) per prompt; the chat template wraps it as a user turn when the
    tokenizer has one and ``chat_template`` is on."""
    out = []
    use_chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
    for rec in prompts:
        if use_chat:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                                add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out.append(enc["input_ids"])
        else:
            out.append(tokenizer(rec["prompt"], return_tensors="pt")["input_ids"])
    return out


def greedy(model, batches: list, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation token ids per prompt (one prompt at a time: no padding effects)."""
    import torch

    from llamapro.expansion.surgery import pad_id  # local: it imports torch

    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(dev)
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               temperature=None, top_p=None, top_k=None,
                               pad_token_id=pad_id(model))
            out.append(g[0, ids.shape[1]:].tolist())
    return out


def prefix_agreement(a: list, b: list) -> float:
    """Longest common prefix of two answers as a share of the longer one (1.0 if both empty)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k / n


def compare_sets(role: str, base: dict, trained: dict) -> dict:
    """One held-out set's entry of the results: base vs trained :func:`heldout_loss`."""
    return {"role": role, "blocks": trained["blocks"], "tokens": trained["tokens"],
            "base": {"loss": base["loss"], "ppl": base["ppl"]},
            "trained": {"loss": trained["loss"], "ppl": trained["ppl"]},
            "loss_change": trained["loss"] - base["loss"],
            "ppl_change": math.expm1(trained["loss"] - base["loss"])}


def greedy_summary(prompts: list[dict], tok, trained_ans: list, base_ans: list, max_new_tokens: int,
                   chat_template: bool) -> dict:
    """The ``greedy`` entry of the results: per-prompt answers of both models and their agreement."""
    items = []
    for rec, a, b in zip(prompts, trained_ans, base_ans):
        items.append({**rec, "base": tok.decode(b, skip_special_tokens=True),
                      "trained": tok.decode(a, skip_special_tokens=True),
                      "exact": a == b, "prefix_agreement": prefix_agreement(a, b),
                      "base_tokens": len(b), "trained_tokens": len(a)})
    return {
        "prompts": len(items), "max_new_tokens": max_new_tokens,
        "chat_template": bool(chat_template and getattr(tok, "chat_template", None)),
        "exact_match": sum(i["exact"] for i in items) / len(items),
        "prefix_agreement": sum(i["prefix_agreement"] for i in items) / len(items),
        "items": items}
