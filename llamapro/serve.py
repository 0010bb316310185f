"""Ray Serve: an OpenAI-compatible endpoint with dynamic batching, autoscaling and a canary split.

    llamapro serve --config jobs/configs/serve_demo.yaml                  # local, blocks until Ctrl-C
    llamapro serve --config CFG --print-serve-config > serve.yaml && serve deploy serve.yaml
    serve run serve.yaml                                  # the same file; its host/port apply
    serve run llamapro.serve:build_app config=CFG         # Serve's own HTTP defaults (port 8000)

One application, two kinds of deployment:

``ingress``         FastAPI: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (SSE when
                    ``stream``), ``/health``. Checks the optional Bearer key, validates the request,
                    routes it: a request naming a model goes to that model; a request naming the alias
                    (``served_model_name``) or no model is routed by the canary weights. Weights and
                    limits are its ``user_config``: redeploying a config that only changes them calls
                    ``reconfigure`` on the live replica (no restart, no dropped request).
``model-<name>``    one per model: an engine (transformers here; vLLM when a GPU and vllm are present).
                    Tokenizing, the chat template and the context check run on the replica's event
                    loop; ``@serve.batch`` groups concurrent arrivals into one admission (one prefill);
                    generation runs on one engine thread, off the event loop, batching continuously
                    (a request joins the running batch at the next token, leaves it when done).

The config tree (``ServeConfig``) lives here until it joins ``llamapro.config``. Keys that can change
while serving (canary weights, limits, autoscaling, batch sizes, queue limits) are deployment options or
``user_config``; everything else is an argument of ``build_app`` and changing it restarts replicas.
"""

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import hmac
import importlib.util
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# No `from __future__ import annotations` here: FastAPI must see the real `Request` class in the
# ingress methods' signatures (under Serve a string annotation turns it into a query parameter).
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from .config import ConfigError, from_dict

log = logging.getLogger("ray.serve")

