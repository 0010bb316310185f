"""Models and tokenizers loaded in one place, with one dtype policy: weights only from safetensors
(``use_safetensors=True`` always; pickle files can run code), ``trust_remote_code`` only when the
caller passes it.

Dtype names: ``"auto"`` is bfloat16 on a GPU and float32 on a CPU (evaluation, serving);
``"stored"`` keeps the checkpoint's own dtype (export); any other name is a torch dtype
(``"float32"``, ``"bfloat16"``, ...), and a ``torch.dtype`` passes through.
"""

from __future__ import annotations

from pathlib import Path

from llamapro.tensors import weight_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def resolve_device(device: str | None = "auto") -> str | None:
    """``"auto"``: cuda when there is a GPU, else cpu; anything else as given (None: leave it)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype, cuda: bool | None = None):
    """The torch dtype for a dtype name (see the module docstring); ``cuda`` (default: whether
    a GPU is available) decides ``"auto"``. ``"stored"`` gives transformers' ``"auto"``."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "stored":
        return "auto"
    if dtype == "auto":
        if cuda is None:
            cuda = torch.cuda.is_available()
        return torch.bfloat16 if cuda else torch.float32
    got = getattr(torch, str(dtype), None)
    if not isinstance(got, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return got


def load_model(model_dir, *, dtype="auto", device: str | None = None, trust_remote_code: bool = False,
               eval_mode: bool = True, check_weights: bool = True, **kw):
    """A causal LM from ``model_dir`` (a local directory or hub id).

    ``device``: None leaves the model where transformers put it (the CPU, or per ``device_map``),
    ``"auto"`` moves it to the GPU when there is one, else to the given device. ``"auto"`` dtype
    follows the target device. ``check_weights`` (pass False for a hub id) refuses a directory with pickle-only or
    missing weights with a clear :class:`CheckpointError` before transformers tries.
    ``eval_mode`` returns it in eval mode. Other keywords (``quantization_config``,
    ``device_map``, ...) go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    target = resolve_device(device)
    if check_weights:
        weight_files(Path(model_dir))
    cuda = None if target is None else str(target).startswith("cuda")
    if trust_remote_code:
        kw["trust_remote_code"] = True
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype, cuda),
                                                 use_safetensors=True, **kw)
    if target is not None:
        model = model.to(target)
    return model.eval() if eval_mode else model


def has_tokenizer(model_dir) -> bool:
    """Whether ``model_dir`` holds a tokenizer (tiny test models have none)."""
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir, *, trust_remote_code: bool = False, **kw):
    """The tokenizer of ``model_dir`` (``AutoTokenizer``); keywords such as ``gguf_file`` go to
    ``from_pretrained``."""
    from transformers import AutoTokenizer

    if trust_remote_code:
        kw["trust_remote_code"] = True
    return AutoTokenizer.from_pretrained(str(model_dir), **kw)


def load_config(model_dir, *, trust_remote_code: bool = False, **kw):
    """The transformers config of ``model_dir`` (``AutoConfig``)."""
    from transformers import AutoConfig

    if trust_remote_code:
        kw["trust_remote_code"] = True
    return AutoConfig.from_pretrained(str(model_dir), **kw)


# --- the KV cache's name: transformers 5.2x renames past_key_values -> cache ------------------------

def cache_kwarg(module, cache) -> dict:
    """``{"cache": cache}`` for a ``forward`` that takes ``cache`` (transformers 5.2x), else
    ``{"past_key_values": cache}`` (the old name, which newer versions accept with a warning)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def output_cache(out):
    """The KV cache of a model output under either name (reading the old one warns from 5.2x on)."""
    return out["cache"] if "cache" in out else out.past_key_values
