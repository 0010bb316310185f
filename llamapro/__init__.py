"""llamapro: LLaMA-Pro block expansion with proven function preservation, trained on Ray.

The Python API, for scripts rather than the command line (each function is what the `llamapro`
verb of the same name runs, and takes the same inputs)::

    import llamapro

    meta = llamapro.expand("demo:smollm2-135m-instruct", "runs/grown", blocks=2)
    llamapro.verify("runs/grown")                    # raises llamapro.IdentityError if not
    llamapro.strip("runs/grown", "runs/base-again")  # the exact base again

    run = llamapro.train("jobs/configs/demo.yaml", ["train.max_steps=8"])   # Ray Train + DeepSpeed
    results = llamapro.evaluate("jobs/configs/demo.yaml")                    # gate, report
    llamapro.export("runs/demo", "runs/demo-export")
    llamapro.fuse("runs/demo", "runs/demo-fused", method="weighted", alpha=0.5)
    llamapro.pack("runs/demo", "runs/demo-pack")
    llamapro.apply("demo:smollm2-135m-instruct", ["runs/demo-pack"], "runs/demo-applied")

Functions that take a ``config`` accept a YAML path, a :class:`llamapro.config.Config` (see
``llamapro.load_config``), a plain dict, or None (the built-in defaults), plus dotted
``overrides`` such as ``["expand.blocks=4"]``. Paths of runs may be URIs (``s3://``, ``file://``).
Every deliberate failure raises a :class:`llamapro.LlamaproError` whose ``exit_code`` is what the
CLI exits with.

``import llamapro`` imports nothing heavy: each function imports its step when called.
The steps themselves live in subpackages named for what they are (``llamapro.expansion``,
``llamapro.training``, ``llamapro.eval``, ``llamapro.publish``, ...): see docs/architecture.md.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "expand", "verify", "strip", "train", "evaluate", "export", "fuse", "pack", "apply", "run",
    "load_config", "Config", "LlamaproError", "BadInputError", "IdentityError", "GateFailed",
    "__version__",
]


# --- the API ----------------------------------------------------------------------------------------

def expand(base, out, blocks: int | None = None, *, strategy: str = "even", positions=None,
            residual_writers=None, verify: bool = True, force: bool = False,
            trust_remote_code: bool = False, progress: bool = False) -> dict:
    """Insert ``blocks`` identity blocks into ``base`` (an HF directory, a hub id, or
    ``demo:smollm2-135m-instruct``) and write the result to ``out``, then prove the identity
    (logits and greedy generation equal the base's) unless ``verify`` is False.

    Placement: ``strategy`` (even, top, bottom, middle) or ``positions``, the indices of the new
    blocks in the expanded model. ``out`` must not exist unless ``force``. Returns the metadata
    also written to ``out/llamapro.json`` (``new_layer_indices``, ``verification``, ...).
    Raises IdentityError (the proof failed) or a BadInputError (the message says what to fix)."""
    from llamapro.expansion.api import expand

    return expand(str(base), str(out), blocks=blocks, strategy=strategy,
                  positions=positions, residual_writers=residual_writers, verify=verify, force=force,
                  trust_remote_code=trust_remote_code, progress=progress)


def verify(checkpoint, base=None, *, max_new_tokens: int = 16, trust_remote_code: bool = False) -> dict:
    """Prove again that an expanded ``checkpoint`` computes what its base computed (``base``:
    default the recorded base, else the checkpoint with its new blocks skipped). Returns the
    metadata with the proof's numbers under ``verification``; raises IdentityError if it fails."""
    from llamapro.expansion.api import verify_checkpoint

    return verify_checkpoint(str(checkpoint), base=None if base is None else str(base),
                             max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code,
                             progress=False)


def strip(checkpoint, out, *, force: bool = False, pack: str | None = None) -> dict:
    """Remove the inserted blocks of ``checkpoint`` again, writing ``out`` (``equals_base`` in
    the result: tensors and config are the recorded base's, bit for bit). With ``pack`` (a name
    or stack position), remove only that pack from a model made by :func:`apply`."""
    if pack is not None:
        from llamapro.publish.pack import strip_pack

        return strip_pack(str(checkpoint), str(out), pack, force=force)
    from llamapro.expansion.api import strip as strip_blocks

    return strip_blocks(str(checkpoint), str(out), force=force, progress=False)


def train(config=None, overrides=(), *, mode: str | None = None) -> dict:
    """Train the inserted blocks of the config's run (expanding first if needed) with Ray Train +
    DeepSpeed, or with ``mode`` (full, lora, freeze_last_n) the baseline ``run.baselines`` would.
    Starts a local Ray cluster unless one is running or ``RAY_ADDRESS`` is set. Returns
    ``{"out": run dir, "model": trained checkpoint, "metrics": ...}``."""
    from llamapro.pipeline import train_step

    return train_step(_config(config, overrides), mode=mode)


def evaluate(config=None, overrides=(), *, run=None, checkpoint=None, heldout: dict | None = None) -> dict:
    """Evaluate a trained run (default: the config's run directory) against its base: held-out
    perplexity, greedy agreement on regression prompts, the knowledge battery if enabled, the
    regression gate (``results["gate"]["passed"]``), and the report in ``RUN/report``."""
    from llamapro.pipeline import eval_step

    return eval_step(_config(config, overrides), run=None if run is None else str(run),
                     checkpoint=None if checkpoint is None else str(checkpoint), heldout=heldout)


def export(source, out, config=None, overrides=(), *, force: bool = False, format: str = "hf",
           quant: str | None = None) -> dict:
    """Export a run (its ``model/``) or a checkpoint to ``out``: a standard HF directory with a
    model card (``format`` hf; adapters merged), or ``gguf`` (``quant``: f16, q8_0, ...),
    ``torchao-int8``, ... The config's ``export`` section sets shard size and dtype. Atomic;
    an existing ``out`` is replaced only with ``force``. Returns the export metadata."""
    from llamapro.pipeline import export_step

    return export_step(_config(config, overrides), str(source), str(out), force=force, fmt=format,
                       quant=quant)


def fuse(source, out, config=None, overrides=(), *, method: str | None = None, alpha=None,
         force: bool = False) -> dict:
    """One standard HF model from a trained run: ``method`` residual (the trained blocks as they
    are) or weighted (each block = (1 - alpha) x identity init + alpha x trained; ``alpha`` a
    number in [0, 1] or "auto": the largest new-domain gain that passes the regression gate).
    Raises GateFailed (NoAlphaPassesGate) when no alpha passes. Returns the fusion metadata."""
    from llamapro.pipeline import fuse_step

    extra = [f"fuse.{k}={v}" for k, v in (("method", method), ("alpha", alpha)) if v is not None]
    return fuse_step(_config(config, [*overrides, *extra]), str(source), str(out), force=force,
                     alpha_given=alpha is not None)


def pack(source, out, *, name: str | None = None, force: bool = False) -> dict:
    """The inserted blocks of a trained (or expanded) run as a small pack for its base, with the
    insertion map and the base's fingerprint (:func:`apply` puts it back). Returns pack.json."""
    from llamapro.pipeline import pack_step

    return pack_step(str(source), str(out), force=force, name=name)


def apply(base, packs, out, *, force: bool = False) -> dict:
    """A standard HF checkpoint of ``base`` with ``packs`` (paths, stacked in order) inserted,
    each checked against the base's fingerprint and proven to leave the base underneath."""
    from llamapro.publish.pack import apply_packs

    packs = [packs] if isinstance(packs, (str, bytes)) or hasattr(packs, "__fspath__") else packs
    return apply_packs(str(base), [str(p) for p in packs], str(out), force=force)


def run(config=None, overrides=(), *, quick: bool = False) -> dict:
    """The whole pipeline of a config, as `llamapro run`: expand -> verify -> train -> evaluate
    (gate) -> report -> export -> serve smoke. ``quick``: a few-minute smoke run of every step."""
    from llamapro.pipeline import QUICK, run_pipeline

    return run_pipeline(_config(config, [*(QUICK if quick else []), *overrides]), quick=quick)


def _config(config, overrides=()):
    """A Config from a YAML path, a Config, a dict or None, with dotted ``overrides`` applied."""
    from llamapro.config import Config, apply_overrides, from_dict, load_config, to_dict

    overrides = list(overrides)
    if isinstance(config, Config):
        return from_dict(Config, apply_overrides(to_dict(config), overrides)) if overrides else config
    if isinstance(config, dict):
        return from_dict(Config, apply_overrides(dict(config), overrides))
    return load_config(config, overrides)


# --- lazy names ----------------------------------------------------------------------------------

_LAZY = {
    "load_config": "llamapro.config", "Config": "llamapro.config",
    "LlamaproError": "llamapro.errors", "BadInputError": "llamapro.errors",
    "IdentityError": "llamapro.errors", "GateFailed": "llamapro.errors",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
