"""``llamapro export --format gguf [--quant f16|bf16|q8_0|q4_0|...]``: one GGUF file for llama.cpp / Ollama.

Written with the ``gguf`` package's own writer, tensor-name map and numpy quantizers, laid out the
way llama.cpp's ``convert_hf_to_gguf.py`` lays it out, so llama.cpp, Ollama and transformers
(``from_pretrained(OUT, gguf_file=...)``) all read it:

- hyper-parameters under ``<arch>.*``; ``general.file_type`` says the quantization;
- the byte-level BPE tokenizer (tokens, token types, merges, special ids, add-bos) and the chat
  template; ``tokenizer.ggml.pre`` is llama.cpp's name for the pre-tokenizer, found by the same
  hash of a probe text's token ids llama.cpp uses (:mod:`llamapro.publish.gguf_pretok`);
- llama's q/k projections permuted to llama.cpp's rotary layout (transformers undoes it on load);
- 1-D tensors (norms) in F32; with a tied head no ``output.weight`` is written.

Quantized files: ``q8_0`` quantizes every matrix whose rows are a multiple of 32 (others F16, as
llama.cpp does); with the 4/5-bit types the embedding and head stay Q8_0 (as llama-quantize keeps
them at higher precision; the 4/5-bit numpy quantizers cover only the matrices in the blocks).

OUT is a directory: ``model-<QUANT>.gguf``, an Ollama ``Modelfile``, ``llamapro.json`` (lineage)
and a model card; it is written to a temporary sibling and renamed into place. Every check (the
architecture, the quant type, the tokenizer, the tensor names) runs before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from llamapro.artifacts import ExpansionMetadata, read_metadata, write_metadata
from llamapro.errors import GGUFExportError  # noqa: F401
from llamapro.loading import load_config, load_tokenizer
from llamapro.publish.card import CARD_FILE, gguf_card
from llamapro.publish.gguf_pretok import CHKTXT, PRE_TOKENIZERS
from llamapro.publish.source import check_destination, load_merged
from llamapro.tensors import atomic_dir

QUANTS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0",
          "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0",
              "q5_1": "MOSTLY_Q5_1"}
# HF model_type -> GGUF architecture name; q/k permuted for llama's rotary layout only.
ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False)}


def check_request(model_type: str, quant: str) -> None:
    """Refuse, before any work, an architecture or quant type this writer cannot produce."""
    if quant not in QUANTS:
        raise GGUFExportError(f"GGUF quant type {quant!r} cannot be written here; choose one of "
                              f"{', '.join(QUANTS)} (the gguf package quantizes only these; for "
                              "K-quants run llama.cpp's llama-quantize on the f16 file)")
    if model_type not in ARCHS:
        raise GGUFExportError(f"GGUF export does not support model_type {model_type!r}; supported: "
                              f"{', '.join(ARCHS)}. Export safetensors (--format hf) and convert with "
                              "llama.cpp's convert_hf_to_gguf.py instead")


def _check_config(cfg) -> None:
    """Settings that a GGUF of this arch cannot carry (and transformers would lose on load)."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise GGUFExportError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not written "
                              "by this GGUF exporter (transformers would not restore it on load)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.model_type == "llama" and getattr(cfg, flag, False):
            raise GGUFExportError(f"a llama with {flag}=true cannot round-trip through GGUF")


# --- tokenizer ------------------------------------------------------------------------------------

def _tokenizer_kind(ckpt: Path) -> str:
    p = ckpt / "tokenizer.json"
    if not p.is_file():
        raise GGUFExportError(f"{ckpt} has no tokenizer.json; GGUF export embeds the tokenizer and "
                              "needs a fast (tokenizers) byte-level BPE tokenizer")
    tj = json.loads(p.read_text(encoding="utf-8"))
    kind = (tj.get("model") or {}).get("type")
    blob = json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder"))
    if kind != "BPE" or "ByteLevel" not in blob:
        raise GGUFExportError(f"{ckpt}'s tokenizer is {kind or 'unknown'} "
                              f"{'with' if 'ByteLevel' in blob else 'without'} byte-level pre-tokenization; "
                              "GGUF export writes byte-level BPE (gpt2-style) tokenizers only")
    return "gpt2"


