"""The structure check: transformers builds the base and the expanded model from their configs on
the meta device, and every expanded layer must have exactly the tensors of the base layer it came
from. Remembered in a cache keyed by everything the answer depends on, and run in a child process
beside the copy when this process has not imported transformers yet.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from llamapro.config import default_cache_dir
from llamapro.errors import CheckpointError
from llamapro.tensors import write_json_atomic

log = logging.getLogger(__name__)


def check_structure(base_config: dict, expanded_config: dict, new_sources: dict,
                    trust_remote_code: bool = False) -> dict:
    """Build base and expanded models from their configs on the meta device (no memory, any size)
    and check that every layer of the expanded model has exactly the parameter names and shapes of
    the base layer it came from. Catches a per-layer config rule we did not rewrite (a new block
    whose MLP kind or attention shape the config would change), which no key mapping can see.
    Needs only the two configs, so it runs before (and overlapping) the copy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamapro.expansion.surgery import find_layers  # imports torch: only when the check runs

    def layer_shapes(d):
        d = {k: v for k, v in d.items() if k not in ("transformers_version",)}
        cfg = AutoConfig.for_model(**d) if not trust_remote_code else AutoConfig.for_model(**d)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        return [{n: tuple(p.shape) for n, p in l.named_parameters()} for l in find_layers(m)[1]]

    base, exp = layer_shapes(base_config), layer_shapes(expanded_config)
    sources = {int(k): v for k, v in new_sources.items()}
    o = 0
    for i, shapes in enumerate(exp):
        src = sources.get(i)
        if src is None:
            src, o = o, o + 1
        if shapes != base[src]:
            diff = sorted(set(shapes.items()) ^ set(base[src].items()))[:4]
            raise CheckpointError(
                f"with the expanded config, layer {i} would not have the structure of base layer "
                f"{src} (differences: {diff}). The model has a per-layer config rule llamapro does "
                "not rewrite; nothing was written. Please report it."
            )
    return {"layers_checked": len(exp), "ok": True}


def _structure_cache_file(base_config: dict, expanded_config: dict, new_sources: dict,
                          trust_remote_code: bool) -> Path | None:
    """Where a passed structure check of exactly these inputs is remembered, or None (remote code,
    which can change under the same config, or ``LLAMAPRO_STRUCTURE_CACHE=0``).

    The answer is a function of the two configs, the new blocks' sources and the code that builds
    the model, so the key holds all of them: both configs, the sources, the versions of
    transformers and torch, size and mtime of the transformers files that decide the layer
    structure (so an edited or editable install misses), and the source of this check. Found
    without importing transformers, which is the cost the cache saves."""
    import hashlib
    import importlib.metadata
    import importlib.util

    if trust_remote_code or os.environ.get("LLAMAPRO_STRUCTURE_CACHE", "1").lower() in ("0", "false", "no"):
        return None
    try:
        spec = importlib.util.find_spec("transformers")
        pkg = Path(spec.submodule_search_locations[0])
        versions = {d: importlib.metadata.version(d) for d in ("transformers", "torch")}
    except Exception:  # an unusual install: no cache, the check itself says what is wrong
        return None
    code = {}
    for mt in {str(c.get("model_type", "")) for c in (base_config, expanded_config)}:
        for rel in ("modeling_utils.py", "configuration_utils.py", "modeling_layers.py",
                    f"models/{mt}/modeling_{mt}.py", f"models/{mt}/configuration_{mt}.py",
                    "models/auto/modeling_auto.py", "models/auto/configuration_auto.py"):
            try:
                st = (pkg / rel).stat()
                code[rel] = [st.st_size, st.st_mtime_ns]
            except OSError:
                code[rel] = None
    here = Path(__file__).resolve().parent
    own = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("structure.py", "surgery.py"))).hexdigest()

    def unversioned(c):
        return {k: v for k, v in c.items() if k != "transformers_version"}

    key = json.dumps({"base": unversioned(base_config), "expanded": unversioned(expanded_config),
                      "sources": {str(k): v for k, v in new_sources.items()}, "versions": versions,
                      "code": code, "package": str(pkg), "check": own}, sort_keys=True, default=str)
    return default_cache_dir() / "structure" / (hashlib.sha256(key.encode()).hexdigest() + ".json")


