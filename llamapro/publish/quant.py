"""Quantized HF-directory exports: ``--format torchao-int8|torchao-int4|gptq|awq``.

- **torchao** weight-only quantization (``TorchAoConfig``): the directory carries its
  ``quantization_config`` in config.json, so plain ``AutoModelForCausalLM.from_pretrained(OUT)``
  (with torchao installed) gives the quantized model back. int8 runs on any CPU; torchao's int4
  weight-only kernels need CUDA (or mslk), so ``torchao-int4`` refuses without a GPU.
- **gptq / awq** through llm-compressor (the maintained successor of AutoGPTQ / AutoAWQ): W4A16
  with a calibration pass over real text, saved in the compressed-tensors format vLLM serves.
  The calibration needs a GPU in practice; without one the export refuses before loading.

Each writes OUT through :func:`llamapro.publish.standard_dir.write_standard_dir`'s atomic path (temporary sibling,
renamed into place) with the lineage and a model card, like the full-precision export.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import shutil
import tempfile
from pathlib import Path

from llamapro.artifacts import ExpansionMetadata, read_metadata, write_metadata
from llamapro.data.corpora import DEBIAN_REFERENCE, _read, python_doc_root
from llamapro.errors import QuantExportError  # noqa: F401
from llamapro.loading import load_model, load_tokenizer
from llamapro.publish.card import CARD_FILE, quantization_section
from llamapro.publish.source import ADAPTER_CONFIG, check_destination, find_adapter, load_merged
from llamapro.publish.standard_dir import write_standard_dir
from llamapro.tensors import atomic_dir, copy_side_files


def _need(module: str, extra: str = "quant") -> None:
    if importlib.util.find_spec(module) is None:
        raise QuantExportError(f"this export needs the {module!r} package: pip install 'llamapro[{extra}]'")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torchao_config(scheme: str):
    """transformers' TorchAoConfig for ``int8`` / ``int4`` weight-only quantization."""
    _need("torchao")
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if scheme == "int8":
        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    if scheme == "int4":
        if not has_cuda():
            raise QuantExportError("torchao int4 weight-only needs a CUDA GPU (torchao 0.18's int4 "
                                   "layouts run on CUDA/XPU or with mslk only); on CPU use "
                                   "--format torchao-int8 or --format gguf --quant q4_0")
        return TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=128))
    raise QuantExportError(f"unknown torchao scheme {scheme!r}; choose int8 or int4")


def _plain_dir(ckpt: Path, trust_remote_code: bool, say) -> tuple[Path, Path | None, dict]:
    """A directory of full weights to quantize from: the checkpoint itself, or (when a PEFT
    adapter must be merged first) a temporary merged copy, returned second to delete after."""
    if find_adapter(ckpt) is None:
        return ckpt, None, {"merged_adapter": None, "weights_from": str(ckpt)}
    model, info = load_merged(ckpt, "auto", trust_remote_code, say)
    tmp = Path(tempfile.mkdtemp(prefix="llamapro-merged-"))
    model.save_pretrained(tmp)
    copy_side_files(Path(info["weights_from"]), tmp, skip=(CARD_FILE,))
    copy_side_files(ckpt, tmp, skip=(CARD_FILE, ADAPTER_CONFIG, "adapter_model.safetensors"))
    return tmp, tmp, info


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).iterdir() if p.is_file())


def export_torchao(src, out, scheme: str = "int8", force: bool = False, trust_remote_code: bool = False,
                   say=None) -> dict:
    """Weight-only quantize a run or checkpoint with torchao; OUT loads with from_pretrained."""
    import torch

    say = say or (lambda m: None)
    run, ckpt, out = check_destination(src, out, force)
    qc = torchao_config(scheme)  # refuses int4 on CPU before any loading
    meta = read_metadata(ckpt) or {}
    plain, cleanup, info = _plain_dir(ckpt, trust_remote_code, say)
    try:
        say(f"loading {plain} with torchao {scheme} weight-only quantization")
        model = load_model(plain, dtype="float32", quantization_config=qc, trust_remote_code=trust_remote_code)
        q = {"method": "torchao", "scheme": f"{scheme}_weight_only",
             "quantized_linears": sum(1 for m in model.modules()
                                      if isinstance(m, torch.nn.Linear)
                                      and type(m.weight).__name__ not in ("Parameter", "Tensor"))}
        res = write_standard_dir(model, out, plain, run, meta, info, None, force=force,
                                 max_shard_size="50GB", dtype="float32", say=say,
                                 extra_meta={"quantization": q},
                                 card_sections=quantization_section(scheme, q["quantized_linears"]))
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    return {**res, "path": res["out"], "bytes": _dir_bytes(out), "quantization": q}


