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

From a config, ``serve.engine: ray-llm`` selects this app instead of llamapro's own
(:func:`app_from_serve_config`; :func:`llm_app_args` shows what it is built from): each
``serve.models`` entry becomes one ``LLMConfig`` (``max_context`` -> ``max_model_len``,
``max_batch_size`` -> ``max_num_seqs``, its autoscaling's min/max replicas, ``dtype`` and ``vllm``
-> ``engine_kwargs``), and the ingress keeps the config's API key (``api_key_env`` or
``api_key_file``, compared by digest as llamapro's own ingress does), ``limits.max_tokens``, the
prompt limit (``limits.max_body_bytes`` characters) and the canary weights of the alias
(``served_model_name``). Without vLLM, or without a GPU on this machine or in the connected Ray
cluster, it refuses with a :class:`ServeLLMError` naming ``serve.engine`` and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path

from llamapro.errors import ServeLLMError


def gpu_llm_available() -> tuple[bool, str]:
    """(usable, why not): Ray Serve LLM needs vLLM installed and a CUDA GPU, on this machine or
    (when Ray is initialized) among the connected cluster's resources, where the engines go."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed (pip install vllm, on a machine with a CUDA GPU)"
    import torch

    if torch.cuda.is_available():
        return True, ""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        return True, ""
    return False, "no CUDA GPU is visible here or in the Ray cluster"


ENGINE_FIX = ("set serve.engine: llamapro (llamapro's own app, whose transformers engine serves on "
              "CPU), or deploy to a Ray cluster with GPUs and vLLM installed")


def require_ray_llm() -> None:
    """Refuse ``serve.engine: ray-llm`` where it cannot run, naming the key and the fix."""
    ok, why = gpu_llm_available()
    if not ok:
        raise ServeLLMError(f"serve.engine=ray-llm: Ray Serve LLM needs a GPU and vLLM ({why}); "
                            f"{ENGINE_FIX}")


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


def llm_config(name: str, model_dir, *, max_model_len: int | None = 4096, max_num_seqs: int = 64,
               min_replicas: int = 1, max_replicas: int = 1, accelerator_type: str | None = None,
               engine_kwargs: dict | None = None) -> dict:
    """One ``LLMConfig`` (as a dict, so it is built without importing vLLM) for a local model dir.
    ``max_model_len`` None leaves it to vLLM (the model's own context)."""
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise ServeLLMError(f"{p} is not a Hugging Face model directory (no config.json); "
                            "serve an `llamapro export` directory")
    ek = {"max_num_seqs": max_num_seqs, **(engine_kwargs or {})}
    if max_model_len:
        ek = {"max_model_len": max_model_len, **ek}
    cfg = {"model_loading_config": {"model_id": name, "model_source": str(p.resolve())},
           "engine_kwargs": ek,
           "deployment_config": {"autoscaling_config": {"min_replicas": min_replicas,
                                                        "max_replicas": max_replicas}}}
    if accelerator_type:
        cfg["accelerator_type"] = accelerator_type
    return cfg


def _check_request(body, request, key_sha256: bytes | None, limits: Limits) -> None:
    """401 without the key (compared by SHA-256 digest, in constant time), 400 past a limit."""
    import hmac

    from fastapi import HTTPException

    from llamapro.serve.auth import key_digest

    if key_sha256 is not None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(token.strip()), key_sha256):
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


class Router:
    """Which model a request goes to: a request naming ``alias`` (or no model) is sent to a model
    drawn by ``weights``; one naming ``canary.stable`` goes to ``canary.candidate`` with
    probability ``canary.fraction``; any other keeps its model."""

    def __init__(self, canary: Canary | None = None, alias: str | None = None,
                 weights: dict | None = None, seed: int | None = None):
        self.canary, self.alias = canary, alias
        self.weights = {k: float(v) for k, v in (weights or {}).items() if float(v) > 0}
        self.rng = random.Random(seed)

    def route(self, body):
        c = self.canary
        if self.alias and self.weights and body.model in (self.alias, None, ""):
            names = list(self.weights)
            body.model = self.rng.choices(names, [self.weights[n] for n in names])[0]
        elif c and body.model == c.stable and self.rng.random() < c.fraction:
            body.model = c.candidate
        return body