def _structure_cached(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())["result"]
        if result.get("ok") is True and isinstance(result.get("layers_checked"), int):
            return {**result, "cached": True}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    log.info("ignoring an unreadable structure-check cache entry %s; checking again", path)
    return None


def _structure_remember(path: Path | None, result: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"result": result, "checked_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError as e:  # a read-only cache costs only the next check's time
        log.info("could not remember the structure check in %s: %s", path, e)


def check_structure_isolated(base_config: dict, expanded_config: dict, new_sources: dict,
                             trust_remote_code: bool = False, isolate: bool | None = None) -> dict:
    """``check_structure``, remembered, and in a child Python when this process has not imported
    transformers.

    A passed check is remembered in ``$LLAMAPRO_CACHE/structure/`` under a key of everything its
    answer depends on (see ``_structure_cache_file``); expanding the same model with the same plan
    again (a retried job, ``--force``, a repeated Tune configuration) skips the import, and the
    result says ``cached: true``. Failures are never remembered. ``LLAMAPRO_STRUCTURE_CACHE=0``
    turns this off.

    The check is almost all import time (torch + transformers: ~4 s of CPU-bound Python). In a
    thread of this process it holds the GIL, which the copy beside it needs back after each
    ``copy_file_range``; a child has its own interpreter, and runs at low priority (in the
    benchmark at 8 GB the check took 9.7 s as a thread, 6.1 s as a child). When
    transformers is already loaded (a pipeline, a test) the check costs well under a second here
    (``isolate=None`` decides so; True/False force it).
    """
    cache = _structure_cache_file(base_config, expanded_config, new_sources, trust_remote_code)
    hit = _structure_cached(cache)
    if hit is not None:
        return hit
    result = {**_check_structure_somewhere(base_config, expanded_config, new_sources,
                                           trust_remote_code, isolate), "cached": False}
    _structure_remember(cache, {k: v for k, v in result.items() if k != "cached"})
    return result


def _check_structure_somewhere(base_config, expanded_config, new_sources, trust_remote_code,
                               isolate) -> dict:
    if isolate is False or (isolate is None and "transformers.modeling_utils" in sys.modules):
        return check_structure(base_config, expanded_config, new_sources, trust_remote_code)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [pkg_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    request = json.dumps({"base": base_config, "expanded": expanded_config, "sources": new_sources,
                          "trust_remote_code": trust_remote_code})
    proc = subprocess.run([sys.executable, "-c", "from llamapro.expansion.structure import _structure_child; "
                           "_structure_child()"], input=request, capture_output=True, text=True,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STRUCTURE ")]
    if not lines:
        raise CheckpointError(f"the structure check's child process failed (exit {proc.returncode}); "
                              f"nothing was written. Its output:\n{(proc.stderr or proc.stdout)[-2000:]}")
    answer = json.loads(lines[-1][len("STRUCTURE "):])
    if "error" in answer:
        if answer["type"] == "CheckpointError":
            raise CheckpointError(answer["error"])
        raise CheckpointError(f"transformers could not build the model from the expanded config "
                              f"({answer['type']}: {answer['error']}); nothing was written")
    return answer["result"]


def _structure_child() -> None:
    """Entry point of ``check_structure_isolated``'s child: a JSON request on stdin, one
    ``STRUCTURE {json}`` line on stdout."""
    req = json.load(sys.stdin)
    if hasattr(os, "nice"):  # the copy beside it is the critical path: yield the CPU to it
        os.nice(19)
    try:
        out = {"result": check_structure(req["base"], req["expanded"], req["sources"],
                                         req["trust_remote_code"])}
    except Exception as e:  # reported to the parent, which raises
        out = {"error": str(e), "type": type(e).__name__}
    print("STRUCTURE " + json.dumps(out), flush=True)