IMPORT_PATH = "llamapro.serve:build_app"
INGRESS_NAME = "ingress"
ENGINES = ("auto", "transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The dotted path of the section being built, so a nested section's __post_init__ names its full key
# (serve.models.base.autoscaling.max_replicas) however it was reached.
_PATH: contextvars.ContextVar[str] = contextvars.ContextVar("llamapro_serve_path", default="serve")


def _key(name: str) -> str:
    return f"{_PATH.get()}.{name}"


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


@contextlib.contextmanager
def _quiet_ray_deprecations():
    """Ray 2.60 marks ``metrics_interval_s`` deprecated (to become env vars) yet still uses it as the
    only per-deployment push interval; don't repeat that warning on every validation."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*",
                                category=DeprecationWarning)
        yield


# --- config ---------------------------------------------------------------------------------------

@dataclass
class AutoscalingConfig:
    """Replica autoscaling of one model deployment (Ray Serve's ``autoscaling_config``).

    Ray accepts a misspelled key here without a word; llamapro rejects unknown keys and checks every
    value, then checks the result once more against Ray's own schema when the app is built."""

    min_replicas: int = 1
    """Replicas kept up with no traffic. 0 scales to zero (the next request waits for a cold start)."""
    max_replicas: int = 1
    """Upper bound; each replica needs ``num_cpus``/``num_gpus`` of its model free in the cluster."""
    initial_replicas: int | None = None
    """Replicas at first deploy (default: min_replicas)."""
    target_ongoing_requests: float = 4.0
    """Requests (running + queued) per replica the autoscaler aims for. A replica batches up to
    ``max_batch_size`` requests at once, so a target of about half of it keeps batches full while
    still scaling out before requests queue for a whole generation."""
    upscale_delay_s: float = 10.0
    """How long load must stay above target before adding replicas (Ray's default is 30 s)."""
    downscale_delay_s: float = 120.0
    """How long load must stay below target before removing replicas (Ray's default is 600 s)."""
    metrics_interval_s: float = 2.0
    """How often replicas and handles report load to the controller (Ray's default is 10 s)."""
    look_back_period_s: float = 10.0
    """Window the reported load is averaged over (Ray's default is 30 s)."""
    upscaling_factor: float | None = None
    """Multiplier damping (<1) or amplifying (>1) each upscale decision; None = Ray's default."""
    downscaling_factor: float | None = None
    """Multiplier damping (<1) or amplifying (>1) each downscale decision; None = Ray's default."""

    def __post_init__(self):
        if self.min_replicas < 0:
            raise ConfigError(f"{_key('autoscaling.min_replicas')}={self.min_replicas}: must be >= 0")
        if self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(f"{_key('autoscaling.max_replicas')}={self.max_replicas}: must be >= 1 "
                              f"and >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ConfigError(f"{_key('autoscaling.initial_replicas')}={self.initial_replicas}: must "
                              f"lie in [min_replicas, max_replicas] = "
                              f"[{self.min_replicas}, {self.max_replicas}]")
        for name in ("target_ongoing_requests", "metrics_interval_s", "look_back_period_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_key('autoscaling.' + name)}={getattr(self, name)}: must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_key('autoscaling.' + name)}={getattr(self, name)}: must be >= 0")
        for name in ("upscaling_factor", "downscaling_factor"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{_key('autoscaling.' + name)}={v}: must be > 0 (or null)")

    def to_ray(self) -> dict:
        """The ``autoscaling_config`` dict for Ray, checked against Ray's own schema."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        from ray.serve.config import AutoscalingConfig as RayAutoscaling

        try:
            with _quiet_ray_deprecations():
                RayAutoscaling(**d)
        except Exception as e:  # pydantic ValidationError; keep this module free of pydantic types
            raise ConfigError(f"{_key('autoscaling')}: Ray rejects {d}: {e}") from None
        return d


@dataclass
class ModelServeConfig:
    """One model behind the endpoint; its name is its key under ``serve.models``."""

    path: str = ""
    """HF model directory (a plain export, or an expanded checkpoint), a hub id, or
    ``demo:smollm2-135m-instruct``. Must be readable where the replica runs."""
    engine: str = "auto"
    """auto: vLLM when the replica sees a GPU and ``import vllm`` works, else transformers.
    transformers: batched token loop in PyTorch (CPU or GPU). vllm: vLLM's AsyncLLMEngine (GPU;
    the code path exists but is untested in llamapro's CI, which has no GPU)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."""
    device: str = "auto"
    """transformers engine only: auto (cuda when visible, else cpu), cpu, cuda, cuda:N."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    num_cpus: float = 1.0
    """Ray logical CPUs reserved per replica (also the default torch thread count, rounded up)."""
    num_gpus: float = 0.0
    """GPUs per replica. Set 1 for vLLM; with 0 the replica sees no GPU and uses transformers."""
    torch_threads: int = 0
    """torch intra-op threads of the engine; 0 = ceil(num_cpus)."""
    max_context: int = 0
    """Prompt + completion token limit; 0 = the model's ``max_position_embeddings``."""
    max_batch_size: int = 8
    """Most requests generated together in one batch (``@serve.batch``). Live: changeable by
    redeploying without restarting replicas."""
    batch_wait_timeout_s: float = 0.01
    """How long the first request of a batch waits for others. Live."""
    max_ongoing_requests: int = 0
    """Requests a replica accepts at once (running batch + next batch); 0 = 2 x max_batch_size.
    Must be >= max_batch_size or batches can never fill. Live."""
    max_queued_requests: int = -1
    """Requests allowed to wait for a replica beyond that; more get HTTP 503 (backpressure).
    -1 = unbounded. Live."""
    autoscaling: dict | None = None
    """Overrides of ``serve.autoscaling`` for this model (merged key by key)."""
    vllm: dict = field(default_factory=dict)
    """Extra ``vllm.AsyncEngineArgs`` for the vLLM engine, e.g. {gpu_memory_utilization: 0.8}."""

    def __post_init__(self):
        for name in ("autoscaling", "vllm"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{_key(name)}: expected a mapping, got {v!r}")
        if not self.path:
            raise ConfigError(f"{_key('path')}: required (an HF model directory, hub id or "
                              "demo:smollm2-135m-instruct)")
        if self.engine not in ENGINES:
            raise ConfigError(f"{_key('engine')}={self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{_key('dtype')}={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"{_key('device')}={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"{_key('num_cpus')}/{_key('num_gpus')}: must be >= 0")
        for name in ("torch_threads", "max_context"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_key(name)}={getattr(self, name)}: must be >= 0 (0 = automatic)")
        if self.max_batch_size < 1:
            raise ConfigError(f"{_key('max_batch_size')}={self.max_batch_size}: must be >= 1")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError(f"{_key('batch_wait_timeout_s')}={self.batch_wait_timeout_s}: "
                              "must be >= 0")
        if self.max_ongoing_requests and self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(f"{_key('max_ongoing_requests')}={self.max_ongoing_requests}: must be "
                              f">= max_batch_size ({self.max_batch_size}) or batches never fill")
        if self.max_queued_requests < -1:
            raise ConfigError(f"{_key('max_queued_requests')}={self.max_queued_requests}: "
                              "-1 (unbounded) or >= 0")

    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def threads(self) -> int:
        return self.torch_threads or max(1, math.ceil(self.num_cpus))


@dataclass
class CanaryConfig:
    """How requests that do not name a model (or name the alias) are split between models."""

    weights: dict = field(default_factory=dict)
    """{model name: weight >= 0}; normalised, need not sum to 1. Models left out get 0 (they still
    answer requests naming them). Empty = everything to the first model. Live: redeploy to shift."""
    seed: int | None = None
    """Seed of the router's random choice (reproducible splits); null = fresh randomness."""

    def __post_init__(self):
        if not isinstance(self.weights, dict):
            raise ConfigError(f"{_key('canary.weights')}: expected a mapping {{model: weight}}")
        clean = {}
        for name, w in (self.weights or {}).items():
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise ConfigError(f"{_key('canary.weights.' + str(name))}={w!r}: must be a number") \
                    from None
            if not (w >= 0 and math.isfinite(w)):
                raise ConfigError(f"{_key('canary.weights.' + str(name))}={w}: must be >= 0")
            clean[str(name)] = w
        self.weights = clean


@dataclass
class LimitsConfig:
    """Per-request limits enforced by the ingress (live: changeable without restarts)."""

    max_tokens: int = 1024
    """Cap on ``max_tokens``; a request above it gets HTTP 400 (not a silent clamp)."""
    default_max_tokens: int | None = None
    """``max_tokens`` when a request gives none (further limited by the context left);
    null = min(256, max_tokens)."""
    max_prompts: int = 16
    """Most prompts in one /v1/completions request (each is one batched generation)."""

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ConfigError(f"{_key('limits.max_tokens')}={self.max_tokens}: must be >= 1")
        if self.default_max_tokens is None:
            self.default_max_tokens = min(256, self.max_tokens)
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ConfigError(f"{_key('limits.default_max_tokens')}={self.default_max_tokens}: must "
                              f"be in [1, limits.max_tokens={self.max_tokens}]")
        if self.max_prompts < 1:
            raise ConfigError(f"{_key('limits.max_prompts')}={self.max_prompts}: must be >= 1")


@dataclass
class IngressConfig:
    """The FastAPI ingress deployment (HTTP, auth, validation, routing; no model)."""

    num_replicas: int = 1
    """Ingress replicas; it is light (no model), one is plenty below a few hundred requests/s."""
    num_cpus: float = 0.1
    """Ray logical CPUs per ingress replica (it mostly awaits the models)."""
    max_ongoing_requests: int = 256
    """Concurrent HTTP requests per ingress replica (Ray's default of 5 would throttle streams)."""

    def __post_init__(self):
        if self.num_replicas < 1:
            raise ConfigError(f"{_key('ingress.num_replicas')}={self.num_replicas}: must be >= 1")
        if self.num_cpus < 0:
            raise ConfigError(f"{_key('ingress.num_cpus')}={self.num_cpus}: must be >= 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"{_key('ingress.max_ongoing_requests')}: must be >= 1")


@dataclass
class ServeConfig:
    """The ``serve:`` section: what `llamapro serve`, `serve run` and `serve deploy` serve."""

    app_name: str = "llamapro"
    """Ray Serve application name (one cluster can hold several apps)."""
    host: str = "127.0.0.1"
    """HTTP bind address of Serve's proxy. Loopback by default; 0.0.0.0 exposes it."""
    port: int = 8000
    """HTTP port of Serve's proxy (one per cluster: every app shares it)."""
    route_prefix: str = "/"
    """URL prefix of this app; the OpenAI routes are under ``{route_prefix}v1``."""
    served_model_name: str = "llamapro"
    """The alias clients use for "whatever the canary picks"; requests without ``model`` get it too."""
    api_key_env: str = ""
    """Name of an environment variable holding the API key (e.g. LLAMAPRO_API_KEY), read by the
    ingress replica; when set, every /v1 request needs ``Authorization: Bearer <key>``. The key is
    never in the config and never logged."""
    api_key_file: str = ""
    """Alternatively a file holding the key (readable where the ingress runs, e.g. a mounted secret)."""
    models: dict = field(default_factory=lambda: {"base": {"path": "demo:smollm2-135m-instruct"}})
    """{name: model section}. Names appear as OpenAI model ids and in responses' ``model`` field."""
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    """Default autoscaling of every model deployment (per-model ``autoscaling`` overrides keys)."""
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)

    def __post_init__(self):
        if not _NAME_RE.match(self.app_name or ""):
            raise ConfigError(f"serve.app_name={self.app_name!r}: letters, digits, '.', '_', '-'")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"serve.port={self.port}: must be in 1..65535")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve.route_prefix={self.route_prefix!r}: must start with '/'")
        if self.api_key_env and self.api_key_file:
            raise ConfigError("serve.api_key_env and serve.api_key_file: set at most one")
        if self.api_key_env and not _ENV_RE.match(self.api_key_env):
            raise ConfigError("serve.api_key_env: must be the NAME of an environment variable (e.g. "
                              "LLAMAPRO_API_KEY), not the key itself; keys never go in configs")
        if not isinstance(self.models, dict) or not self.models:
            raise ConfigError("serve.models: a mapping {name: {path: ...}} with at least one model")
        models = {}
        for name, raw in self.models.items():
            name = str(name)
            where = f"serve.models.{name}"
            if not _NAME_RE.match(name):
                raise ConfigError(f"{where}: model names use letters, digits, '.', '_', '-'")
            if name == self.served_model_name:
                raise ConfigError(f"{where}: clashes with serve.served_model_name (the canary alias)")
            if isinstance(raw, ModelServeConfig):
                raw = dataclasses.asdict(raw)
            if isinstance(raw, str):  # `base: /path/to/model` shorthand
                raw = {"path": raw}
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: expected a mapping with at least `path`")
            token = _PATH.set(where)
            try:
                m = from_dict(ModelServeConfig, raw, where)
                merged = {**dataclasses.asdict(self.autoscaling), **(m.autoscaling or {})}
                # Reuse the strict loader so a misspelled per-model key is named too.
                m.autoscaling = dataclasses.asdict(from_dict(AutoscalingConfig, merged,
                                                             f"{where}.autoscaling"))
            finally:
                _PATH.reset(token)
            models[name] = m
        self.models = models
        unknown = sorted(set(self.canary.weights) - set(models))
        if unknown:
            raise ConfigError(f"serve.canary.weights: unknown model(s) {', '.join(unknown)}; "
                              f"models are {', '.join(models)}")
        if self.canary.weights and sum(self.canary.weights.values()) <= 0:
            raise ConfigError("serve.canary.weights: at least one weight must be > 0")

    # derived values
    def weights(self) -> dict[str, float]:
        """Normalised canary weights over every model (0 for models not listed)."""
        w = self.canary.weights or {next(iter(self.models)): 1.0}
        total = sum(w.values())
        return {name: w.get(name, 0.0) / total for name in self.models}

    def autoscaling_of(self, name: str) -> AutoscalingConfig:
        token = _PATH.set(f"serve.models.{name}")
        try:
            return AutoscalingConfig(**self.models[name].autoscaling)
        finally:
            _PATH.reset(token)

    def api_key_source(self) -> str:
        if self.api_key_env:
            return f"${self.api_key_env}"
        if self.api_key_file:
            return self.api_key_file
        return ""


def serve_config_from_dict(d: dict | None) -> ServeConfig:
    return from_dict(ServeConfig, dict(d or {}), "serve")


def load_serve_config(path: str | os.PathLike | None = None, overrides=None) -> ServeConfig:
    """Load the ``serve:`` section of a llamapro YAML config strictly, with dotted overrides
    (``serve.canary.weights.expanded=0.5``). Other top-level sections are checked by
    ``llamapro.config.Config`` so a typo anywhere is still an error."""
    from .config import Config, read_config_data

    data = read_config_data(path, overrides)
    serve_section = data.pop("serve", None)
    if serve_section is not None and not isinstance(serve_section, dict):
        raise ConfigError("serve: expected a mapping")
    from_dict(Config, data)  # the other sections: strict as everywhere else
    return serve_config_from_dict(serve_section)


def absolutize_paths(cfg: ServeConfig, base: str | os.PathLike | None = None) -> ServeConfig:
    """Make relative model paths that exist here absolute (replicas need not share our cwd).
    For local runs; a config meant for another cluster keeps the paths it was given."""
    root = Path(base or os.getcwd())
    for m in cfg.models.values():
        p = Path(m.path).expanduser()
        if not m.path.startswith("demo:") and "://" not in m.path and not p.is_absolute() \
                and (root / p).exists():
            m.path = str((root / p).resolve())
    return cfg


# --- application ----------------------------------------------------------------------------------

# Keys that change while serving: applied as deployment options / user_config, never build args, so
# changing them is a lightweight in-place update (Ray hashes build args into the code version).
_LIVE_TOP = ("canary", "limits", "autoscaling", "host", "port", "app_name", "route_prefix")
_LIVE_MODEL = ("autoscaling", "max_batch_size", "batch_wait_timeout_s", "max_ongoing_requests",
               "max_queued_requests")


def _ingress_user_config(cfg: ServeConfig) -> dict:
    return {"weights": cfg.weights(), "seed": cfg.canary.seed,
            "limits": dataclasses.asdict(cfg.limits)}


def _model_user_config(m: ModelServeConfig) -> dict:
    return {"max_batch_size": m.max_batch_size, "batch_wait_timeout_s": m.batch_wait_timeout_s}


def _ingress_spec(cfg: ServeConfig) -> dict:
    return {"alias": cfg.served_model_name, "api_key_env": cfg.api_key_env,
            "api_key_file": cfg.api_key_file, "models": list(cfg.models)}


def _model_spec(cfg: ServeConfig, name: str) -> dict:
    m = cfg.models[name]
    spec = {k: v for k, v in dataclasses.asdict(m).items() if k not in _LIVE_MODEL}
    spec.update(name=name, threads=m.threads())
    return spec


def static_args(cfg: ServeConfig) -> dict:
    """``build_app`` args of the declarative config: the config minus its live keys."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for k in _LIVE_TOP:
        d.pop(k, None)
    for m in d["models"].values():
        for k in _LIVE_MODEL:
            m.pop(k, None)
    for k in ("num_replicas", "max_ongoing_requests"):
        d["ingress"].pop(k, None)
    return {"serve": d}


def deployment_overrides(cfg: ServeConfig) -> list[dict]:
    """The live part of a config as Serve ``deployments:`` entries."""
    out = [{"name": INGRESS_NAME, "num_replicas": cfg.ingress.num_replicas,
            "max_ongoing_requests": cfg.ingress.max_ongoing_requests,
            "user_config": _ingress_user_config(cfg)}]
    for name, m in cfg.models.items():
        out.append({"name": model_deployment_name(name),
                    "autoscaling_config": cfg.autoscaling_of(name).to_ray(),
                    "max_ongoing_requests": m.ongoing_limit(),
                    "max_queued_requests": m.max_queued_requests,
                    "user_config": _model_user_config(m)})
    return out


def serve_deploy_config(cfg: ServeConfig, runtime_env: dict | None = None) -> dict:
    """A Ray Serve deploy config (``serve deploy``, ``serve run FILE``, KubeRay ``serveConfigV2``).

    Edits to ``deployments[].user_config`` / ``autoscaling_config`` / queue limits are applied in place;
    edits to ``args`` rebuild the app (replicas restart, rolling)."""
    app = {"name": cfg.app_name, "route_prefix": cfg.route_prefix, "import_path": IMPORT_PATH,
           "args": static_args(cfg), "deployments": deployment_overrides(cfg)}
    if runtime_env:
        app["runtime_env"] = runtime_env
    return {"proxy_location": "EveryNode",
            "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [app]}


def build_app(args: dict | None = None):
    """Serve application builder (``import_path: llamapro.serve:build_app``).

    args: ``{"serve": {...}}`` (the serve section inline, as ``serve_deploy_config`` writes it), or
    ``{"config": "file.yaml"}`` (its ``serve:`` section) plus optional ``overrides`` (a list or a
    space-separated string of dotted overrides), as ``serve run llamapro.serve:build_app config=...``
    passes them. An empty args dict serves the demo model."""
    args = dict(args or {})
    unknown = set(args) - {"serve", "config", "overrides"}
    if unknown:
        raise ConfigError(f"build_app args: unknown key(s) {sorted(unknown)}; use serve, config, "
                          "overrides")
    if "serve" in args:
        cfg = serve_config_from_dict(args["serve"])
    else:
        ov = args.get("overrides") or []
        if isinstance(ov, str):
            ov = ov.split()
        cfg = absolutize_paths(load_serve_config(
            args.get("config"), [o if o.startswith("serve.") else f"serve.{o}" for o in ov]))
    return app_from_config(cfg)


def app_from_config(cfg: ServeConfig):
    """The bound Serve application for a validated config."""
    handles = {}
    for name, m in cfg.models.items():
        handles[name] = ModelServer.options(
            name=model_deployment_name(name),
            ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            autoscaling_config=cfg.autoscaling_of(name).to_ray(),
            max_ongoing_requests=m.ongoing_limit(),
            max_queued_requests=m.max_queued_requests,
            user_config=_model_user_config(m),
        ).bind(_model_spec(cfg, name))
    return OpenAIIngress.options(
        name=INGRESS_NAME,
        num_replicas=cfg.ingress.num_replicas,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        user_config=_ingress_user_config(cfg),
    ).bind(_ingress_spec(cfg), handles)


# --- OpenAI request validation (pure) -------------------------------------------------------------

class APIError(Exception):
    """An OpenAI-style error: ``{"error": {message, type, param, code}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def to_dict(self) -> dict:
        return {"status": self.status, "message": self.message, "type": self.type,
                "param": self.param, "code": self.code}

    @classmethod
    def from_dict(cls, d: dict) -> "APIError":
        return cls(d["status"], d["message"], d.get("type") or "invalid_request_error",
                   d.get("param"), d.get("code"))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(param: str, msg: str, code: str | None = None) -> APIError:
    return APIError(400, msg, param=param, code=code)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"'{name}' must be a number, got {v!r}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}",
                   code="invalid_value")
    return float(v)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise _bad(name, f"'{name}' must be an integer, got {v!r}")
    return v


def _unsupported(body: dict, checks: dict):
    for name, is_default in checks.items():
        if name in body and body[name] is not None and not is_default(body[name]):
            raise _bad(name, f"'{name}'={body[name]!r} is not supported by this server",
                       code="unsupported_parameter")


_COMMON_UNSUPPORTED = {
    "n": lambda v: v == 1,
    "logprobs": lambda v: v in (False, 0),
    "top_logprobs": lambda v: v in (0,),
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logit_bias": lambda v: not v,
    "best_of": lambda v: v == 1,
    "echo": lambda v: v is False,
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "response_format": lambda v: isinstance(v, dict) and v.get("type", "text") == "text",
}


def parse_sampling(body: dict, limits: dict) -> dict:
    """Validate the sampling fields shared by both endpoints; returns the model request fields."""
    _unsupported(body, _COMMON_UNSUPPORTED)
    mt = _int(body, "max_completion_tokens")
    if mt is None:
        mt = _int(body, "max_tokens")
    if mt is not None:
        if mt < 1:
            raise _bad("max_tokens", f"'max_tokens' must be >= 1, got {mt}", code="invalid_value")
        if mt > limits["max_tokens"]:
            raise _bad("max_tokens", f"'max_tokens'={mt} exceeds this server's cap of "
                       f"{limits['max_tokens']}", code="max_tokens_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "'stop' must be a non-empty string or a list of up to 4 of them")
    seed = _int(body, "seed")
    for name in ("stream", "ignore_eos"):
        if name in body and body[name] is not None and not isinstance(body[name], bool):
            raise _bad(name, f"'{name}' must be true or false")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    return {"max_tokens": mt, "default_max_tokens": limits["default_max_tokens"],
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "stop": stop, "seed": seed, "ignore_eos": bool(body.get("ignore_eos") or False)}


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages", "'messages' is required", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise _bad(f"messages[{i}]", f"messages[{i}] needs a 'role' in {sorted(_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise _bad(f"messages[{i}].content", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "'content' must be a string or text parts")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def parse_prompts(body: dict, max_prompts: int) -> list:
    """/v1/completions ``prompt``: a string, a list of strings, token ids, or lists of token ids."""
    p = body.get("prompt")
    if p is None:
        raise _bad("prompt", "'prompt' is required", code="missing_required_parameter")
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        prompts = [p]
    elif isinstance(p, list) and p and all(
            isinstance(x, str) or (isinstance(x, list) and x and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)) for x in p):
        prompts = list(p)
    else:
        raise _bad("prompt", "'prompt' must be a string, a list of strings, or token id list(s)")
    if len(prompts) > max_prompts:
        raise _bad("prompt", f"at most {max_prompts} prompts per request, got {len(prompts)}")
    return prompts


# --- engines --------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A validated, tokenized request inside a model replica."""

    ids: list
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int | None
    ignore_eos: bool
    stream: bool = True
    """False: only the final event is emitted, carrying the whole text (no per-token wake-ups)."""
    cancelled: bool = False
    batch_size: int = 0
    emit: Any = None
    """Called from the engine thread with each event dict (or the exception that ended it)."""


class _Row:
    """Per-request generation state: tokens, incremental detokenization, stop strings, sampler."""

    def __init__(self, p: Prepared, engine):
        import torch

        self.p, self.engine = p, engine
        self.out: list[int] = []
        self.acc: list[str] = []  # text so far, for non-streaming requests
        self.n = 0
        self.emitted = 0
        self.finish: str | None = None
        self.maxstop = max((len(s) for s in p.stop), default=0)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        self.gen = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)

    def emit(self, item) -> None:
        if self.p.emit is not None:
            self.p.emit(item)

    def uniform(self) -> float:
        import torch

        return torch.rand(1, generator=self.gen).item()

    def push(self, tok: int) -> dict:
        self.n += 1
        eos = tok in self.engine.eos_ids and not self.p.ignore_eos
        if not eos:
            self.out.append(tok)
        text = self.engine.decode(self.out)
        final = eos or self.n >= self.p.max_tokens
        cut = None
        if self.p.stop:
            start = max(0, self.emitted - self.maxstop + 1)
            hits = [i for i in (text.find(s, start) for s in self.p.stop) if i >= 0]
            if hits:
                cut = max(min(hits), self.emitted)
        if cut is not None:
            text, final, self.finish = text[:cut], True, "stop"
        elif eos:
            self.finish = "stop"
        elif final:
            self.finish = "length"
        if final:
            safe = len(text)
        else:
            safe = len(text)
            while safe > self.emitted and text[safe - 1] == "\ufffd":  # half a UTF-8 character
                safe -= 1
            for k in range(min(self.maxstop - 1, safe - self.emitted), 0, -1):
                if any(s.startswith(text[safe - k:safe]) for s in self.p.stop):
                    safe -= k  # might be the start of a stop string: hold it back
                    break
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return {"text": delta, "finish_reason": self.finish, "completion_tokens": self.n}


class _Tokenizing:
    """Shared by engines: chat template, tokenization and the context check."""

    tok: Any
    context: int

    def _init_tokenizer(self, path: str, trust_remote_code: bool):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    def prepare(self, req: dict) -> Prepared:
        if req["kind"] == "chat":
            if not getattr(self.tok, "chat_template", None):
                raise _bad("messages", "this model has no chat template; use /v1/completions")
            try:
                text = self.tok.apply_chat_template(req["messages"], add_generation_prompt=True,
                                                    tokenize=False)
            except Exception as e:  # the template's own checks (e.g. role alternation)
                raise _bad("messages", f"the chat template rejected the messages: {e}") from None
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        elif isinstance(req["prompt"], str):
            ids = list(self.tok(req["prompt"])["input_ids"])
        else:
            ids = list(req["prompt"])
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise _bad("prompt", f"token ids must be in [0, {self.vocab_size})")
        if not ids:
            raise _bad("prompt", "the prompt is empty")
        n = len(ids)
        if n >= self.context:
            raise _bad("messages" if req["kind"] == "chat" else "prompt",
                       f"This model's maximum context length is {self.context} tokens. However, "
                       f"your prompt has {n} tokens.", code="context_length_exceeded")
        mt = req["max_tokens"]
        if mt is None:
            mt = min(req["default_max_tokens"], self.context - n)
        elif n + mt > self.context:
            raise _bad("max_tokens", f"This model's maximum context length is {self.context} tokens. "
                       f"However, you requested {n + mt} tokens ({n} in the prompt, {mt} for the "
                       "completion). Please reduce the prompt or max_tokens.",
                       code="context_length_exceeded")
        return Prepared(ids=ids, max_tokens=mt, temperature=req["temperature"], top_p=req["top_p"],
                        stop=list(req["stop"]), seed=req["seed"], ignore_eos=req["ignore_eos"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class TransformersEngine(_Tokenizing):
    """Continuous batching with a plain PyTorch token loop (KV cache, left padding, per-row params).

    One engine thread owns the model. ``submit`` hands it a group of requests (a ``@serve.batch``
    batch); the thread prefills a group in one forward pass and merges it into the running batch at
    the next token, so a request never waits for a whole earlier batch to finish. At most
    ``max_running`` rows run at once; the rest wait their turn. Each row has its own temperature /
    top_p / seed (a private torch.Generator, so a seeded request gives the same text whatever it is
    batched with), max_tokens, stop strings and EOS; finished or cancelled rows leave the batch and
    the KV cache at once. Events go to each request's ``emit`` callback."""

    continuous = False  # admitted through @serve.batch; see ModelServerImpl._admit

    def __init__(self, path: str, *, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, max_context: int = 0, max_running: int = 8,
                 threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            tdtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            tdtype = getattr(torch, dtype)
        self._init_tokenizer(path, trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=tdtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        cfg = self.model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.vocab_size = int(getattr(text_cfg, "vocab_size", 0) or len(self.tok))
        ctx = max_context or getattr(text_cfg, "max_position_embeddings", 0) or 0
        if not ctx and 0 < getattr(self.tok, "model_max_length", 0) < 10**7:
            ctx = self.tok.model_max_length
        self.context = int(ctx or 2048)
        eos = set()
        for src in (getattr(self.model.generation_config, "eos_token_id", None),
                    getattr(text_cfg, "eos_token_id", None), self.tok.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        self.eos_ids = eos
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (min(eos) if eos else 0)
        self.dtype = str(tdtype).replace("torch.", "")
        self.max_running = max_running
        self.threads = threads
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._reset()

    # --- public, any thread
    def submit(self, batch: list) -> None:
        """Queue a group of Prepared requests (each with ``emit``) for admission."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve_forever, daemon=True,
                                                name="llamapro-engine")
                self._thread.start()
        self._inbox.put(list(batch))

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def generate(self, batch: list) -> list[dict]:
        """Blocking helper (benchmarks, scripts): run requests to completion, return final events
        with the full text."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        texts = [[] for _ in batch]
        for i, p in enumerate(batch):
            p.emit = (lambda i: lambda item: q.put((i, item)))(i)
        self.submit(batch)
        done, out = 0, [None] * len(batch)
        while done < len(batch):
            i, item = q.get()
            if isinstance(item, BaseException):
                raise item
            texts[i].append(item["text"])
            if item["finish_reason"]:
                out[i] = {**item, "text": "".join(texts[i]), "prompt_tokens": len(batch[i].ids)}
                done += 1
        return out

    # --- engine thread
    def _reset(self):
        self._rows: list[_Row] = []
        self._cache = self._attn = self._pos = self._logits = None
        self._mergeable = False

    def _serve_forever(self):
        torch = self.torch
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                block = not self._rows and not self._pending
                try:
                    while True:
                        group = self._inbox.get(block=block)
                        block = False
                        self._pending.extend(_Row(p, self) for p in group)
                except queue.Empty:
                    pass
                admitted: list[_Row] = []
                try:
                    admitted = self._admit()
                    if self._rows:
                        self._step()
                except BaseException as e:  # fail what was running, keep serving the rest
                    log.exception("generation failed")
                    for r in {id(r): r for r in self._rows + admitted}.values():
                        r.emit(e)
                    self._reset()

    def _forward(self, **kw):
        try:  # only the last position's logits: a prompt's full-vocabulary logits are wasted work
            return self.model(use_cache=True, logits_to_keep=1, **kw)
        except TypeError:  # remote code without logits_to_keep
            return self.model(use_cache=True, **kw)

    def _admit(self) -> list:
        torch = self.torch
        room = self.max_running - len(self._rows)
        if room <= 0 or not self._pending or (self._rows and not self._mergeable):
            return []
        new = []
        while self._pending and len(new) < room:
            r = self._pending.popleft()
            if not r.p.cancelled:  # the caller left while it waited
                new.append(r)
        if not new:
            return []
        L = max(len(r.p.ids) for r in new)
        ids = torch.full((len(new), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(new), L), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, L - len(r.p.ids):] = torch.tensor(r.p.ids, dtype=torch.long)
            attn[i, L - len(r.p.ids):] = 1
        pos = (attn.cumsum(-1) - 1).clamp_(min=0)
        ids, attn, pos = ids.to(self.device), attn.to(self.device), pos.to(self.device)
        out = self._forward(input_ids=ids, attention_mask=attn, position_ids=pos)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1, :], pos[:, -1] + 1
        if not self._rows:
            self._cache, self._attn, self._pos, self._logits = cache, attn, next_pos, logits
            # Merging later groups means editing K/V tensors directly: only for plain dynamic
            # layers (sliding-window or linear-attention caches get admitted when the batch drains).
            self._mergeable = all(type(layer).__name__ == "DynamicLayer"
                                  for layer in getattr(cache, "layers", [None]))
        else:
            self._merge(cache, attn, next_pos, logits)
        self._rows.extend(new)
        for r in self._rows:
            r.p.batch_size = max(r.p.batch_size, len(self._rows))
        return new

    def _merge(self, cache, attn, next_pos, logits):
        """Append rows to the running batch: left-pad the shorter of the two KV caches."""
        torch, F = self.torch, self.torch.nn.functional
        T, Tn = self._attn.shape[1], attn.shape[1]
        for old, new in zip(self._cache.layers, cache.layers):
            ko, vo, kn, vn = old.keys, old.values, new.keys, new.values
            if T < Tn:
                ko, vo = F.pad(ko, (0, 0, Tn - T, 0)), F.pad(vo, (0, 0, Tn - T, 0))
            elif Tn < T:
                kn, vn = F.pad(kn, (0, 0, T - Tn, 0)), F.pad(vn, (0, 0, T - Tn, 0))
            old.keys, old.values = torch.cat([ko, kn]), torch.cat([vo, vn])
        a = F.pad(self._attn, (max(0, Tn - T), 0))
        b = F.pad(attn, (max(0, T - Tn), 0))
        self._attn = torch.cat([a, b])
        self._pos = torch.cat([self._pos, next_pos])
        self._logits = torch.cat([self._logits, logits])

    def _step(self):
        """Sample one token for every running row, emit, drop finished rows, run one decode step."""
        torch = self.torch
        rows = self._rows
        toks = self._sample(self._logits, rows)
        for r, t in zip(rows, toks):
            ev = r.push(t)
            if r.p.stream:
                r.emit(ev)
            else:
                r.acc.append(ev["text"])
                if ev["finish_reason"]:
                    r.emit({**ev, "text": "".join(r.acc)})
        keep = [j for j, r in enumerate(rows) if r.finish is None and not r.p.cancelled]
        if not keep:
            self._reset()
            return
        if len(keep) < len(rows):
            sel = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._cache.batch_select_indices(sel)
            self._attn, self._pos = self._attn[sel], self._pos[sel]
            self._rows = [rows[j] for j in keep]
            if self._mergeable:  # drop columns that are padding for every remaining row
                first = int(self._attn.any(0).nonzero()[0])
                if first:
                    self._attn = self._attn[:, first:]
                    for layer in self._cache.layers:
                        layer.keys = layer.keys[:, :, first:]
                        layer.values = layer.values[:, :, first:]
        feed = torch.tensor([toks[j] for j in keep], dtype=torch.long, device=self.device)
        self._attn = torch.cat([self._attn, self._attn.new_ones((len(keep), 1))], dim=1)
        out = self.model(input_ids=feed[:, None], attention_mask=self._attn,
                         position_ids=self._pos[:, None], past_key_values=self._cache,
                         use_cache=True)
        self._cache, self._logits = out.past_key_values, out.logits[:, -1, :]
        self._pos = self._pos + 1

    def _sample(self, logits, rows: list) -> list[int]:
        torch = self.torch
        out = logits.argmax(-1)
        sampled = [j for j, r in enumerate(rows) if r.p.temperature > 1e-5]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([rows[j].p.temperature for j in sampled], device=logits.device)
            probs = torch.softmax(logits[idx].float() / temps[:, None], dim=-1)
            u = torch.tensor([rows[j].uniform() for j in sampled], device=logits.device)
            top_p = torch.tensor([rows[j].p.top_p for j in sampled], device=logits.device)
            if bool((top_p < 1.0).any()):
                probs, order = probs.sort(dim=-1, descending=True)
                cum = probs.cumsum(-1)
                probs = probs.masked_fill(cum - probs >= top_p[:, None], 0.0)  # nucleus, keeps >= 1
            else:
                order = None
            cdf = probs.cumsum(-1)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            pick = pick.clamp_(max=cdf.shape[-1] - 1)
            tok = order.gather(-1, pick) if order is not None else pick
            out[idx] = tok.squeeze(-1)
        return out.tolist()


class VLLMEngine(_Tokenizing):
    """vLLM's AsyncLLMEngine, continuous batching on a GPU. Selected by ``engine: auto`` when the
    replica sees a GPU and vllm imports. UNTESTED in llamapro's CI (no GPU there)."""

    continuous = True

    def __init__(self, path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                 max_context: int = 0, extra: dict | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self._init_tokenizer(path, trust_remote_code)
        eargs = AsyncEngineArgs(model=path, dtype=dtype, trust_remote_code=trust_remote_code,
                                max_model_len=max_context or None, **(extra or {}))
        self.llm = AsyncLLMEngine.from_engine_args(eargs)
        self.vocab_size = len(self.tok)
        self.context = max_context or int(getattr(self.tok, "model_max_length", 0) or 0)
        if not 0 < self.context < 10**7:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.context = int(getattr(c, "max_position_embeddings", 0) or 2048)
        self.dtype = dtype

    async def stream(self, p: Prepared):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                stop=p.stop or None, seed=p.seed, ignore_eos=p.ignore_eos)
        p.batch_size = 0  # continuous batching: no fixed batch
        sent = ""
        async for res in self.llm.generate({"prompt_token_ids": p.ids}, params,
                                           request_id=uuid.uuid4().hex):
            o = res.outputs[0]
            delta, sent = o.text[len(sent):], o.text
            yield {"text": delta, "finish_reason": o.finish_reason if res.finished else None,
                   "completion_tokens": len(o.token_ids)}


def select_engine(engine: str) -> str:
    """auto -> vllm only if this process sees a GPU and vllm is importable."""
    if engine != "auto":
        return engine
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:
        cuda = False
    return "vllm" if cuda and importlib.util.find_spec("vllm") is not None else "transformers"


def load_engine(spec: dict):
    from .demo import resolve_model

    path = resolve_model(spec["path"])
    kind = select_engine(spec["engine"])
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(f"serve.models.{spec['name']}.engine=vllm but vllm is not installed "
                               "on this replica; use engine: transformers or install vllm")
        return VLLMEngine(path, dtype=spec["dtype"], trust_remote_code=spec["trust_remote_code"],
                          max_context=spec["max_context"], extra=spec.get("vllm"))
    return TransformersEngine(path, dtype=spec["dtype"], device=spec["device"],
                              trust_remote_code=spec["trust_remote_code"],
                              max_context=spec["max_context"], threads=spec["threads"])


# --- deployments ----------------------------------------------------------------------------------

def _set_threads(n: int):
    import torch

    torch.set_num_threads(n)


class ModelServerImpl:
    """One model: validation and tokenization on the event loop, generation on the engine's thread.

    ``@serve.batch`` groups requests arriving together into one admission (one prefill forward pass);
    the engine merges each group into its running batch at the next token. The deployment is
    ``ModelServer`` below; this class stays importable under its own name so Ray pickles it by
    reference (a by-value copy would carry only some of this module's globals)."""

    def __init__(self, spec: dict):
        self.name = spec["name"]
        _set_threads(spec["threads"])
        self.engine = load_engine(spec)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = uuid.uuid4().hex[:8]
        log.info("model %s ready: %s, %s, context %d, %d torch threads", self.name,
                 type(self.engine).__name__, self.engine.dtype, self.engine.context,
                 spec["threads"])

    def reconfigure(self, user_config: dict):
        n = int(user_config["max_batch_size"])
        self.engine.max_running = n
        self._admit.set_max_batch_size(n)
        self._admit.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def check_health(self):
        if not self.engine.alive():
            raise RuntimeError("the engine thread died")

    def info(self) -> dict:
        return {"name": self.name, "context_length": self.engine.context,
                "engine": type(self.engine).__name__, "replica": self.replica}

    def _prepare(self, req: dict):
        try:
            return self.engine.prepare(req), None
        except APIError as e:
            return None, {"error": e.to_dict()}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _admit(self, reqs: list) -> list:
        """Hand a batch of concurrent requests to the engine in one go; returns at once (the
        events then flow through each request's own queue), so the next batch can form while
        this one generates."""
        self.engine.submit(reqs)
        return [None] * len(reqs)

    async def _events(self, p: Prepared):
        if self.engine.continuous:  # vLLM schedules by itself
            async for ev in self.engine.stream(p):
                yield ev
            return
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        p.emit = lambda item: loop.call_soon_threadsafe(q.put_nowait, item)
        await self._admit(p)
        while True:
            item = await q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item["finish_reason"]:
                return

    async def generate(self, req: dict) -> dict:
        p, err = self._prepare(req)
        if err:
            return err
        p.stream = False
        parts, last = [], None
        try:
            async for ev in self._events(p):
                parts.append(ev["text"])
                last = ev
        finally:
            p.cancelled = True  # no-op when finished; frees the row if the caller went away
        return {"text": "".join(parts), "finish_reason": last["finish_reason"],
                "prompt_tokens": len(p.ids), "completion_tokens": last["completion_tokens"],
                "replica": self.replica, "batch_size": p.batch_size}

    async def stream(self, req: dict):
        """Events: the first carries prompt_tokens/replica/batch_size; then text deltas; the last
        has finish_reason. A validation failure is a single {"error": ...} event."""
        p, err = self._prepare(req)
        if err:
            yield err
            return
        first = True
        try:
            async for ev in self._events(p):
                if first:
                    ev = {**ev, "prompt_tokens": len(p.ids), "replica": self.replica,
                          "batch_size": p.batch_size}
                if first or ev["text"] or ev["finish_reason"]:
                    yield ev
                first = False
        finally:
            p.cancelled = True


ModelServer = serve.deployment(ModelServerImpl, name="model")

api = FastAPI(title="llamapro", docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _read_api_key(spec: dict) -> str | None:
    if spec.get("api_key_env"):
        key = os.environ.get(spec["api_key_env"], "").strip()
        if not key:
            raise RuntimeError(f"serve.api_key_env={spec['api_key_env']}: the variable is unset or "
                               "empty where the ingress runs; refusing to serve without the key")
        return key
    if spec.get("api_key_file"):
        p = Path(spec["api_key_file"]).expanduser()
        try:
            key = p.read_text().strip()
        except OSError as e:
            raise RuntimeError(f"serve.api_key_file={str(p)!r}: cannot read it ({e.strerror}); "
                               "refusing to serve without the key") from None
        if not key:
            raise RuntimeError(f"serve.api_key_file={str(p)!r} is empty; refusing to serve")
        return key
    return None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class OpenAIIngressImpl:
    """HTTP, auth, validation and canary routing; owns no model. Deployed as ``OpenAIIngress``."""

    def __init__(self, spec: dict, models: dict):
        self.alias = spec["alias"]
        self.models = models  # {name: DeploymentHandle}
        self._key = _read_api_key(spec)  # never logged, never returned
        self.weights = {name: (1.0 if i == 0 else 0.0) for i, name in enumerate(models)}
        self.limits = dataclasses.asdict(LimitsConfig())
        self._seed: Any = object()
        self.rng = random.Random()
        self.created = int(time.time())
        self._lock = threading.Lock()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = uuid.uuid4().hex[:8]

    def reconfigure(self, user_config: dict):
        weights = {k: float(v) for k, v in user_config["weights"].items() if k in self.models}
        if sum(weights.values()) <= 0:
            raise ValueError("canary weights must have a positive sum")
        with self._lock:
            self.weights = weights
            self.limits = dict(user_config.get("limits") or self.limits)
            seed = user_config.get("seed")
            if seed != self._seed:  # a new seed restarts the sequence; new weights alone do not
                self._seed = seed
                self.rng = random.Random(seed) if seed is not None else random.Random()
        log.info("canary weights now %s", weights)

    # helpers
    def _auth(self, request: Request):
        if self._key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self._key.encode()):
            raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def _route(self, requested) -> str:
        if requested is not None and not isinstance(requested, str):
            raise _bad("model", "'model' must be a string")
        if requested in (None, "", self.alias):
            with self._lock:
                names = [n for n, w in self.weights.items() if w > 0]
                return self.rng.choices(names, [self.weights[n] for n in names])[0]
        if requested in self.models:
            return requested
        raise APIError(404, f"The model '{requested}' does not exist. Available: "
                       f"{', '.join([self.alias, *self.models])}", param="model",
                       code="model_not_found")

    async def _body(self, request: Request) -> dict:
        self._auth(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    async def _call(self, name: str, req: dict) -> dict:
        from ray.serve.exceptions import BackPressureError

        try:
            res = await self.models[name].generate.remote(req)
        except BackPressureError:
            raise APIError(503, f"model '{name}' is overloaded; retry later", type="server_error",
                           code="overloaded") from None
        if "error" in res:
            raise APIError.from_dict(res["error"])
        return res

    async def _guard(self, coro):
        from ray.exceptions import RayActorError

        try:
            return await coro
        except APIError as e:
            return _error_response(e)
        except RayActorError:
            log.exception("a model replica died during a request")
            return _error_response(APIError(503, "a model replica became unavailable; retry",
                                            type="server_error", code="unavailable"))
        except Exception:
            log.exception("unexpected error")
            return _error_response(APIError(500, "internal server error", type="server_error"))

    def _headers(self, name: str, res: dict) -> dict:
        """Which model, model replica and ingress replica served, and the batch it was part of."""
        return {"x-llamapro-model": name, "x-llamapro-replica": str(res.get("replica", "")),
                "x-llamapro-ingress": self.replica,
                "x-llamapro-batch-size": str(res.get("batch_size", ""))}

    # routes
    @api.get("/health")
    async def health(self):
        return {"status": "ok", "models": list(self.models), "alias": self.alias}

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        async def run():
            self._auth(request)
            data = [{"id": n, "object": "model", "created": self.created, "owned_by": "llamapro"}
                    for n in self.models]
            data.append({"id": self.alias, "object": "model", "created": self.created,
                         "owned_by": "llamapro", "routing": dict(self.weights)})
            return {"object": "list", "data": data}

        return await self._guard(run())

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        async def run():
            body = await self._body(request)
            messages = parse_messages(body)
            req = {"kind": "chat", "messages": messages, **parse_sampling(body, self.limits)}
            name = self._route(body.get("model"))
            if body.get("stream"):
                return await self._stream(name, req, body, chat=True)
            res = await self._call(name, req)
            return JSONResponse({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]},
                             "finish_reason": res["finish_reason"], "logprobs": None}],
                "usage": _usage(res["prompt_tokens"], res["completion_tokens"]),
            }, headers=self._headers(name, res))

        return await self._guard(run())

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        async def run():
            body = await self._body(request)
            prompts = parse_prompts(body, self.limits["max_prompts"])
            sampling = parse_sampling(body, self.limits)
            name = self._route(body.get("model"))
            if body.get("stream"):
                if len(prompts) != 1:
                    raise _bad("prompt", "streaming takes a single prompt")
                return await self._stream(name, {"kind": "completion", "prompt": prompts[0],
                                                 **sampling}, body, chat=False)
            results = await asyncio.gather(*[
                self._call(name, {"kind": "completion", "prompt": p, **sampling}) for p in prompts])
            return JSONResponse({
                "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"],
                             "logprobs": None} for i, r in enumerate(results)],
                "usage": _usage(sum(r["prompt_tokens"] for r in results),
                                sum(r["completion_tokens"] for r in results)),
            }, headers=self._headers(name, results[0]))

        return await self._guard(run())

    async def _stream(self, name: str, req: dict, body: dict, chat: bool):
        from ray.serve.exceptions import BackPressureError

        gen = self.models[name].options(stream=True).stream.remote(req)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the model produced no output", type="server_error") from None
        except BackPressureError:
            raise APIError(503, f"model '{name}' is overloaded; retry later", type="server_error",
                           code="overloaded") from None
        if "error" in first:
            raise APIError.from_dict(first["error"])
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text, finish):
            if chat:
                delta = {"content": text} if text else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return _sse({"id": rid, "object": obj, "created": created, "model": name,
                         "choices": [choice]})

        async def events():
            ev, last = first, first
            try:
                if chat:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": name,
                                "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                   "content": ""},
                                             "finish_reason": None, "logprobs": None}]})
                while ev is not None:
                    last = ev
                    if ev["text"] or ev["finish_reason"]:
                        yield chunk(ev["text"], ev["finish_reason"])
                    try:
                        ev = await gen.__anext__()
                    except StopAsyncIteration:
                        ev = None
                if include_usage:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": name,
                                "choices": [], "usage": _usage(first["prompt_tokens"],
                                                               last["completion_tokens"])})
            except Exception:
                log.exception("stream from model %s failed", name)
                yield _sse(APIError(500, "the stream failed", type="server_error").body())
            finally:
                if ev is not None:  # the client went away (or we failed): stop generating
                    gen.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**self._headers(name, first), "Cache-Control": "no-cache"})


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


