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
                    Tokenizing, the chat template and the context check run on one tokenizer
                    thread (never on the replica's event loop); ``@serve.batch`` groups concurrent arrivals into one admission (one prefill);
                    generation runs on one engine thread, off the event loop, batching continuously
                    (a request joins the running batch at the next token, leaves it when done).

Overload is answered, never queued without bound: each model's queue at the ingress is bounded
(``max_queued_requests``), the ingress's own queue too, bodies are capped; a full queue answers 503 with
``Retry-After``. A failed prefill or decode step fails its requests with a 500/503 and the engine keeps
serving; ``limits.request_timeout_s`` bounds every request. The pure protocol code (validation, errors)
is ``llamapro.serve.protocol``; the engines are ``llamapro.serve.engine``.

The config tree (``ServeConfig``) lives here until it joins ``llamapro.config``. Keys that can change
while serving (canary weights, limits, autoscaling, batch sizes, queue limits) are deployment options or
``user_config``; everything else is an argument of ``build_app`` and changing it restarts replicas.
"""

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
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

from llamapro.config import ConfigError, from_dict
from llamapro.serve.engine import (  # noqa: F401  (re-exported: llamapro.serve is the public module)
    Prepared,
    TransformersEngine,
    VLLMEngine,
    engine_error,
    load_engine,
    select_engine,
)
from llamapro.serve.protocol import (  # noqa: F401
    APIError,
    _bad,
    parse_json_body,
    parse_messages,
    parse_prompts,
    parse_sampling,
    sse as _sse,
    too_large,
    usage as _usage,
)

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
    max_queued_requests: int = 32
    """Requests allowed to wait for a replica beyond that (per ingress replica); more get HTTP 503
    with ``Retry-After`` at once instead of waiting behind a queue that cannot drain. -1 = unbounded
    (not recommended: overload then shows up as timeouts). Live."""
    retry_after_s: float = 2.0
    """``Retry-After`` seconds sent with a 503 when this model's queue is full. Live."""
    autoscaling: dict | None = None
    """Overrides of ``serve.autoscaling`` for this model (merged key by key)."""
    vllm: dict = field(default_factory=dict)
    """Extra ``vllm.AsyncEngineArgs`` for the vLLM engine, e.g. {gpu_memory_utilization: 0.8}."""
    packs: dict = field(default_factory=dict)
    """{name: pack directory} (made by ``llamapro pack``) served on this model as their base: a
    request naming a pack runs with its blocks, one naming this model gets the base exactly, and
    rows of both share a batch on one replica that holds the base once. Each pack is checked against
    the base by fingerprint when a replica starts; its blocks load on the first request for it
    (Ray Serve model multiplexing). Transformers engine only."""
    max_loaded_packs: int = 0
    """Packs whose blocks one replica keeps at once (the least recently used is dropped beyond it,
    and Serve prefers replicas that hold a request's pack); 0 = all of them."""

    def __post_init__(self):
        for name in ("autoscaling", "vllm", "packs"):
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
        if not 0 <= self.retry_after_s <= 3600:
            raise ConfigError(f"{_key('retry_after_s')}={self.retry_after_s}: must be in [0, 3600]")
        packs = {}
        for pname, ppath in (self.packs or {}).items():
            pname = str(pname)
            if not _NAME_RE.match(pname):
                raise ConfigError(f"{_key('packs.' + pname)}: pack names use letters, digits, '.', "
                                  "'_', '-' (clients send them as the model name)")
            if not isinstance(ppath, str) or not ppath:
                raise ConfigError(f"{_key('packs.' + pname)}: the pack's directory (from "
                                  "`llamapro pack RUN OUT`)")
            packs[pname] = ppath
        self.packs = packs
        if packs and self.engine == "vllm":
            raise ConfigError(f"{_key('engine')}=vllm: packs are served by the transformers engine "
                              "only; use engine: transformers (or auto) or apply the pack "
                              "(`llamapro apply`) and serve the result as its own model")
        if self.max_loaded_packs < 0:
            raise ConfigError(f"{_key('max_loaded_packs')}={self.max_loaded_packs}: must be >= 0 "
                              "(0 = all)")

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
    max_body_bytes: int = 1_048_576
    """Largest request body accepted (HTTP 413 above it), read in chunks so a larger one is never
    held in memory. 1 MiB holds a prompt of ~250k tokens, beyond any context served here."""
    request_timeout_s: float = 600.0
    """Longest a request may wait for its model: for a whole non-streaming answer, or between two
    events of a stream. Past it the request is cancelled (its row leaves the batch) and the client
    gets HTTP 504 (or an error event in the stream)."""

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
        if self.max_body_bytes < 1024:
            raise ConfigError(f"{_key('limits.max_body_bytes')}={self.max_body_bytes}: must be >= 1024")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"{_key('limits.request_timeout_s')}={self.request_timeout_s}: "
                              "must be > 0")


