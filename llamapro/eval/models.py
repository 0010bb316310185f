"""The model under evaluation and the process it runs in: loading a checkpoint the evaluation way
(:mod:`llamapro.loading`, on the GPU when there is one), torch's thread count for a block of
work, and the process's peak memory."""

from __future__ import annotations

import contextlib
import resource

from llamapro import loading


def load_model(model_dir, dtype: str = "auto", trust_remote_code: bool = False):
    """A causal LM from safetensors only, on GPU when there is one, in eval mode."""
    return loading.load_model(model_dir, dtype=dtype, device="auto", trust_remote_code=trust_remote_code)


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
