"""Helpers for the Serve tests: tiny models that speak SmolLM2's chat template, an isolated local Ray
cluster, free ports, an OpenAI client, and a load driver. Imported by tests/integration/test_serve*.py
and tests/e2e/test_serve_smollm2.py (tests/integration/conftest.py belongs to another suite)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

API_KEY = "sk-llamapro-test-" + "0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_chat_model(out: Path, seed: int = 0, layers: int = 2, context: int = 256) -> Path:
    """A random Llama (hidden 32) with SmolLM2's vocabulary, tokenizer and chat template.

    Weights are drawn wider than HF's init so greedy decoding wanders over the vocabulary instead of
    repeating one token: tests of stop strings and streaming need varied text (it is gibberish)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llamapro.demo import ensure_demo_model

    demo = ensure_demo_model()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(demo).save_pretrained(out)
    for name in ("chat_template.jinja",):
        if (demo / name).is_file() and not (out / name).is_file():
            shutil.copy(demo / name, out / name)
    return out


@contextlib.contextmanager
def local_ray(num_cpus: int = 4):
    """A fresh local cluster (never an existing one), torn down with Serve at the end."""
    import ray
    from ray import serve

    from llamapro.runtime import ensure_ray

    if ray.is_initialized():  # e.g. the data tests' session cluster: start from a clean one
        ray.shutdown()
    ensure_ray("serve tests", address="local", num_cpus=num_cpus, include_dashboard=False,
               log_to_driver=False, namespace="llamapro-serve-test")
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def openai_client(port: int, api_key: str = API_KEY, timeout: float = 120.0):
    from openai import OpenAI

    # max_retries=0: a test must see every error, not a retried success
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0,
                  timeout=timeout)


class LoadDriver:
    """Runs ``fn()`` repeatedly from ``threads`` threads until stopped (or ``max_requests`` done);
    counts outcomes. ``fn`` returns a label (e.g. the model that answered) or raises."""

    def __init__(self, fn, threads: int, max_requests: int = 100_000):
        self.fn, self.threads, self.max_requests = fn, threads, max_requests
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[tuple[float, str]] = []
        self.backpressure = 0
        self.errors: list[str] = []
        self._pool: ThreadPoolExecutor | None = None
        self._futs = []

    def _loop(self):
        import openai

        while not self.stop.is_set():
            with self.lock:
                if len(self.results) + len(self.errors) + self.backpressure >= self.max_requests:
                    return
            try:
                label = self.fn()
                with self.lock:
                    self.results.append((time.monotonic(), label))
            except openai.APIStatusError as e:
                with self.lock:
                    if e.status_code in (429, 503):
                        self.backpressure += 1
                    else:
                        self.errors.append(f"{e.status_code}: {e}")
            except Exception as e:  # connection errors, timeouts: all count
                with self.lock:
                    self.errors.append(repr(e))

    def __enter__(self):
        self._pool = ThreadPoolExecutor(self.threads)
        self._futs = [self._pool.submit(self._loop) for _ in range(self.threads)]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for f in self._futs:
            f.result()
        self._pool.shutdown()
        return False