def guarded_ingress_cls():
    """Ray's OpenAiIngress with llamapro's API key, limits and canary in front (imports vLLM)."""
    from fastapi import Request
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    from llamapro.serve.auth import api_key_digest

    class LlamaproIngress(OpenAiIngress):
        def __init__(self, *args, api_key_env: str | None = None, api_key_file: str | None = None,
                     app_name: str = "llamapro", limits: dict | None = None, canary: dict | None = None,
                     alias: str | None = None, weights: dict | None = None, seed: int | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            # the key's digest: this replica's env var or key file, else what the deployer published
            self._key = api_key_digest({"api_key_env": api_key_env, "api_key_file": api_key_file},
                                       app_name)
            self._limits = Limits(**(limits or {}))
            self._router = Router(canary=Canary(**canary) if canary else None, alias=alias,
                                  weights=weights, seed=seed)

        async def completions(self, body: CompletionRequest, request: Request):
            _check_request(body, request, self._key, self._limits)
            return await super().completions(self._router.route(body), request)

        async def chat(self, body: ChatCompletionRequest, request: Request):
            _check_request(body, request, self._key, self._limits)
            return await super().chat(self._router.route(body), request)

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
    lim = limits or Limits()
    extra = {"api_key_env": api_key_env, "limits": {"max_tokens": lim.max_tokens,
                                                     "max_prompt_chars": lim.max_prompt_chars},
             "canary": dict(zip(("stable", "candidate", "fraction"), canary)) if canary else None}
    return _build([llm_config(n, d, **config_kw) for n, d in models.items()], extra)


def _build(configs: list[dict], extra: dict):
    from ray.serve.llm import LLMConfig, LLMServingArgs, build_openai_app

    return build_openai_app(LLMServingArgs(
        llm_configs=[LLMConfig(**c) for c in configs],
        ingress_cls_config={"ingress_cls": guarded_ingress_cls(), "ingress_extra_kwargs": extra}))


def llm_app_args(cfg) -> dict:
    """What the Ray Serve LLM app of a ``serve.engine: ray-llm`` config (a validated
    :class:`~llamapro.config.serve.ServeConfig`) is built from: ``llm_configs`` (one ``LLMConfig``
    dict per model) and ``ingress_extra_kwargs`` (key source, limits, canary). Pure: no vLLM."""
    from llamapro.demo import resolve_model

    configs = []
    for name, m in cfg.models.items():
        a = cfg.autoscaling_of(name)
        ek = dict(m.vllm)
        if m.dtype != "auto":
            ek.setdefault("dtype", m.dtype)
        if m.trust_remote_code:
            ek.setdefault("trust_remote_code", True)
        configs.append(llm_config(name, resolve_model(m.path), max_model_len=m.max_context or None,
                                  max_num_seqs=m.max_batch_size, min_replicas=a.min_replicas,
                                  max_replicas=a.max_replicas, engine_kwargs=ek))
    extra = {"app_name": cfg.app_name, "api_key_env": cfg.api_key_env or None,
             "api_key_file": cfg.api_key_file or None,
             "limits": {"max_tokens": cfg.limits.max_tokens,
                        "max_prompt_chars": cfg.limits.max_body_bytes},
             "alias": cfg.served_model_name, "weights": cfg.weights(), "seed": cfg.canary.seed,
             "canary": None}
    return {"llm_configs": configs, "ingress_extra_kwargs": extra}


def app_from_serve_config(cfg):
    """The Ray Serve LLM application of a ``serve.engine: ray-llm`` config; refuses (naming
    ``serve.engine`` and the fix) without vLLM and a GPU."""
    if getattr(cfg, "engine", "ray-llm") != "ray-llm":
        raise ServeLLMError(f"serve.engine={cfg.engine}: this builder is for serve.engine: ray-llm")
    require_ray_llm()
    args = llm_app_args(cfg)
    return _build(args["llm_configs"], args["ingress_extra_kwargs"])