OpenAIIngress = serve.deployment(serve.ingress(api)(OpenAIIngressImpl), name=INGRESS_NAME)


# --- running it -----------------------------------------------------------------------------------

def deploy(cfg: ServeConfig, runtime_env: dict | None = None, wait_s: float = 600.0) -> dict:
    """Deploy (or redeploy) the app declaratively, exactly as ``serve deploy`` / KubeRay would, and
    wait until it runs. Redeploying a config that differs only in live keys updates replicas in
    place. Needs ``ray.init`` first; starts Serve's proxy on ``cfg.host:cfg.port`` if not running.
    Returns the deploy config it applied."""
    from ray.serve._private import api as serve_private
    from ray.serve.schema import ServeDeploySchema

    conf = serve_deploy_config(cfg, runtime_env)
    with _quiet_ray_deprecations():
        schema = ServeDeploySchema.model_validate(conf)
    # The same two calls `serve run CONFIG.yaml` makes (Ray 2.60 has no public Python call for a
    # declarative deploy; `serve.run` pins no code version, so it would restart every replica).
    client = serve_private.serve_start(http_options=conf["http_options"])
    client.deploy_apps(schema)
    wait_running(cfg.app_name, wait_s)
    return conf


def wait_running(app_name: str, timeout_s: float = 600.0, poll_s: float = 0.5):
    """Block until the app is RUNNING with every deployment HEALTHY; raise on DEPLOY_FAILED."""
    from ray import serve as _serve

    deadline = time.monotonic() + timeout_s
    time.sleep(poll_s)  # let the controller take the new target first
    last = None
    while time.monotonic() < deadline:
        app = _serve.status().applications.get(app_name)
        if app is not None:
            last = app
            status = str(getattr(app.status, "value", app.status))
            if status == "DEPLOY_FAILED":
                raise RuntimeError(f"Serve app {app_name!r} failed to deploy: {app.message}")
            deps = app.deployments.values()
            if status == "RUNNING" and all(
                    str(getattr(d.status, "value", d.status)) == "HEALTHY" for d in deps):
                return app
        time.sleep(poll_s)
    raise TimeoutError(f"Serve app {app_name!r} not running after {timeout_s:.0f}s: "
                       f"{getattr(last, 'message', '')}")


