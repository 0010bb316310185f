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
                    thread (never on the replica's event loop); ``@serve.batch`` groups concurrent
                    arrivals into one admission (one prefill); generation runs on one engine
                    thread, off the event loop, batching continuously
                    (a request joins the running batch at the next token, leaves it when done).

Overload is answered, never queued without bound: each model's queue at the ingress is bounded
(``max_queued_requests``), the ingress's own queue too, bodies are capped; a full queue answers 503 with
``Retry-After``. A failed prefill or decode step fails its requests with a 500/503 and the engine keeps
serving; ``limits.request_timeout_s`` bounds every request.

The modules, bottom to top (in the spirit of Ray Serve LLM's layout):

``llamapro.config.serve``  the ``serve:`` config section (``ServeConfig``; pure Python, no ray)
``protocol``     request parsing and validation, OpenAI errors (pure)
``engine``       the batching engines (transformers, vLLM) behind one protocol
``packs``        packs served on their base in one replica (per-row gating)
``deployments``  the model deployment: a shim between an engine and the ingress
``auth``         the API key (read, digest, handed over) and secrets kept out of app configs
``ingress``      the FastAPI ingress: auth, validation, limits, canary routing
``app``          the builder: config -> bound app (``build_app``) or deploy config
``client``       deploy, wait, status, cluster size, one chat request, describe
``llm``          Ray Serve LLM (vLLM on a GPU) behind llamapro's key, limits and canary

This package's names are loaded lazily: ``import llamapro.serve`` (or a config import) starts no Ray;
``llamapro.serve:build_app`` resolves to ``llamapro.serve.app.build_app``.
"""

import importlib

_EXPORTS = {
    "llamapro.config.serve": (
        "AutoscalingConfig", "CanaryConfig", "IngressConfig", "LimitsConfig", "ModelServeConfig",
        "ServeConfig", "absolutize_paths", "serve_config_from_dict",
    ),
    "llamapro.serve.protocol": ("APIError",),
    "llamapro.serve.engine": (
        "Prepared", "TransformersEngine", "VLLMEngine", "engine_error", "load_engine",
        "select_engine",
    ),
    "llamapro.serve.deployments": ("ModelServer", "ModelServerImpl", "model_deployment_name"),
    "llamapro.serve.auth": ("publish_api_key", "strip_secrets"),
    "llamapro.serve.ingress": ("INGRESS_NAME", "OpenAIIngress", "OpenAIIngressImpl"),
    "llamapro.serve.app": (
        "IMPORT_PATH", "app_from_config", "build_app", "deployment_overrides", "load_serve_config",
        "serve_deploy_config", "static_args",
    ),
    "llamapro.serve.client": (
        "JOB_RUNTIME_ENV_KEYS", "chat_once", "cluster_cpus_needed", "deploy", "describe",
        "job_runtime_env", "replica_counts", "smoke_chat", "wait_running",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [*sorted(_WHERE)]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
