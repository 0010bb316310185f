"""The ``serve:`` section of the config tree: what `llamapro serve`, `serve run` and `serve deploy`
serve (models, autoscaling, canary weights, limits, ingress), loaded strictly. Pure Python, no ray.

Keys that can change while serving (canary weights, limits, autoscaling, batch sizes, queue limits)
become deployment options or ``user_config`` (``llamapro.serve.app``); everything else is an argument
of ``build_app`` and changing it restarts replicas.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llamapro.config.loader import from_dict
from llamapro.errors import ConfigError

ENGINES = ("auto", "transformers", "vllm")
APP_ENGINES = ("llamapro", "ray-llm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The dotted path of the section being built, so a nested section's __post_init__ names its full key
# (serve.models.base.autoscaling.max_replicas) however it was reached.
_PATH: contextvars.ContextVar[str] = contextvars.ContextVar("llamapro_serve_path", default="serve")


def _key(name: str) -> str:
    return f"{_PATH.get()}.{name}"


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
    engine: str = "llamapro"
    """Which application serves: ``llamapro`` (llamapro's own ingress and one deployment per model,
    each with its model's ``engine``; the CPU path) or ``ray-llm`` (Ray Serve LLM: vLLM engines
    from ``ray.serve.llm`` behind llamapro's API key, limits and canary weights,
    ``llamapro.serve.llm``). ray-llm needs vLLM and a CUDA GPU in the cluster and is refused
    without them; it serves no packs, and each model's ``max_context`` (0: the model's own),
    ``max_batch_size``, autoscaling min/max replicas, ``dtype`` and ``vllm`` keys configure its
    vLLM engine."""
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
        if self.engine not in APP_ENGINES:
            raise ConfigError(f"serve.engine={self.engine!r}: choose one of {', '.join(APP_ENGINES)}")
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
        if self.engine == "ray-llm":
            for name, m in models.items():
                if m.packs:
                    raise ConfigError(f"serve.models.{name}.packs: serve.engine=ray-llm serves no "
                                      "packs; apply them (`llamapro apply`) and serve the result as "
                                      "a model, or use serve.engine: llamapro")
                if m.engine == "transformers" or m.device == "cpu":
                    raise ConfigError(f"serve.models.{name}: engine transformers / device cpu "
                                      "contradicts serve.engine=ray-llm (vLLM on a GPU); use "
                                      "serve.engine: llamapro for the transformers engine")
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

