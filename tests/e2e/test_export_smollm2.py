"""The real SmolLM2-135M-Instruct exported as GGUF: transformers reads it back with the same
logits (f16: exactly those of the weights rounded to f16; bf16 is covered by the unit tests) and, quantized to Q8_0,
with held-out perplexity on real text within 5% of the full-precision model's."""

import copy

import pytest
import torch

from llamapro.publish.gguf import export_gguf
from llamapro.publish.quant import heldout_windows, perplexity

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamapro.demo import ensure_demo_model

    d = ensure_demo_model()
    return d, AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _load(out, res):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = res["file"]
    return (AutoTokenizer.from_pretrained(out, gguf_file=f),
            AutoModelForCausalLM.from_pretrained(out, gguf_file=f, dtype=torch.float32).eval())


def test_f16_gguf_logits_match_and_it_chats(demo, tmp_path):
    d, tok, ref = demo
    res = export_gguf(d, tmp_path / "f16", quant="f16")
    assert res["tokenizer_pre"] == "smollm" and res["chat_template"] and res["tied_embeddings"]
    gtok, m = _load(tmp_path / "f16", res)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    kw = dict(add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = tok.apply_chat_template(msgs, **kw)["input_ids"]
    gids = gtok.apply_chat_template(msgs, **kw)["input_ids"]
    assert torch.equal(ids, gids)
    rounded = copy.deepcopy(ref)  # the same model with its weights rounded to f16 (no fresh init)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.float16).float())
    with torch.no_grad():
        want, got, full = rounded(input_ids=ids).logits, m(input_ids=ids).logits, ref(input_ids=ids).logits
        answer = m.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert (got - want).abs().max().item() < 1e-4  # same computation as the f16-rounded weights
    print(f"f16 GGUF vs fp32 safetensors: max |dlogit| {(got - full).abs().max().item():.3g}")
    assert (got.argmax(-1) == full.argmax(-1)).float().mean().item() > 0.9
    assert "Paris" in gtok.decode(answer[0, ids.shape[1]:])


def test_q8_0_gguf_perplexity_is_close(demo, tmp_path):
    d, tok, ref = demo
    res = export_gguf(d, tmp_path / "q8", quant="q8_0")
    _, m = _load(tmp_path / "q8", res)
    windows = heldout_windows(tok, n=4, seq=256)
    p_ref, p_q = perplexity(ref, windows), perplexity(m, windows)
    print(f"held-out perplexity (Debian Reference, 4x256 tokens): fp32 {p_ref:.3f}, Q8_0 GGUF {p_q:.3f}")
    assert 1.0 < p_ref < 60 and abs(p_q / p_ref - 1) < 0.05