@dataclass
class IngressConfig:
    """The FastAPI ingress deployment (HTTP, auth, validation, routing; no model)."""

    num_replicas: int = 1
    """Ingress replicas; it is light (no model), one is plenty below a few hundred requests/s."""
    num_cpus: float = 0.1
    """Ray logical CPUs per ingress replica (it mostly awaits the models)."""
    max_ongoing_requests: int = 256
    """Concurrent HTTP requests per ingress replica (Ray's default of 5 would throttle streams)."""
    max_queued_requests: int = 256
    """HTTP requests Serve's proxy holds for the ingress beyond that; more get HTTP 503 with
    ``Retry-After`` (``retry_after_s``). -1 = unbounded (not recommended)."""
    retry_after_s: float = 2.0
    """``Retry-After`` seconds of the proxy's 503 when the ingress queue is full."""

    def __post_init__(self):
        if self.num_replicas < 1:
            raise ConfigError(f"{_key('ingress.num_replicas')}={self.num_replicas}: must be >= 1")
        if self.num_cpus < 0:
            raise ConfigError(f"{_key('ingress.num_cpus')}={self.num_cpus}: must be >= 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"{_key('ingress.max_ongoing_requests')}: must be >= 1")
        if self.max_queued_requests < -1:
            raise ConfigError(f"{_key('ingress.max_queued_requests')}={self.max_queued_requests}: "
                              "-1 (unbounded) or >= 0")
        if not 0 <= self.retry_after_s <= 3600:
            raise ConfigError(f"{_key('ingress.retry_after_s')}={self.retry_after_s}: "
                              "must be in [0, 3600]")


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
        seen = set(models)
        for name, m in models.items():
            for pname in m.packs:
                if pname in seen or pname == self.served_model_name:
                    raise ConfigError(f"serve.models.{name}.packs.{pname}: the name is taken (by a "
                                      "model, another pack or serve.served_model_name); clients "
                                      "select a pack by its name, so names must be unique")
                seen.add(pname)
        names = list(self.routes())
        unknown = sorted(set(self.canary.weights) - set(names))
        if unknown:
            raise ConfigError(f"serve.canary.weights: unknown model(s) {', '.join(unknown)}; "
                              f"models and packs are {', '.join(names)}")
        if self.canary.weights and sum(self.canary.weights.values()) <= 0:
            raise ConfigError("serve.canary.weights: at least one weight must be > 0")

    # derived values
    def routes(self) -> dict[str, tuple[str, str]]:
        """{name clients send: (model deployment's model, pack or "" for the model itself)}."""
        out = {}
        for name, m in self.models.items():
            out[name] = (name, "")
            out.update({p: (name, p) for p in m.packs})
        return out

    def weights(self) -> dict[str, float]:
        """Normalised canary weights over every model and pack (0 for those not listed)."""
        w = self.canary.weights or {next(iter(self.models)): 1.0}
        total = sum(w.values())
        return {name: w.get(name, 0.0) / total for name in self.routes()}

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
    from llamapro.config import Config, read_config_data

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
    def local(path: str) -> str:
        p = Path(path).expanduser()
        if not path.startswith("demo:") and "://" not in path and not p.is_absolute() \
                and (root / p).exists():
            return str((root / p).resolve())
        return path

    for m in cfg.models.values():
        m.path = local(m.path)
        m.packs = {n: local(p) for n, p in m.packs.items()}
    return cfg


# --- application ----------------------------------------------------------------------------------

# Keys that change while serving: applied as deployment options / user_config, never build args, so
# changing them is a lightweight in-place update (Ray hashes build args into the code version).
_LIVE_TOP = ("canary", "limits", "autoscaling", "host", "port", "app_name", "route_prefix")
_LIVE_MODEL = ("autoscaling", "max_batch_size", "batch_wait_timeout_s", "max_ongoing_requests",
               "max_queued_requests", "retry_after_s")


def _ingress_user_config(cfg: ServeConfig) -> dict:
    return {"weights": cfg.weights(), "seed": cfg.canary.seed,
            "limits": dataclasses.asdict(cfg.limits),
            "retry_after_s": {n: cfg.models[m].retry_after_s for n, (m, _) in cfg.routes().items()}}


def _model_user_config(m: ModelServeConfig) -> dict:
    return {"max_batch_size": m.max_batch_size, "batch_wait_timeout_s": m.batch_wait_timeout_s}


def _ingress_spec(cfg: ServeConfig) -> dict:
    return {"alias": cfg.served_model_name, "api_key_env": cfg.api_key_env,
            "api_key_file": cfg.api_key_file, "models": list(cfg.models),
            "routes": {n: list(r) for n, r in cfg.routes().items()}}


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
    for k in ("num_replicas", "max_ongoing_requests", "max_queued_requests", "retry_after_s"):
        d["ingress"].pop(k, None)
    return {"serve": d}


def deployment_overrides(cfg: ServeConfig) -> list[dict]:
    """The live part of a config as Serve ``deployments:`` entries."""
    out = [{"name": INGRESS_NAME, **_ingress_options(cfg)}]
    for name in cfg.models:
        out.append({"name": model_deployment_name(name), **_model_options(cfg, name)})
    return out


def _ingress_options(cfg: ServeConfig) -> dict:
    i = cfg.ingress
    return {"num_replicas": i.num_replicas, "max_ongoing_requests": i.max_ongoing_requests,
            "max_queued_requests": i.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": i.retry_after_s},
            "user_config": _ingress_user_config(cfg)}


def _model_options(cfg: ServeConfig, name: str) -> dict:
    m = cfg.models[name]
    return {"autoscaling_config": cfg.autoscaling_of(name).to_ray(),
            "max_ongoing_requests": m.ongoing_limit(),
            "max_queued_requests": m.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": m.retry_after_s},
            "user_config": _model_user_config(m)}


def serve_deploy_config(cfg: ServeConfig, runtime_env: dict | None = None) -> dict:
    """A Ray Serve deploy config (``serve deploy``, ``serve run FILE``, KubeRay ``serveConfigV2``).

    Edits to ``deployments[].user_config`` / ``autoscaling_config`` / queue limits are applied in place;
    edits to ``args`` rebuild the app (replicas restart, rolling)."""
    app = {"name": cfg.app_name, "route_prefix": cfg.route_prefix, "import_path": IMPORT_PATH,
           "args": static_args(cfg), "deployments": deployment_overrides(cfg)}
    runtime_env = strip_secrets(runtime_env, cfg)
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
    from ray.serve.config import BackpressureConfig

    def opts(d: dict) -> dict:
        return {**d, "backpressure_config": BackpressureConfig(**d["backpressure_config"])}

    handles = {}
    for name, m in cfg.models.items():
        handles[name] = ModelServer.options(
            name=model_deployment_name(name),
            ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            **opts(_model_options(cfg, name)),
        ).bind(_model_spec(cfg, name))
    return OpenAIIngress.options(
        name=INGRESS_NAME,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
        **opts(_ingress_options(cfg)),
    ).bind(_ingress_spec(cfg), handles)


# --- deployments ----------------------------------------------------------------------------------

def _set_threads(n: int):
    import torch

    torch.set_num_threads(n)


class ModelServerImpl:
    """One model: tokenization on a tokenizer thread, generation on the engine's thread; the event
    loop only moves events (so one huge prompt never stalls the other streams of the replica).

    ``@serve.batch`` groups requests arriving together into one admission (one prefill forward pass);
    the engine merges each group into its running batch at the next token. The deployment is
    ``ModelServer`` below; this class stays importable under its own name so Ray pickles it by
    reference (a by-value copy would carry only some of this module's globals)."""

    def __init__(self, spec: dict):
        self.name = spec["name"]
        _set_threads(spec["threads"])
        self.engine = load_engine(spec)
        self.packs = getattr(self.engine, "packs", None)
        if self.packs is not None:
            # Ray Serve's model multiplexing: Serve routes a pack's requests to replicas that hold
            # it, calls this on a miss, and beyond the limit evicts the least recently used pack
            # (_LoadedPack.__del__). Wired here so the limit can come from the config.
            async def load_pack(pack: str):
                return await self._load_pack(pack)

            self._get_pack = serve.multiplexed(
                max_num_models_per_replica=spec.get("max_loaded_packs") or len(self.packs.names())
            )(load_pack)
        # One thread: a fast tokenizer is not safe to call from several threads at once.
        self._tokenizer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"llamapro-tokenize-{self.name}")
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

    def stats(self) -> dict:
        """The engine's rows: running / pending now, finished / cancelled / failed so far."""
        return {"replica": self.replica, **(self.engine.stats() if hasattr(self.engine, "stats")
                                            else {})}

    def memory(self) -> dict:
        """This replica's process memory (RSS, USS: pages only it holds) and the model's weights,
        counting shared (tied) tensors once; the packs whose blocks are loaded."""
        import psutil

        mi = psutil.Process().memory_full_info()
        model = getattr(self.engine, "model", None)
        seen, weights = set(), 0
        for t in (model.parameters() if model is not None else ()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                weights += t.numel() * t.element_size()
        return {"replica": self.replica, "pid": os.getpid(), "rss": mi.rss, "uss": mi.uss,
                "weights_bytes": weights,
                "pack_blocks_bytes": self.packs.block_bytes() if self.packs else 0,
                "loaded_packs": list(self.packs.loaded) if self.packs else []}

    async def _load_pack(self, pack: str) -> "_LoadedPack":
        await asyncio.wrap_future(self.engine.call(lambda e: e.packs.load(pack)))
        log.info("model %s: pack %s loaded (packs in memory: %s)", self.name, pack,
                 self.packs.loaded)
        return _LoadedPack(self.engine, pack)

    async def _select_pack(self, p: Prepared) -> dict | None:
        """The pack the request asked for (Serve's multiplexed model id; none = the base), loaded."""
        pack = serve.get_multiplexed_model_id()
        if not pack:
            return None
        if self.packs is None or pack not in self.packs.names():
            return {"error": APIError(404, f"The model '{pack}' is not served by {self.name}",
                                      param="model", code="model_not_found").to_dict()}
        try:
            await self._get_pack(pack)
        except Exception as e:
            log.exception("loading pack %s failed", pack)
            return {"error": engine_error(e).to_dict()}
        p.pack = pack
        return None

    async def _prepare(self, req: dict):
        loop = asyncio.get_running_loop()
        try:
            p = await loop.run_in_executor(self._tokenizer, self.engine.prepare, req)
            return p, await self._select_pack(p)
        except APIError as e:
            return None, {"error": e.to_dict()}
        except Exception as e:  # a tokenizer or chat-template bug: the request fails, not the replica
            log.exception("preparing a request failed")
            return None, {"error": engine_error(e).to_dict()}

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
        p, err = await self._prepare(req)
        if err:
            return err
        p.stream = False
        parts, last = [], None
        try:
            async for ev in self._events(p):
                parts.append(ev["text"])
                last = ev
        except APIError as e:  # the engine failed this row (and keeps serving)
            return {"error": e.to_dict()}
        finally:
            p.cancelled = True  # no-op when finished; frees the row if the caller went away
        return {"text": "".join(parts), "finish_reason": last["finish_reason"],
                "prompt_tokens": len(p.ids), "completion_tokens": last["completion_tokens"],
                "replica": self.replica, "batch_size": p.batch_size}

    async def stream(self, req: dict):
        """Events: the first carries prompt_tokens/replica/batch_size; then text deltas; the last
        has finish_reason. A validation or engine failure is an {"error": ...} event (the last)."""
        p, err = await self._prepare(req)
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
        except APIError as e:
            yield {"error": e.to_dict()}
        finally:
            p.cancelled = True


class _LoadedPack:
    """What ``@serve.multiplexed`` caches per pack; Serve calls ``__del__`` when it evicts it."""

    def __init__(self, engine, name: str):
        self.engine, self.name, self.live = engine, name, True

    def __del__(self):
        if self.live:  # once: Serve calls it on eviction, the collector again later
            self.live = False
            name = self.name
            self.engine.call(lambda e: e.packs.unload(name, e.pending_packs()))


ModelServer = serve.deployment(ModelServerImpl, name="model")

api = FastAPI(title="llamapro", docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.retry_after is not None:
        headers["Retry-After"] = str(max(0, math.ceil(e.retry_after)))
    return JSONResponse(e.body(), status_code=e.status, headers=headers or None)


# The API key never enters the app config (which `serve status` and the dashboard show): a deployer
# that can read it (e.g. a Ray job given it as an env var) hands the ingress only its SHA-256 through
# the cluster's internal key-value store, and the ingress compares digests.
_KV_NAMESPACE = "llamapro"


def _kv_key(app_name: str) -> bytes:
    return f"serve/{app_name}/api_key_sha256".encode()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def publish_api_key(cfg: ServeConfig) -> bool:
    """Give the ingress of ``cfg.app_name`` the SHA-256 of the key in ``$api_key_env`` of this
    process (when set), for replicas on nodes that lack the variable. Needs ``ray.init`` first."""
    key = os.environ.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""
    if not key:
        return False
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_kv_key(cfg.app_name), _digest(key).hex().encode(), overwrite=True,
                     namespace=_KV_NAMESPACE)
    return True


def _api_key_digest(spec: dict, app_name: str) -> bytes | None:
    """The ingress's key digest: its own env var or key file first, else what the deployer published;
    None when no key is configured. Raises when one is configured but nowhere to be found."""
    try:
        key = _read_api_key(spec)
    except RuntimeError as e:
        if not spec.get("api_key_env"):
            raise
        from ray.experimental.internal_kv import _internal_kv_get

        got = _internal_kv_get(_kv_key(app_name), namespace=_KV_NAMESPACE)
        if not got:
            raise RuntimeError(f"{e} (nor did the deployer publish it)") from None
        return bytes.fromhex(got.decode())
    return _digest(key) if key is not None else None


SECRET_ENV_RE = re.compile(r"(KEY|TOKEN|SECRET|PASSW|CREDENTIAL)", re.I)


def strip_secrets(runtime_env: dict | None, cfg: ServeConfig) -> dict | None:
    """The runtime env without the API key variable or any variable whose name looks secret: the
    runtime env is part of the app config that `serve status` and the dashboard display."""
    if not runtime_env or not runtime_env.get("env_vars"):
        return runtime_env
    env = {k: v for k, v in runtime_env["env_vars"].items()
           if k != cfg.api_key_env and not SECRET_ENV_RE.search(k)}
    dropped = sorted(set(runtime_env["env_vars"]) - set(env))
    if dropped:
        log.info("not copying secret env var(s) %s into the Serve app config", ", ".join(dropped))
    out = {k: v for k, v in runtime_env.items() if k != "env_vars"}
    if env:
        out["env_vars"] = env
    return out or None


def _cancel(response) -> None:
    """Cancel a model call, best effort: Serve's ``cancel`` re-raises how the call itself ended
    (a full queue, a finished request), which is no error here."""
    try:
        response.cancel()
    except Exception:
        pass


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


class OpenAIIngressImpl:
    """HTTP, auth, validation and canary routing; owns no model. Deployed as ``OpenAIIngress``."""

    def __init__(self, spec: dict, models: dict):
        self.alias = spec["alias"]
        # {name clients send: DeploymentHandle}; a pack's requests go to its base model's replicas,
        # tagged with the pack as Serve's multiplexed model id
        routes = spec.get("routes") or {n: [n, ""] for n in models}
        self.models = {n: (models[m].options(multiplexed_model_id=p) if p else models[m])
                       for n, (m, p) in routes.items()}
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:
            app_name = ""
        self._key_digest = _api_key_digest(spec, app_name)  # the key itself is not kept
        self.weights = {name: (1.0 if i == 0 else 0.0) for i, name in enumerate(self.models)}
        self.limits = dataclasses.asdict(LimitsConfig())
        self.retry_after = {name: 2.0 for name in self.models}
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
            self.limits = {**self.limits, **(user_config.get("limits") or {})}
            self.retry_after.update(user_config.get("retry_after_s") or {})
            seed = user_config.get("seed")
            if seed != self._seed:  # a new seed restarts the sequence; new weights alone do not
                self._seed = seed
                self.rng = random.Random(seed) if seed is not None else random.Random()
        log.info("canary weights now %s", weights)

    # helpers
    def _auth(self, request: Request):
        if self._key_digest is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(token.strip()),
                                                                 self._key_digest):
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
        """The JSON body, read in chunks up to ``limits.max_body_bytes`` (413 beyond, even when the
        client sends no Content-Length)."""
        self._auth(request)
        limit = int(self.limits["max_body_bytes"])
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_large(limit)
        return parse_json_body(bytes(raw))

    def _overloaded(self, name: str, e) -> APIError:
        retry = getattr(e, "retry_after_s", None)
        return APIError(503, f"Model '{name}' is at capacity (its queue is full); retry after the "
                        "Retry-After delay.", type="server_error", code="overloaded",
                        retry_after=retry if retry is not None else self.retry_after.get(name, 2.0))

    def _timed_out(self) -> APIError:
        return APIError(504, f"The model did not answer within {self.limits['request_timeout_s']:g}s "
                        "(serve.limits.request_timeout_s); the request was cancelled.",
                        type="server_error", code="timeout")

    async def _call(self, name: str, reqs: list[dict]) -> list[dict]:
        """Generate every request on model ``name`` concurrently. The first failure (an invalid
        prompt, a full queue, a timeout) cancels the others at once: their rows leave the batch
        instead of generating text nobody will receive."""
        from ray.serve.exceptions import BackPressureError

        responses = [self.models[name].generate.remote(r) for r in reqs]

        async def one(resp):
            res = await resp
            if "error" in res:
                raise APIError.from_dict(res["error"])
            return res

        try:
            async with asyncio.timeout(float(self.limits["request_timeout_s"])):
                return list(await asyncio.gather(*[one(r) for r in responses]))
        except BaseException as e:
            for r in responses:
                _cancel(r)
            if isinstance(e, BackPressureError):
                raise self._overloaded(name, e) from None
            if isinstance(e, TimeoutError):
                raise self._timed_out() from None
            raise

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
            (res,) = await self._call(name, [req])
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
            results = await self._call(
                name, [{"kind": "completion", "prompt": p, **sampling} for p in prompts])
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
        timeout = float(self.limits["request_timeout_s"])

        async def nxt():  # the next event, None at the end; waits at most request_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    return await gen.__anext__()
            except StopAsyncIteration:
                return None

        try:
            first = await nxt()
        except BaseException as e:
            _cancel(gen)
            if isinstance(e, BackPressureError):
                raise self._overloaded(name, e) from None
            if isinstance(e, TimeoutError):
                raise self._timed_out() from None
            raise
        if first is None:
            raise APIError(500, "the model produced no output", type="server_error")
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
            ev, last, failed = first, first, False
            try:
                if chat:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": name,
                                "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                   "content": ""},
                                             "finish_reason": None, "logprobs": None}]})
                while ev is not None:
                    if "error" in ev:  # the engine failed this row mid-stream
                        yield _sse({"error": {k: v for k, v in ev["error"].items()
                                              if k in ("message", "type", "param", "code")}})
                        ev, failed = None, True
                        break
                    last = ev
                    if ev["text"] or ev["finish_reason"]:
                        yield chunk(ev["text"], ev["finish_reason"])
                    ev = await nxt()
                if include_usage and not failed:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": name,
                                "choices": [], "usage": _usage(first["prompt_tokens"],
                                                               last["completion_tokens"])})
            except TimeoutError:
                yield _sse(self._timed_out().body())
            except Exception:
                log.exception("stream from model %s failed", name)
                yield _sse(APIError(500, "the stream failed", type="server_error").body())
            finally:
                if ev is not None:  # the client went away (or we failed): stop generating
                    _cancel(gen)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**self._headers(name, first), "Cache-Control": "no-cache"})


