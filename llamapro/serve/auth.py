"""The API key: read where the ingress runs, compared by SHA-256 digest, handed over by a deployer
through Ray's internal key-value store; and secret-looking env vars kept out of the app config.
"""

import hashlib
import logging
import os
import re
from pathlib import Path

from llamapro.config.serve import ServeConfig

log = logging.getLogger("ray.serve")


# The API key never enters the app config (which `serve status` and the dashboard show): a deployer
# that can read it (e.g. a Ray job given it as an env var) hands the ingress only its SHA-256 through
# the cluster's internal key-value store, and the ingress compares digests.
_KV_NAMESPACE = "llamapro"


def _kv_key(app_name: str) -> bytes:
    return f"serve/{app_name}/api_key_sha256".encode()


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def publish_api_key(cfg: ServeConfig) -> bool:
    """Give the ingress of ``cfg.app_name`` the SHA-256 of the key in ``$api_key_env`` of this
    process (when set), for replicas on nodes that lack the variable. Needs ``ray.init`` first."""
    key = os.environ.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""
    if not key:
        return False
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_kv_key(cfg.app_name), key_digest(key).hex().encode(), overwrite=True,
                     namespace=_KV_NAMESPACE)
    return True


def api_key_digest(spec: dict, app_name: str) -> bytes | None:
    """The ingress's key digest: its own env var or key file first, else what the deployer published;
    None when no key is configured. Raises when one is configured but nowhere to be found."""
    try:
        key = read_api_key(spec)
    except RuntimeError as e:
        if not spec.get("api_key_env"):
            raise
        from ray.experimental.internal_kv import _internal_kv_get

        got = _internal_kv_get(_kv_key(app_name), namespace=_KV_NAMESPACE)
        if not got:
            raise RuntimeError(f"{e} (nor did the deployer publish it)") from None
        return bytes.fromhex(got.decode())
    return key_digest(key) if key is not None else None


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


def read_api_key(spec: dict) -> str | None:
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
