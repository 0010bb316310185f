"""The steps of a run, wired from one config: what `llamapro train/run` and `jobs/` call.

Every step reads and writes plain directories under ``<run.output_dir>/<run.name>/``::

    expanded/          llamapro expand (+ proof in llamapro.json)
    train/             training run: model/ (HF checkpoint), metrics.jsonl, ray/ (Train checkpoints)
    baseline-<mode>/   the same for a baseline (full, lora, freeze_last_n) on the unexpanded base
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_ray(cfg=None) -> None:
    """Connect to the cluster of a Ray job (RAY_ADDRESS), or start the embedded local one.

    Locally we declare more logical CPUs than Train takes: with every CPU held by a Train worker,
    Ray Data's tokenizer actors never start and nothing errors.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    want = 4
    if cfg is not None:
        t = cfg.train
        want = max(want, t.num_workers * t.cpus_per_worker + int(cfg.data.actors * cfg.data.cpus_per_actor) + 1)
    ray.init(num_cpus=want, include_dashboard=False, log_to_driver=True)


def run_dir(cfg) -> Path:
    return Path(cfg.run.run_dir())


def expanded_dir(cfg) -> Path:
    return run_dir(cfg) / "expanded"


def expand_step(cfg, force: bool = True, progress: bool = True) -> dict:
    from . import steps
    from .demo import resolve_model

    return steps.expand(resolve_model(cfg.model.base), str(expanded_dir(cfg)), blocks=cfg.expand.blocks,
                        strategy=cfg.expand.strategy, positions=cfg.expand.positions or None,
                        residual_writers=cfg.expand.residual_writers or None, verify=cfg.expand.verify,
                        force=force, trust_remote_code=cfg.model.trust_remote_code, progress=progress)


def eval_blocks(cfg, model_dir: str, per_source: int) -> dict:
    """A small, fixed set of held-out blocks per source (same tokens at every evaluation)."""
    from .data import build_eval_dataset

    out = {}
    for src in cfg.data.sources:
        rows = build_eval_dataset(cfg.data, model_dir, src.name).take(per_source)
        if not rows:
            log.warning("source %s has no held-out blocks; raise its eval_fraction", src.name)
            continue
        out[src.name] = {"input_ids": [list(map(int, r["input_ids"])) for r in rows],
                         "labels": [list(map(int, r["labels"])) for r in rows]}
    return out


def train_step(cfg, mode: str | None = None) -> dict:
    """Train the expanded model (mode llamapro) or a baseline on the base; returns a summary."""
    import dataclasses

    from .data import build_train_dataset
    from .demo import resolve_model
    from .train import run_training

    tc = cfg.train if mode is None else dataclasses.replace(cfg.train, mode=mode)
    if tc.mode == "llamapro":
        model_dir = expanded_dir(cfg)
        if not (model_dir / "llamapro.json").is_file():
            log.info("no expanded checkpoint at %s yet: expanding first", model_dir)
            expand_step(cfg)
        out = run_dir(cfg) / "train"
    else:
        model_dir = Path(resolve_model(cfg.model.base))
        out = run_dir(cfg) / f"baseline-{tc.mode}"
    if not cfg.data.sources:
        raise ValueError("data.sources is empty: configure at least one corpus to train on")
    ensure_ray(cfg)
    train_ds = build_train_dataset(cfg.data, str(model_dir))
    per = tc.eval_batches * tc.micro_batch_size * tc.num_workers
    evals = eval_blocks(cfg, str(model_dir), per)
    early = tc.early_stop_on or (cfg.data.sources[0].name if cfg.data.sources else None)
    result = run_training(tc, str(model_dir), str(out), train_ds, evals, seq_len=cfg.data.seq_len,
                          name=f"{cfg.run.name}-{tc.mode}", seed=cfg.run.seed, early_stop_on=early,
                          trust_remote_code=cfg.model.trust_remote_code)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    return {"out": str(out), "model": str(out / "model"), "metrics": result.metrics}