OpenAIIngress = serve.deployment(serve.ingress(api)(OpenAIIngressImpl), name=INGRESS_NAME)


# --- running it -----------------------------------------------------------------------------------

def deploy(cfg: ServeConfig, runtime_env: dict | None = None, wait_s: float = 600.0) -> dict:
    """Deploy (or redeploy) the app declaratively, exactly as ``serve deploy`` / KubeRay would, and
    wait until it runs. Redeploying a config that differs only in live keys updates replicas in
    place. Needs ``ray.init`` first; starts Serve's proxy on ``cfg.host:cfg.port`` if not running.
    Returns the deploy config it applied.

    The API key (``$api_key_env`` here) never enters that config: secret-looking env vars are
    dropped from ``runtime_env`` and the ingress gets only the key's SHA-256 (``publish_api_key``)."""
    from ray.serve._private import api as serve_private
    from ray.serve.schema import ServeDeploySchema

    conf = serve_deploy_config(cfg, runtime_env)
    key = os.environ.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""
    if key and key in json.dumps(conf):  # e.g. pasted into a model path or a non-secret-named var
        raise ConfigError("the API key appears in the Serve app config (which `serve status` and "
                          "the dashboard show); pass it only as the variable named by "
                          "serve.api_key_env")
    publish_api_key(cfg)
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


def job_runtime_env(cfg: ServeConfig | None = None) -> dict | None:
    """The runtime env of the Ray job this process runs in, reduced to what replicas need and
    without secrets (``strip_secrets``: the API key reaches the ingress as a digest instead)."""
    import ray

    env = dict(ray.get_runtime_context().runtime_env or {})
    env = {k: env[k] for k in JOB_RUNTIME_ENV_KEYS if env.get(k)}
    return strip_secrets(env, cfg) if cfg is not None else (env or None)


def smoke_chat(cfg: ServeConfig) -> dict:
    """One greedy chat request to a deployed app, with its API key when this process can read it."""
    from llamapro.pipeline import chat_once

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
        for p, path in m.packs.items():
            lines.append(f"    pack {p}: {path}  weight {w[p]:.2f}  (on the {name} replicas)")
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
