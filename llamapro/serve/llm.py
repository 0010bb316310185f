"""The GPU serving path: Ray Serve LLM (``ray.serve.llm``: vLLM engines behind an OpenAI ingress).

``ray.serve.llm`` imports vLLM when it loads and vLLM needs a GPU, so this module imports it only
inside :func:`build_llm_app`; the hand-written transformers engine in :mod:`llamapro.serve` stays
the CPU path. What llamapro puts in front of vLLM here is its own ingress, a subclass of Ray's
``OpenAiIngress`` whose OpenAI routes first:

- check the API key (``Authorization: Bearer <key>``; the key is read from an environment variable
  named in the config, never stored in it or logged);
- enforce the request limits (``max_tokens``, prompt characters) with a 400 that says which;
- route a canary fraction of the requests for the stable model to the candidate model.

    app = build_llm_app({"stable": "runs/demo-export", "candidate": "runs/v2-export"},
                        canary=("stable", "candidate", 0.1), api_key_env="LLAMAPRO_API_KEY")
    serve.run(app)

Quantized exports serve as they are: a GPTQ/AWQ (compressed-tensors) directory needs nothing
else; a torchao one needs ``quantization="torchao"`` in ``engine_kwargs``.
"""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path

from llamapro.errors import ServeLLMError


def gpu_llm_available() -> tuple[bool, str]:
    """(usable, why not): Ray Serve LLM needs vLLM installed and a CUDA GPU visible."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed (pip install vllm, on a machine with a CUDA GPU)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible; use the transformers engine (llamapro serve) on CPU"
    return True, ""


@dataclass
class Limits:
    """Per-request limits enforced in front of vLLM."""

    max_tokens: int = 512
    """Largest ``max_tokens`` (or ``max_completion_tokens``) a request may ask for."""
    max_prompt_chars: int = 32000
    """Largest prompt (all message contents together), in characters."""


@dataclass
class Canary:
    """Send ``fraction`` of the requests for ``stable`` to ``candidate`` instead."""

    stable: str
    candidate: str
    fraction: float = 0.1
    """0..1; 0 sends everything to stable."""

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ServeLLMError(f"canary fraction must be within 0..1, got {self.fraction}")


def llm_config(name: str, model_dir, *, max_model_len: int = 4096, max_num_seqs: int = 64,
               min_replicas: int = 1, max_replicas: int = 1, accelerator_type: str | None = None,
               engine_kwargs: dict | None = None) -> dict:
    """One ``LLMConfig`` (as a dict, so it is built without importing vLLM) for a local model dir."""
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise ServeLLMError(f"{p} is not a Hugging Face model directory (no config.json); "
                            "serve an `llamapro export` directory")
    cfg = {"model_loading_config": {"model_id": name, "model_source": str(p.resolve())},
           "engine_kwargs": {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
                             **(engine_kwargs or {})},
           "deployment_config": {"autoscaling_config": {"min_replicas": min_replicas,
                                                        "max_replicas": max_replicas}}}
    if accelerator_type:
        cfg["accelerator_type"] = accelerator_type
    return cfg


def _check_request(body, request, api_key_env: str | None, limits: Limits) -> None:
    from fastapi import HTTPException

    if api_key_env:
        key = os.environ.get(api_key_env, "")
        got = request.headers.get("authorization", "")
        if not key or got != f"Bearer {key}":
            raise HTTPException(status_code=401,
                                detail="missing or wrong API key (Authorization: Bearer ...)")
    asked = getattr(body, "max_completion_tokens", None) or getattr(body, "max_tokens", None) or 0
    if asked > limits.max_tokens:
        raise HTTPException(status_code=400, detail=f"max_tokens {asked} exceeds this server's limit "
                                                    f"{limits.max_tokens}")
    msgs = getattr(body, "messages", None)
    text = (sum(len(str(m.get("content", "")) if isinstance(m, dict) else str(getattr(m, "content", "")))
                for m in msgs) if msgs is not None else len(str(getattr(body, "prompt", ""))))
    if text > limits.max_prompt_chars:
        raise HTTPException(status_code=400, detail=f"prompt of {text} characters exceeds this server's "
                                                    f"limit {limits.max_prompt_chars}")


def guarded_ingress_cls():
    """Ray's OpenAiIngress with llamapro's API key, limits and canary in front (imports vLLM)."""
    from fastapi import Request
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    class LlamaproIngress(OpenAiIngress):
        def __init__(self, *args, api_key_env: str | None = None, limits: dict | None = None,
                     canary: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._api_key_env, self._limits = api_key_env, Limits(**(limits or {}))
            self._canary = Canary(**canary) if canary else None

        def _route(self, body):
            c = self._canary
            if c and body.model == c.stable and random.random() < c.fraction:
                body.model = c.candidate
            return body

        async def completions(self, body: CompletionRequest, request: Request):
            _check_request(body, request, self._api_key_env, self._limits)
            return await super().completions(self._route(body), request)

        async def chat(self, body: ChatCompletionRequest, request: Request):
            _check_request(body, request, self._api_key_env, self._limits)
            return await super().chat(self._route(body), request)

    return LlamaproIngress


def build_llm_app(models: dict, *, canary: tuple | None = None, api_key_env: str | None = None,
                  limits: Limits | None = None, **config_kw):
    """The Ray Serve application: one vLLM deployment per model, llamapro's ingress in front.
    ``models`` maps served model names to export directories; ``config_kw`` goes to
    :func:`llm_config`. Refuses (ServeLLMError) without a GPU and vLLM."""
    ok, why = gpu_llm_available()
    if not ok:
        raise ServeLLMError(f"Ray Serve LLM needs a GPU and vLLM: {why}")
    if api_key_env and not os.environ.get(api_key_env):
        raise ServeLLMError(f"api key variable {api_key_env} is not set in the environment")
    if canary is not None:
        c = Canary(*canary)
        missing = {c.stable, c.candidate} - set(models)
        if missing:
            raise ServeLLMError(f"canary names {sorted(missing)} are not among the served models "
                                f"{sorted(models)}")
    from ray.serve.llm import LLMConfig, LLMServingArgs, build_openai_app

    configs = [LLMConfig(**llm_config(n, d, **config_kw)) for n, d in models.items()]
    lim = limits or Limits()
    extra = {"api_key_env": api_key_env, "limits": {"max_tokens": lim.max_tokens,
                                                     "max_prompt_chars": lim.max_prompt_chars},
             "canary": dict(zip(("stable", "candidate", "fraction"), canary)) if canary else None}
    return build_openai_app(LLMServingArgs(
        llm_configs=configs,
        ingress_cls_config={"ingress_cls": guarded_ingress_cls(), "ingress_extra_kwargs": extra}))