# --- GPTQ / AWQ through llm-compressor ------------------------------------------------------------

def gptq_recipe(method: str, scheme: str = "W4A16"):
    """The llm-compressor recipe: GPTQ or AWQ on every Linear but the head."""
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    if method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return AWQModifier(targets=["Linear"], scheme=scheme, ignore=["lm_head"])
    raise QuantExportError(f"unknown method {method!r}; choose gptq or awq")


def calibration_texts(n: int = 64) -> list[str]:
    """Real calibration text: chunks of the Python documentation's sources (python3-doc)."""
    texts: list[str] = []
    root = python_doc_root()
    for f in sorted(glob.glob(f"{root}/**/*.txt", recursive=True)) if root else []:
        t = Path(f).read_text(encoding="utf-8", errors="replace")
        for i in range(0, len(t), 2000):
            texts.append(t[i:i + 2000])
            if len(texts) >= n:
                return texts
    if not texts:
        raise QuantExportError("no calibration text found (install python3-doc or pass texts)")
    return texts


def export_gptq(src, out, method: str = "gptq", force: bool = False, trust_remote_code: bool = False,
                say=None, texts: list[str] | None = None, max_seq_length: int = 512) -> dict:
    """W4A16 GPTQ/AWQ with llm-compressor; refuses clearly without a GPU or the package."""
    say = say or (lambda m: None)
    if method not in ("gptq", "awq"):
        raise QuantExportError(f"unknown method {method!r}; choose gptq or awq")
    run, ckpt, out = check_destination(src, out, force)
    if not has_cuda():
        raise QuantExportError(f"--format {method} calibrates with llm-compressor and needs a CUDA GPU; "
                               "on this CPU-only machine use --format gguf --quant q4_0/q8_0 or "
                               "--format torchao-int8, or run this export where a GPU is present")
    _need("llmcompressor", "gptq")
    from datasets import Dataset
    from llmcompressor import oneshot

    meta = read_metadata(ckpt) or {}
    plain, cleanup, info = _plain_dir(ckpt, trust_remote_code, say)
    try:
        tok = load_tokenizer(plain)
        model = load_model(plain, dtype="bfloat16", trust_remote_code=trust_remote_code, eval_mode=False)
        texts = texts or calibration_texts()
        ds = Dataset.from_dict(dict(tok(texts, truncation=True, max_length=max_seq_length)))
        say(f"{method}: calibrating on {len(texts)} texts")
        oneshot(model=model, dataset=ds, recipe=gptq_recipe(method), max_seq_length=max_seq_length,
                num_calibration_samples=len(texts))
        with atomic_dir(out, force=force) as tmp:
            model.save_pretrained(tmp, save_compressed=True)
            copy_side_files(plain, tmp, skip=(CARD_FILE, ADAPTER_CONFIG, "adapter_model.safetensors"))
            q = {"method": f"llmcompressor-{method}", "scheme": "W4A16", "calibration_texts": len(texts)}
            new_meta = ExpansionMetadata(meta if meta else {"new_layer_indices": []})
            new_meta.update(kind="exported", quantization=q,
                            export={"format": method, "from": str(ckpt), **info})
            write_metadata(tmp, new_meta)
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    return {"out": str(out), "path": str(out), "bytes": _dir_bytes(out), "quantization": q}


# --- quality of a quantized export ----------------------------------------------------------------

def heldout_windows(tok, n: int = 8, seq: int = 256, source: str = "debian-reference"):
    """``n`` windows of ``seq`` token ids of real text no model here was trained on: the Debian
    Reference (debian-reference-en, GPL-2+) or the Python tutorial (python3-doc, PSF-2.0), read
    from their Debian packages, taken evenly spaced through the text."""
    import torch

    if source == "debian-reference":
        if not Path(DEBIAN_REFERENCE).is_file():
            raise QuantExportError(f"{DEBIAN_REFERENCE} missing: apt-get install debian-reference-en")
        text = _read(DEBIAN_REFERENCE)
    else:
        root = python_doc_root()
        if root is None:
            raise QuantExportError("python3-doc is not installed: apt-get install python3-doc")
        text = "\n\n".join(Path(f).read_text(encoding="utf-8")
                           for f in sorted(Path(root, "tutorial").glob("*.txt")))
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    if len(ids) < n * seq:
        raise QuantExportError(f"{source} has only {len(ids)} tokens; need {n * seq}")
    step = (len(ids) - seq) // n
    return torch.stack([ids[i * step:i * step + seq] for i in range(n)])


def perplexity(model, windows) -> float:
    """exp(mean next-token loss) over the windows (each scored on its own)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            out = model(input_ids=w[None], labels=w[None])
            total += out.loss.item() * (len(w) - 1)
            count += len(w) - 1
    return math.exp(total / count)
