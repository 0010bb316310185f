"""Running the app: deploy (or redeploy) a config declaratively and wait for it, read its status,
size the cluster it needs, and talk to it (one chat request, a one-screen description).
"""

import json
import os
import time
import urllib.request

from llamapro.config.serve import ServeConfig
from llamapro.errors import ConfigError
from llamapro.serve.app import quiet_ray_deprecations, serve_deploy_config
from llamapro.serve.auth import publish_api_key, read_api_key, strip_secrets


def deploy(cfg: ServeConfig, runtime_env: dict | None = None, wait_s: float = 600.0) -> dict:
    """Deploy (or redeploy) the app declaratively, exactly as ``serve deploy`` / KubeRay would, and
    wait until it runs. Redeploying a config that differs only in live keys updates replicas in
    place. Needs ``ray.init`` first; starts Serve's proxy on ``cfg.host:cfg.port`` if not running.
    Returns the deploy config it applied.

    The API key (``$api_key_env`` here) never enters that config: secret-looking env vars are
    dropped from ``runtime_env`` and the ingress gets only the key's SHA-256 (``publish_api_key``)."""
    from ray.serve._private import api as serve_private
    from ray.serve.schema import ServeDeploySchema

    if cfg.engine == "ray-llm":  # refused here (exit 2, nothing deployed), not as a failed deploy
        from llamapro.serve.llm import require_ray_llm

        require_ray_llm()
    conf = serve_deploy_config(cfg, runtime_env)
    key = os.environ.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""
    if key and key in json.dumps(conf):  # e.g. pasted into a model path or a non-secret-named var
        raise ConfigError("the API key appears in the Serve app config (which `serve status` and "
                          "the dashboard show); pass it only as the variable named by "
                          "serve.api_key_env")
    publish_api_key(cfg)
    with quiet_ray_deprecations():
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
    try:
        key = read_api_key({"api_key_env": cfg.api_key_env, "api_key_file": cfg.api_key_file})
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


def chat_once(base_url: str, model: str, question: str = "What is the capital of France?",
              max_tokens: int = 24, timeout: float = 300, api_key: str | None = None) -> dict:
    """One greedy chat completion from an OpenAI-compatible endpoint (``base_url`` ends in /v1):
    {model, answer, usage}."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{base_url.rstrip('/')}/chat/completions",
                                 data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        resp = json.loads(r.read())
    return {"model": resp.get("model"), "answer": resp["choices"][0]["message"]["content"],
            "usage": resp.get("usage")}
