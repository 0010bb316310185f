"""The application builder: a validated ``ServeConfig`` becomes the bound Serve app (one ingress, one
deployment per model) or a declarative deploy config (``serve deploy``, KubeRay ``serveConfigV2``).

``build_app`` is the import path Serve config files name (``llamapro.serve:build_app``). Keys that can
change while serving are deployment options / ``user_config``, never build args, so changing them is
a lightweight in-place update (Ray hashes build args into the code version).
"""

import contextlib
import dataclasses
import json
import os

from llamapro.config import Config, from_dict, read_config_data
from llamapro.config.serve import (
    AutoscalingConfig,
    ModelServeConfig,
    ServeConfig,
    absolutize_paths,
    serve_config_from_dict,
)
from llamapro.errors import ConfigError
from llamapro.serve.auth import strip_secrets
from llamapro.serve.deployments import ModelServer, model_deployment_name
from llamapro.serve.ingress import INGRESS_NAME, OpenAIIngress

IMPORT_PATH = "llamapro.serve:build_app"


@contextlib.contextmanager
def quiet_ray_deprecations():
    """Ray 2.60 marks ``metrics_interval_s`` deprecated (to become env vars) yet still uses it as the
    only per-deployment push interval; don't repeat that warning on every validation."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*",
                                category=DeprecationWarning)
        yield


def ray_autoscaling(a: AutoscalingConfig) -> dict:
    """The ``autoscaling_config`` dict for Ray, checked against Ray's own schema."""
    d = {k: v for k, v in dataclasses.asdict(a).items() if v is not None}
    from ray.serve.config import AutoscalingConfig as RayAutoscaling

    try:
        with quiet_ray_deprecations():
            RayAutoscaling(**d)
    except Exception as e:  # pydantic ValidationError; keep this module free of pydantic types
        raise ConfigError(f"serve.autoscaling: Ray rejects {d}: {e}") from None
    return d


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
    if d.get("engine") == "llamapro":  # the default: deploy configs (and code versions) as before
        d.pop("engine")
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
    return {"autoscaling_config": ray_autoscaling(cfg.autoscaling_of(name)),
            "max_ongoing_requests": m.ongoing_limit(),
            "max_queued_requests": m.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": m.retry_after_s},
            "user_config": _model_user_config(m)}


def serve_deploy_config(cfg: ServeConfig, runtime_env: dict | None = None) -> dict:
    """A Ray Serve deploy config (``serve deploy``, ``serve run FILE``, KubeRay ``serveConfigV2``).

    Edits to ``deployments[].user_config`` / ``autoscaling_config`` / queue limits are applied in place;
    edits to ``args`` rebuild the app (replicas restart, rolling)."""
    if cfg.engine == "ray-llm":  # Ray Serve LLM names its own deployments: the whole section is args
        app = {"name": cfg.app_name, "route_prefix": cfg.route_prefix, "import_path": IMPORT_PATH,
               "args": {"serve": json.loads(json.dumps(dataclasses.asdict(cfg)))}}
    else:
        app = {"name": cfg.app_name, "route_prefix": cfg.route_prefix, "import_path": IMPORT_PATH,
               "args": static_args(cfg), "deployments": deployment_overrides(cfg)}
    runtime_env = strip_secrets(runtime_env, cfg)
    if runtime_env:
        app["runtime_env"] = runtime_env
    return {"proxy_location": "EveryNode",
            "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [app]}


def load_serve_config(path: str | os.PathLike | None = None, overrides=None) -> ServeConfig:
    """Load the ``serve:`` section of a llamapro YAML config strictly, with dotted overrides
    (``serve.canary.weights.expanded=0.5``). Other top-level sections are checked by
    ``llamapro.config.Config`` so a typo anywhere is still an error."""
    data = read_config_data(path, overrides)
    serve_section = data.pop("serve", None)
    if serve_section is not None and not isinstance(serve_section, dict):
        raise ConfigError("serve: expected a mapping")
    from_dict(Config, data)  # the other sections: strict as everywhere else
    return serve_config_from_dict(serve_section)


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
    """The bound Serve application for a validated config (``serve.engine: ray-llm``: Ray Serve
    LLM's, built by :func:`llamapro.serve.llm.app_from_serve_config`, which refuses without vLLM
    and a GPU)."""
    if cfg.engine == "ray-llm":
        from llamapro.serve.llm import app_from_serve_config

        return app_from_serve_config(cfg)
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
