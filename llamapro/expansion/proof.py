"""The identity proof: the expanded checkpoint, run on real prompts, gives its base's logits and
greedy generations (KV cache included); the numbers land in ``llamapro.json``. And the gate that
refuses to train an expansion whose proof did not pass.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from llamapro.artifacts import require_metadata, write_metadata
from llamapro.errors import CheckpointError, IdentityError, UnprovenError
from llamapro.expansion.resolve import resolve_local
from llamapro.loading import has_tokenizer, load_model, load_tokenizer

log = logging.getLogger(__name__)

# Real prompts of different kinds; the chat template is applied when the tokenizer has one.
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the factorial of n.",
    "Explain in one sentence why the sky is blue.",
    "Translate to French: The weather is nice today.",
)


def _load(model_dir, trust_remote_code: bool):
    return load_model(model_dir, dtype="float32", trust_remote_code=trust_remote_code)


def _prompt_batches(model_dir: Path, prompts, vocab: int):
    """Token id tensors for each prompt (chat template when the tokenizer has one); random ids
    when the checkpoint has no tokenizer (tiny test models)."""
    import torch

    tok = load_tokenizer(model_dir) if has_tokenizer(model_dir) else None
    out = []
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (1, 16), generator=g) for _ in range(len(prompts))], None
    for p in prompts:
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(p, return_tensors="pt")["input_ids"]
        out.append(ids)
    return out, tok


def verify_checkpoint(expanded: str, base: str | None = None, prompts=DEFAULT_PROMPTS,
                      max_new_tokens: int = 16, tolerance: float = 1e-5,
                      trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Prove that the expanded checkpoint computes what its base computed; record the numbers.

    Reference: ``base`` if given, else the recorded base path if it still exists, else the expanded
    model itself with its new blocks skipped (which holds the base's tensors). Raises
    :class:`IdentityError` if identity fails (after recording the failure).
    """
    import torch

    from llamapro.expansion.surgery import check_identity  # imports torch

    exp_dir = Path(expanded)
    meta = require_metadata(exp_dir)
    new_idx = meta["new_layer_indices"]
    ref = base or (meta.get("base") or {}).get("path")
    base_dir = None
    if ref:
        try:
            base_dir = resolve_local(ref)
        except CheckpointError:
            base_dir = None
    model = _load(exp_dir, trust_remote_code)
    base_model = _load(base_dir, trust_remote_code) if base_dir else None
    batches, tok = _prompt_batches(exp_dir, prompts, model.config.vocab_size)
    worst, bit, gen_ok, toks, gen_toks, samples = 0.0, True, True, 0, 0, []
    from tqdm.auto import tqdm

    for ids in tqdm(batches, desc="verify", unit="prompt", disable=not progress):
        rep = check_identity(model, new_idx, base=base_model, input_ids=ids,
                             max_new_tokens=max_new_tokens, tolerance=tolerance)
        worst = max(worst, rep.max_abs_logit_diff)
        bit &= rep.bit_identical
        gen_ok &= rep.generation_equal
        toks += rep.tokens_compared
        gen_toks += rep.generated_tokens
        if tok is not None and len(samples) < 2:
            with torch.no_grad():
                g = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
            samples.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    result = {
        "ok": worst <= tolerance and gen_ok,
        "reference": str(base_dir) if base_dir else "expanded model with new blocks skipped",
        "max_abs_logit_diff": worst,
        "bit_identical_logits": bit,
        "greedy_generation_equal": gen_ok,
        "prompts": len(batches),
        "prompt_tokens": toks,
        "generated_tokens_per_prompt": max_new_tokens,
        "tolerance": tolerance,
        "sample_generations": samples,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta["verification"] = result
    write_metadata(exp_dir, meta)
    if not result["ok"]:
        raise IdentityError(
            f"{exp_dir} is NOT an identity of its base: max |dlogits| = {worst:.3g} "
            f"(tolerance {tolerance}), greedy generation equal: {gen_ok}"
        )
    return meta


def require_proven(meta: dict | None, allow_unproven: bool = False, where: str = "the model") -> None:
    """Refuse an expansion (metadata with new layers) whose identity proof did not pass.

    ``verification`` missing, None, skipped (``status: unproven``: too large, or ``--no-verify``)
    and failed all count as unproven. A model without inserted layers (a baseline's base) has
    nothing to prove. ``allow_unproven`` (``--allow-unproven``, ``train.allow_unproven``) lets it
    through with a warning.
    """
    if not meta or not meta.get("new_layer_indices"):
        return
    v = meta.get("verification")
    if isinstance(v, dict) and v.get("ok") is True:
        return
    if not isinstance(v, dict):
        why = "its identity proof never ran or never finished (no verification recorded)"
    elif v.get("status") == "unproven":
        why = f"its identity proof was skipped ({v.get('reason')})"
    else:
        why = (f"its identity proof FAILED (max |dlogits| = {v.get('max_abs_logit_diff')}, greedy "
               f"generation equal: {v.get('greedy_generation_equal')})")
    if allow_unproven:
        log.warning("training %s although %s (allowed by allow_unproven)", where, why)
        return
    raise UnprovenError(
        f"{where} is an unproven expansion: {why}. Prove it with `llamapro verify <model dir>` "
        "(or expand again), or train anyway with `llamapro train --allow-unproven` "
        "(config: train.allow_unproven: true).")
