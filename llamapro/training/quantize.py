"""QLoRA-style training of the new blocks on a quantized base (``nf4`` or ``int8``), selected by
``train.quantize_base`` (:class:`~llamapro.config.train.TrainConfig` validates it; the worker loads
through :func:`llamapro.training.model.load_model`, and the run's output is written in full precision
by :mod:`llamapro.training.output` like any other run's).

The frozen ORIGINAL layers are loaded quantized with bitsandbytes (4-bit NF4 or LLM.int8; its
0.50 release runs both on x86-64 CPUs), while the inserted blocks stay in full precision and are
the only parameters that train (in full, or with LoRA on them as ``lora_new_blocks`` does): the
originals never change, so the memory they take is what quantization saves. The embedding, the
final norm and the head are not Linear layers of the blocks and stay full precision (frozen).

For library use outside ``llamapro train``, :func:`write_full_precision` publishes an ordinary
checkpoint from a trained model shard by shard (never the whole model in memory): every tensor of
the expanded checkpoint copied as it was (the originals bit-identical to the base), with the trained
new blocks' tensors put in their place. Nothing quantized is ever written.

bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 along a row: every Linear's input size
must be a multiple of 64 (true of real models; tiny test models must be built so).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from llamapro import loading
from llamapro.artifacts import (
    ExpansionMetadata,
    TrainingRecord,
    read_metadata,
    require_metadata,
    write_metadata,
)
from llamapro.config.train import QUANTIZE_BASES
from llamapro.errors import QuantizeError
from llamapro.tensors import atomic_dir, weight_files

__all__ = ["QUANTIZE_BASES", "QuantizeError", "bnb_config", "block_prefixes", "load_quantized_base",
           "trainable_names", "weight_bytes", "write_full_precision"]


def block_prefixes(indices) -> list[str]:
    return [f"model.layers.{int(i)}" for i in indices]


def bnb_config(kind: str, new_layer_indices, compute_dtype: str = "float32"):
    """transformers' BitsAndBytesConfig that quantizes every Linear but the new blocks' and the head."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", *block_prefixes(new_layer_indices)]  # matched at module boundaries
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                                  bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise QuantizeError(f"train.quantize_base must be one of {', '.join(QUANTIZE_BASES)}, got {kind!r}")


def load_quantized_base(model_dir, kind: str, new_layer_indices=None, compute_dtype: str = "float32",
                        trust_remote_code: bool = False):
    """The expanded model with its original layers quantized (``nf4``/``int8``) and frozen; the
    new blocks full precision and the only trainable parameters. ``new_layer_indices`` defaults
    to the checkpoint's llamapro.json."""
    if kind not in ("nf4", "int8"):
        raise QuantizeError(f"train.quantize_base must be nf4 or int8 to quantize (got {kind!r}); "
                            "'none' trains on the full-precision base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizeError("train.quantize_base needs bitsandbytes: pip install 'llamapro[quant]'")
    import torch

    model_dir = Path(model_dir)
    if new_layer_indices is None:
        new_layer_indices = require_metadata(model_dir).new_layer_indices
    if not new_layer_indices:
        raise QuantizeError(f"{model_dir} records no inserted blocks: there is nothing to train "
                            "beside a quantized base (expand it first)")
    model = loading.load_model(
        model_dir, quantization_config=bnb_config(kind, new_layer_indices, compute_dtype),
        dtype=getattr(torch, compute_dtype), device_map="cpu" if not torch.cuda.is_available() else None,
        trust_remote_code=trust_remote_code, check_weights=False)
    prefixes = tuple(p + "." for p in block_prefixes(new_layer_indices))
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    q = []
    for n, m in model.named_modules():
        if type(m).__name__ in ("Linear4bit", "Linear8bitLt"):
            q.append(n)
            # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first forward in
            # eval mode without grad (a held-out evaluation) and from then on computes through a kernel
            # without backward: the gradient to every new block below it would be cut. Training keeps
            # the trainable layout.
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if not q:
        raise QuantizeError(f"no Linear layer of {model_dir} was quantized; is it a decoder LLM?")
    if any(n.startswith(prefixes) for n in q):
        raise QuantizeError("a new block was quantized; the skip patterns did not match its modules")
    model.llamapro_quantized = {"kind": kind, "quantized_linears": len(q),
                                "new_layer_indices": list(new_layer_indices)}
    return model


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def weight_bytes(model) -> int:
    """Bytes the model's parameters and buffers take (quantized ones at their packed size)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
    return total


def write_full_precision(trained, expanded_dir, out, force: bool = False) -> dict:
    """An ordinary checkpoint from a quantized-base run: each shard of ``expanded_dir`` rewritten
    with the trained new blocks' tensors (cast to the shard's dtype) and every other tensor as it
    was; side files copied. Written atomically to ``out``."""
    from safetensors.torch import load_file, save_file

    expanded_dir = Path(expanded_dir)
    info = getattr(trained, "llamapro_quantized", None) or {}
    idx = info.get("new_layer_indices") or (read_metadata(expanded_dir) or ExpansionMetadata()).new_layer_indices
    prefixes = tuple(p + "." for p in block_prefixes(idx))
    new = {k: v.detach().cpu() for k, v in trained.state_dict().items() if k.startswith(prefixes)}
    if not new:
        raise QuantizeError("the trained model has no tensors of the new blocks")
    replaced = set()
    with atomic_dir(Path(out), force=force) as tmp:
        for f in expanded_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copyfile(f, tmp / f.name)
        for f in weight_files(expanded_dir):
            sd = load_file(f)
            for k in sd:
                if k in new:
                    if new[k].shape != sd[k].shape:
                        raise QuantizeError(f"{k}: trained shape {tuple(new[k].shape)} != {tuple(sd[k].shape)}")
                    sd[k] = new[k].to(sd[k].dtype).contiguous()
                    replaced.add(k)
            save_file(sd, tmp / f.name, metadata={"format": "pt"})
        missing = sorted(set(new) - replaced)
        if missing:
            raise QuantizeError(f"trained tensors not found in {expanded_dir}: {missing[:5]}")
        meta = read_metadata(expanded_dir) or ExpansionMetadata()
        training = meta.training or TrainingRecord()
        training["quantize_base"] = info.get("kind")
        meta.training = training
        write_metadata(tmp, meta)
    return {"out": str(out), "replaced_tensors": len(replaced)}