def replica_counts(app_name: str) -> dict[str, int]:
    """{deployment: RUNNING replicas} from ``serve.status()``."""
    from ray import serve as _serve

    app = _serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}


def cluster_cpus_needed(cfg: ServeConfig) -> float:
    """Logical CPUs the app can claim at its largest (all models at max_replicas + ingress)."""
    total = cfg.ingress.num_replicas * cfg.ingress.num_cpus
    for name, m in cfg.models.items():
        total += m.num_cpus * cfg.autoscaling_of(name).max_replicas
    return total


# the parts of a Ray job's runtime env its replicas need (code, packages, env vars)
JOB_RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "pip", "uv", "conda", "env_vars")


def job_runtime_env() -> dict | None:
    """The runtime env of the Ray job this process runs in, reduced to what replicas need."""
    import ray

    env = dict(ray.get_runtime_context().runtime_env or {})
    env = {k: env[k] for k in JOB_RUNTIME_ENV_KEYS if env.get(k)}
    return env or None


def smoke_chat(cfg: ServeConfig) -> dict:
    """One greedy chat request to a deployed app, with its API key when this process can read it."""
    from .pipeline import chat_once

    try:
        key = _read_api_key({"api_key_env": cfg.api_key_env, "api_key_file": cfg.api_key_file})
    except RuntimeError:
        key = None  # the key lives where the ingress runs; the request then shows the 401
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
    return chat_once(url, cfg.served_model_name, api_key=key)


def describe(cfg: ServeConfig) -> str:
    w = cfg.weights()
    base = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
    lines = [f"serving {base}  (app {cfg.app_name!r}, health: "
             f"{base[:-3]}/health)"]
    for name, m in cfg.models.items():
        a = cfg.autoscaling_of(name)
        lines.append(f"  model {name}: {m.path}  weight {w[name]:.2f}  replicas "
                     f"{a.min_replicas}..{a.max_replicas}  batch {m.max_batch_size}")
    lines.append(f"  alias {cfg.served_model_name!r} (or no model) -> weighted choice")
    src = cfg.api_key_source()
    lines.append(f"  API key: {'required (from ' + src + ')' if src else 'none (open endpoint)'}")
    return "\n".join(lines)


__all__ = [
    "APIError", "AutoscalingConfig", "CanaryConfig", "IngressConfig", "LimitsConfig",
    "ModelServeConfig", "ModelServer", "OpenAIIngress", "ServeConfig", "TransformersEngine",
    "VLLMEngine", "app_from_config", "build_app", "deploy", "load_serve_config",
    "replica_counts", "serve_deploy_config", "wait_running",
]
