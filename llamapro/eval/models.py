"""Models for evaluation: loading a checkpoint (safetensors only, GPU when there is one), the torch
thread count for a block of work, and the process's peak memory."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

from llamapro.checkpoint import weight_files


def _torch_dtype(name: str, cuda: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def load_model(model_dir, dtype: str = "auto", trust_remote_code: bool = False):
    """A causal LM from safetensors only, on GPU when there is one, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    weight_files(Path(model_dir))  # refuses pickle-only / missing weights with a clear message
    cuda = torch.cuda.is_available()
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_torch_dtype(dtype, cuda),
                                             use_safetensors=True,
                                             trust_remote_code=trust_remote_code)
    return m.to("cuda" if cuda else "cpu").eval()


def load_tokenizer(model_dir):
    """The checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def has_tokenizer(d: Path) -> bool:
    """Whether a model directory carries a tokenizer."""
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                           "tokenizer_config.json"))


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch CPU threads = ``n`` inside the block (0: unchanged), restored after."""
    import torch

    threads = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
