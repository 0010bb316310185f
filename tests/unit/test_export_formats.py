"""`llamapro export --format gguf|torchao-int8|...`: portable and quantized exports of a tiny
expanded Llama (real byte-level BPE tokenizer), read back by transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamapro.expansion import api as steps
from llamapro.artifacts import read_metadata, write_metadata
from llamapro.publish.gguf import GGUFExportError, export_gguf, permute_qk
from tests.tiny_models import _COMMON, FAMILY_CONFIGS
from tests.unit.eval_support import eval_cli as _cli

VOCAB = 320
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("Debian is a free operating system. The apt tool installs packages and resolves their "
        "dependencies. Python is a programming language that lets you work quickly. ") * 8
PROBE = "The apt tool installs Python packages quickly; Debian resolves 42 dependencies."


def bpe_tokenizer(out: Path):
    """A real byte-level BPE tokenizer (the GPT-2 / SmolLM2 / Qwen kind) trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=VOCAB - 4, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT
    tok.save_pretrained(out)
    return tok


def tiny(model_type: str, out: Path, seed: int = 0, **kw) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    args = {**_COMMON, **FAMILY_CONFIGS[model_type], "vocab_size": VOCAB, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 0, **kw}
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, num_hidden_layers=4, **args))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    m.save_pretrained(out)
    bpe_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Path:
    """A tiny Llama (tied embeddings, GQA) grown 4 -> 6 layers whose new blocks were 'trained'."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fmt")
    base = tiny("llama", root / "base", tie_word_embeddings=True)
    exp = root / "grown"
    steps.expand(str(base), str(exp), blocks=2, strategy="even", progress=False, verify=False)
    meta = read_metadata(exp)
    m = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if any(n.startswith(f"model.layers.{i}.") for i in meta["new_layer_indices"]):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    m.save_pretrained(exp)
    write_metadata(exp, meta)
    return exp


def _logits(d: Path, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(d), **kw)
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, **kw).eval()
    ids = tok(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ids, m(input_ids=ids).logits, tok, m


def test_permute_matches_transformers_reverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(16, 32).numpy()  # 2 kv heads of dim 8
    back = LlamaTensorProcessor({})._reverse_permute_weights(permute_qk(w, 4, 2), 4, 2)
    assert (back == w).all() and not (permute_qk(w, 4, 2) == w).all()


@pytest.mark.parametrize("quant,tol", [("f32", 1e-5), ("f16", 2e-2), ("bf16", 1e-1)])
def test_gguf_round_trip_matches_the_safetensors_logits(grown, tmp_path, quant, tol):
    out = tmp_path / f"g-{quant}"
    res = export_gguf(grown, out, quant=quant)
    assert sorted(p.name for p in out.iterdir()) == sorted(["llamapro.json", "README.md", "Modelfile", res["file"]])
    assert res["tied_embeddings"] and res["chat_template"] and res["num_layers"] == 6
    ids, ref, tok, _ = _logits(grown)
    gids, got, gtok, gm = _logits(out, res["file"])
    assert gm.config.num_hidden_layers == 6 and gm.config.tie_word_embeddings
    assert torch.equal(ids, gids)  # the embedded tokenizer tokenizes identically
    assert gtok.decode(gids[0]) == PROBE
    msgs = [{"role": "user", "content": "hi"}]
    assert (gtok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert (gtok.bos_token_id, gtok.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    err = (got - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), (quant, err)
    meta = json.loads((out / "llamapro.json").read_text())
    assert meta["export"]["format"] == "gguf" and meta["new_layer_indices"] == read_metadata(grown)["new_layer_indices"]


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_gguf_is_smaller_and_close(grown, tmp_path, quant):
    f32 = export_gguf(grown, tmp_path / "f32", quant="f32")
    res = export_gguf(grown, tmp_path / quant, quant=quant)
    assert res["tensor_types"].get(quant.upper(), 0) >= 6 * 7  # every block matrix quantized
    assert res["bytes"] < f32["bytes"] / (3 if quant == "q8_0" else 4)
    _, ref, _, _ = _logits(grown)
    _, got, _, _ = _logits(tmp_path / quant, res["file"])
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (0.05 if quant == "q8_0" else 0.3), rel


def test_qwen2_round_trip_is_exact_in_f32(tmp_path):
    d = tiny("qwen2", tmp_path / "qwen", use_sliding_window=False)
    res = export_gguf(d, tmp_path / "q", quant="f32")
    _, ref, _, _ = _logits(d)
    _, got, _, _ = _logits(tmp_path / "q", res["file"])
    assert (got - ref).abs().max().item() < 1e-5


def test_unsupported_requests_fail_clearly_and_write_nothing(grown, tmp_path, capsys):
    neox = tiny("gpt_neox", tmp_path / "neox")
    out = tmp_path / "never"
    with pytest.raises(GGUFExportError, match="does not support model_type 'gpt_neox'"):
        export_gguf(neox, out, quant="f16")
    with pytest.raises(GGUFExportError, match="quant type 'q4_k' cannot be written"):
        export_gguf(grown, out, quant="q4_k")
    assert _cli(["export", str(grown), str(out), "--format", "gguf", "--quant", "q2_k", "-q"]) == 2
    assert "cannot be written" in capsys.readouterr().err
    # a tokenizer that is not byte-level BPE (a character-level WordLevel one)
    from eval_support import char_tokenizer

    wl = tmp_path / "wordlevel"
    tiny("llama", wl)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (wl / f).unlink()
    char_tokenizer(wl)
    with pytest.raises(GGUFExportError, match="WordLevel"):
        export_gguf(wl, out, quant="f16")
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    # an existing export is never overwritten by a failed one
    good = tmp_path / "good"
    export_gguf(grown, good, quant="q8_0")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(GGUFExportError):
        export_gguf(neox, good, quant="f16", force=True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_cli_gguf(grown, tmp_path, capsys):
    out = tmp_path / "cli"
    assert _cli(["export", str(grown), str(out), "--format", "gguf", "--quant", "q8_0", "-q"]) == 0
    assert "model-Q8_0.gguf" in capsys.readouterr().out
    assert (out / "model-Q8_0.gguf").is_file()


def test_torchao_int8_export_loads_and_generates(grown, tmp_path):
    out = tmp_path / "int8"
    res = _cli_json(["export", str(grown), str(out), "--format", "torchao-int8", "-q", "--json"])
    assert res["quantization"]["quantized_linears"] == 6 * 7  # every block linear; the tied head is not
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "torchao"
    meta = json.loads((out / "llamapro.json").read_text())
    assert meta["quantization"]["scheme"] == "int8_weight_only" and meta["new_layer_indices"]
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    # plain transformers reads the quantization config back and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert "Int8" in type(m.model.layers[0].self_attn.q_proj.weight).__name__
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        g = m.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = m(input_ids=ids).logits
    assert g.shape[1] == ids.shape[1] + 5
    _, ref, _, _ = _logits(grown)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


def test_quantized_formats_that_need_a_gpu_refuse_on_cpu(grown, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal applies to CPU-only machines")
    for fmt in ("torchao-int4", "gptq", "awq"):
        out = tmp_path / fmt
        assert _cli(["export", str(grown), str(out), "--format", fmt, "-q"]) == 2
        assert "GPU" in capsys.readouterr().err and not out.exists()
    assert _cli(["export", str(grown), str(tmp_path / "x"), "--format", "torchao-int8", "--quant", "q8_0"]) == 2
    assert "--quant applies to --format gguf only" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_awq_export_on_gpu(grown, tmp_path, method):
    from llamapro.publish.quant import export_gptq

    out = tmp_path / method
    res = export_gptq(grown, out, method=method, texts=[TEXT[i:i + 200] for i in range(0, 1200, 200)])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert res["quantization"]["scheme"] == "W4A16"
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out, device_map="cuda").eval()
    ids = torch.tensor([[1, 5, 6, 7]], device="cuda")
    assert m.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] == 7


def _cli_json(argv) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert _cli(argv) == 0
    return json.loads(buf.getvalue())
