"""Ray, started or joined in one place: ``ensure_ray(purpose, ...)``.

Inside a Ray job (``RAY_ADDRESS`` set) or given an ``address``, the driver joins that cluster;
otherwise it starts a local one sized by the caller. Authentication is Ray's own: a cluster started
with ``RAY_AUTH_MODE=token`` is joined with the token in ``RAY_AUTH_TOKEN`` (or Ray's token file),
read by ``ray.init`` from the environment; nothing here handles tokens.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def spare_cpus() -> int:
    """Logical CPUs for a local cluster that runs Ray Data actors next to other work: at least 4,
    so the tokenizer actors always get one (with every CPU held, Ray Data starves silently)."""
    return max(4, os.cpu_count() or 1)


def ensure_ray(purpose: str, *, num_cpus: int | None = None, resources: dict | None = None,
               log_to_driver: bool = True, address: str | None = None, namespace: str | None = None,
               include_dashboard: bool | None = None, quiet_data: bool = False,
               publish_address: bool = False, **init_kw) -> bool:
    """Make sure this process is connected to Ray; return True when this call ran ``ray.init``
    (the caller then owns the ``ray.shutdown``), False when Ray was already initialized.

    ``purpose`` names the caller in the log. Where it connects:

    - ``address=None``: the job's cluster when ``RAY_ADDRESS`` is set (``ray.init`` reads it),
      else a new local cluster;
    - ``address="local"``: always a new local cluster, even inside a job;
    - any other ``address``: that cluster.

    Only a new local cluster takes ``num_cpus``, ``resources``, ``include_dashboard`` (None: Ray's
    default, which keeps the dashboard; Train V2 cleans up placement groups through the State API
    it serves, so keep it for training and tuning and pass False for local tools) and ``init_kw``
    (e.g. ``_system_config``). ``log_to_driver`` and ``namespace`` apply either way.
    ``quiet_data`` turns off Ray Data's progress bars and execution banners (for tools whose
    output is a table). ``publish_address`` (a new local cluster only) picks the GCS port up front
    and gives every worker ``RAY_ADDRESS`` in its runtime env, so Train V2's placement-group
    cleaner finds this cluster even when another Ray instance runs on the machine (tuning needs it).
    """
    import ray

    if ray.is_initialized():
        return False
    if quiet_data:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    common = {"log_to_driver": log_to_driver}
    if namespace is not None:
        common["namespace"] = namespace
    join = address if address not in (None, "local") else (
        None if address == "local" else os.environ.get("RAY_ADDRESS"))
    if join:
        log.info("%s: joining the Ray cluster at %s", purpose, join)
        ray.init(**({"address": address} if address else {}), **common)
    else:
        local = dict(common, **init_kw)
        if address == "local" or publish_address:
            local["address"] = "local"
        if num_cpus is not None:
            local["num_cpus"] = num_cpus
        if resources:
            local["resources"] = resources
        if include_dashboard is not None:
            local["include_dashboard"] = include_dashboard
        log.info("%s: starting a local Ray cluster (%s CPUs)", purpose, num_cpus or "all")
        if publish_address:
            _init_publishing_address(ray, local)
        else:
            ray.init(**local)
    if quiet_data:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    return True


def _init_publishing_address(ray, kw: dict) -> str:
    """``ray.init(**kw)`` for a local cluster whose workers know its address (``RAY_ADDRESS`` in
    the job's runtime env). The GCS port is chosen up front so the address is known before the
    workers start."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    env = dict((kw.get("runtime_env") or {}).get("env_vars") or {}, RAY_ADDRESS=address)
    kw = dict(kw, runtime_env=dict(kw.get("runtime_env") or {}, env_vars=env))
    old = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(**kw)
    finally:
        if old is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = old
    return ray.get_runtime_context().gcs_address