def vocab(ckpt: Path, vocab_size: int):
    """(tokens, token types, pre-tokenizer name, notes) as llama.cpp's get_vocab_base builds them."""
    import gguf

    tok = load_tokenizer(ckpt)
    v = tok.get_vocab()
    if max(v.values()) >= vocab_size:
        raise GGUFExportError(f"tokenizer has ids up to {max(v.values())} but the model's vocab is {vocab_size}")
    chkhsh = hashlib.sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    notes = []
    pre = PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        pre = "default"
        notes.append(f"pre-tokenizer not in llama.cpp's table (hash {chkhsh[:12]}); wrote 'default'")
    reverse = {i: t for t, i in v.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                t = tok.decode(tok.encode(t, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, types, pre, notes


# --- tensors --------------------------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's half-split rotary layout -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def plan_tensors(model, arch_name: str, permute: bool, quant: str):
    """[(gguf name, fp32 array, GGML type)] for every weight, or an error naming the first tensor
    the name map does not know. Nothing is quantized yet (that is done while writing)."""
    import gguf

    cfg = model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    nmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    qt = gguf.GGMLQuantizationType
    main = getattr(qt, QUANTS[quant])
    low_bit = quant.startswith(("q4", "q5"))
    out = []
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, dot, suffix = hf_name.rpartition(".")
        g = nmap.get_name(base)
        if g is None:
            raise GGUFExportError(f"tensor {hf_name} has no GGUF name for arch {arch_name}; "
                                  "this checkpoint cannot be exported as GGUF")
        a = t.detach().float().cpu().numpy()
        if permute and base.endswith("self_attn.q_proj"):
            a = permute_qk(a, cfg.num_attention_heads, cfg.num_attention_heads)
        elif permute and base.endswith("self_attn.k_proj"):
            a = permute_qk(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        name = f"{g}.{suffix}"
        if a.ndim <= 1 or name.endswith("_norm.weight") or suffix != "weight":
            typ = qt.F32
        elif low_bit and g in ("token_embd", "output"):
            typ = qt.Q8_0
        else:
            typ = main
        out.append((name, a, typ))
    return out


def _encode(a: np.ndarray, typ):
    """(bytes array, the type actually written): a matrix whose rows do not divide into the
    type's blocks falls back to F16, as llama.cpp's converter does."""
    import gguf

    qt = gguf.GGMLQuantizationType
    if typ == qt.F32:
        return a.astype(np.float32), qt.F32
    if typ == qt.F16:
        return a.astype(np.float16), qt.F16
    try:
        return gguf.quants.quantize(a, typ), typ
    except gguf.QuantError:
        return a.astype(np.float16), qt.F16


# --- the export -----------------------------------------------------------------------------------

def write_gguf(model, ckpt: Path, path: Path, quant: str, name: str, say=None) -> dict:
    """Write ``model`` (loaded from ``ckpt``, whose tokenizer is embedded) to the file ``path``."""
    import gguf

    say = say or (lambda m: None)
    cfg = model.config
    check_request(cfg.model_type, quant)
    _check_config(cfg)
    _tokenizer_kind(ckpt)
    arch_name, permute = ARCHS[cfg.model_type]
    tokens, types, pre, notes = vocab(ckpt, cfg.vocab_size)
    special = gguf.SpecialVocab(ckpt, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise GGUFExportError(f"{ckpt}'s tokenizer has no BPE merges to embed")
    plan = plan_tensors(model, arch_name, permute, quant)  # every name checked before writing

    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch_name == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
    if quant not in ("f32", "f16", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    written: dict[str, int] = {}
    for i, (tname, a, typ) in enumerate(plan):
        data, real = _encode(a, typ)
        w.add_tensor(tname, data, raw_dtype=real)
        written[real.name] = written.get(real.name, 0) + 1
    say(f"writing {len(plan)} tensors ({', '.join(f'{n} {k}' for k, n in sorted(written.items()))})")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"arch": arch_name, "quant": quant, "tensor_types": written, "tokenizer_pre": pre,
            "chat_template": special.chat_template is not None, "notes": notes,
            "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))}


def gguf_file_name(quant: str) -> str:
    return f"model-{QUANTS[quant]}.gguf"


def export_gguf(src, out, quant: str = "f16", force: bool = False, trust_remote_code: bool = False,
                say=None) -> dict:
    """Export a run (RUN/model) or checkpoint to the directory ``out`` holding one GGUF file."""
    import torch

    say = say or (lambda m: None)
    quant = quant.lower()
    run, ckpt, out = check_destination(src, out, force)
    cfg = load_config(ckpt, trust_remote_code=trust_remote_code) if (ckpt / "config.json").is_file() else None
    if cfg is not None:  # refuse before loading weights
        check_request(cfg.model_type, quant)
        _check_config(cfg)
        _tokenizer_kind(ckpt)
    meta = read_metadata(ckpt) or {}
    say(f"loading {ckpt}")
    model, info = load_merged(ckpt, "float32", trust_remote_code, say)
    fname = gguf_file_name(quant)
    with atomic_dir(out, force=force) as tmp:
        with torch.no_grad():
            tok_dir = ckpt if (ckpt / "tokenizer.json").is_file() else Path(info["weights_from"])
            res = write_gguf(model, tok_dir, tmp / fname, quant, out.name, say)
        (tmp / "Modelfile").write_text(f"FROM ./{fname}\n", encoding="utf-8")
        size = (tmp / fname).stat().st_size
        export_info = {"name": out.name, "from": str(ckpt.resolve()), "format": "gguf",
                       "file": fname, "bytes": size,
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "merged_adapter": info["merged_adapter"], "num_layers": model.config.num_hidden_layers,
                       **res}
        new_meta = ExpansionMetadata(meta if meta else {"new_layer_indices": []})
        new_meta.update(kind="exported", export=export_info)
        write_metadata(tmp, new_meta)
        (tmp / CARD_FILE).write_text(gguf_card(new_meta, export_info), encoding="utf-8")
    return {"out": str(out), "path": str(out / fname), **export_info}

