"""One trial, run in a Tune trial actor: its own training config, its own expansion of the base,
the held-out rows it evaluates and the base's losses on them, and its Ray Train run, which reports
the objective to Tune at every held-out evaluation. Also what the driver prepares once for every
trial (the held-out blocks, the base's losses, small training sets)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

from llamapro.artifacts import ExpansionMetadata, read_metadata
from llamapro.config import Config, ConfigError, from_dict, to_dict
from llamapro.data import build_train_dataset, load_tokenizer
from llamapro.eval import heldout_loss
from llamapro.expansion.api import require_proven
from llamapro.loading import load_model
from llamapro.pipeline import eval_blocks, expand_step, expanded_dir, run_dir
from llamapro.tensors import write_json_atomic
from llamapro.tune.objective import TrialObjective
from llamapro.tune.plan import TunePlan
from llamapro.tune.space import apply_params, check_stages, eval_rows_of, flat_params, shares_data


def _whole_rows(evals: dict, world: int) -> dict:
    """Each Train rank evaluates len // world rows: keep a multiple of the world size, so every
    row passed is evaluated and the base's loss is measured on exactly the same rows."""
    out = {}
    for name, s in evals.items():
        n = len(s["input_ids"]) // world * world
        if n:
            out[name] = {"input_ids": s["input_ids"][:n], "labels": s["labels"][:n]}
    return out


def base_losses(base_dir: str, evals: dict, cache_dir: Path, batch_size: int, dtype: str,
                trust_remote_code: bool = False) -> dict:
    """The base's held-out loss per set: the expanded model's step-0 loss (identity), computed once
    per distinct held-out data and cached (every trial of a typical space shares it)."""
    blob = json.dumps({"base": base_dir, "dtype": dtype, "sets": evals}, sort_keys=True).encode()
    path = cache_dir / f"{hashlib.blake2b(blob, digest_size=12).hexdigest()}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    model = load_model(base_dir, dtype=dtype, device="auto", trust_remote_code=trust_remote_code)
    out = {name: heldout_loss(model, blocks, batch_size=batch_size)["loss"] for name, blocks in evals.items()}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, out, indent=1)  # concurrent trials may compute the same baseline
    return out


def _reporting(objective: TrialObjective) -> dict:
    """``run_training`` keywords of a trial: Ray's stock ``TuneReportCallback`` (made inside the
    Tune trial) and the objective, computed in the training loop at every report."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return {"callbacks": [TuneReportCallback()], "report_metrics": objective}


def trial_config(plan: TunePlan, params: dict, trial_id: str) -> Config:
    """The trial's training config: the plan's base with the trial's point put in. A point whose
    train.mode is a baseline trains the unexpanded base at the same budget (``baseline_of``)."""
    d = apply_params(copy.deepcopy(plan.base), flat_params(params))
    d["run"]["output_dir"] = str(Path(plan.exp_dir) / "trials")
    d["run"]["name"] = trial_id
    return from_dict(Config, d)


def training_yaml(cfg: Config) -> str:
    """A config `llamapro train --config` runs as it is (the tune section dropped)."""
    d = to_dict(cfg)
    d.pop("tune", None)
    return yaml.safe_dump(d, sort_keys=False)


def prepare_shared(cfg: Config, plan: TunePlan, say=print) -> dict:
    """What every trial reads and nobody mutates, prepared once by the driver: the held-out blocks
    (each trial takes its first rows), the base's losses on them, and for small budgets the
    training blocks themselves (materialized in the object store)."""
    if not shares_data(plan.space):
        return {}
    base_dir = plan.base["model"]["base"]
    shared = {"evals": eval_blocks(cfg, base_dir, plan.max_eval_rows)}
    if plan.shared_train:
        say(f"[tune] tokenizing {plan.max_train_blocks} training blocks once for every trial")
        shared["train_ds"] = build_train_dataset(cfg.data, load_tokenizer(base_dir)).limit(
            plan.max_train_blocks).materialize()
    trial_evals(cfg, plan, shared)  # the base's losses on the usual rows, cached for the trials
    return shared


def trial_evals(cfg: Config, plan: TunePlan, shared: dict) -> tuple[dict, dict]:
    """(held-out rows this trial evaluates, the base's losses on exactly those rows)."""
    tc = cfg.train
    n = eval_rows_of(cfg)
    if "evals" in shared:
        evals = {k: {"input_ids": v["input_ids"][:n], "labels": v["labels"][:n]}
                 for k, v in shared["evals"].items()}
    else:
        evals = eval_blocks(cfg, str(trial_model_dir(cfg)), n)
    sets = plan.domain_sets + plan.retention_sets
    evals = _whole_rows({k: v for k, v in evals.items() if k in sets}, tc.num_workers)
    missing = [s for s in sets if s not in evals]
    if missing:
        raise ConfigError(f"held-out sets {missing} have fewer than {tc.num_workers} blocks of "
                          f"{cfg.data.seq_len} tokens; raise their eval_fraction")
    bf16 = tc.dtype == "bfloat16" or (tc.use_gpu and tc.dtype == "auto")
    baseline = base_losses(cfg.model.base, evals, Path(plan.exp_dir) / "baselines",
                           tc.micro_batch_size, "bfloat16" if bf16 else "float32",
                           cfg.model.trust_remote_code)
    return evals, baseline


def trial_model_dir(cfg: Config) -> Path:
    """What a trial trains: its own expansion of the base (mode llamapro), or the unexpanded base
    itself (a baseline: full, lora, freeze_last_n; never written to)."""
    return expanded_dir(cfg) if cfg.train.mode == "llamapro" else Path(cfg.model.base)


def run_trial(params: dict, plan: TunePlan, shared: dict | None = None) -> None:
    """The Tune function trainable: one complete training run of one point of the space."""
    import ray.data
    from ray import tune

    from llamapro.training import run_training  # imports torch (the driver needs none of it)

    ray.data.DataContext.get_current().enable_progress_bars = False
    shared = shared or {}
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(plan, params, trial_id)
    rd = run_dir(cfg)
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "config.yaml").write_text(training_yaml(cfg))
    (rd / "trial.json").write_text(json.dumps({"trial_id": trial_id, "params": flat_params(params)},
                                              default=str))
    exp = trial_model_dir(cfg)
    if cfg.train.mode == "llamapro":
        # expansion inside the trial, from the base, streaming; a restarted trial reuses its own
        meta = read_metadata(exp) if exp.is_dir() else None
        if meta is None or (cfg.expand.verify and not (meta.verification or {}).get("ok")):
            meta = ExpansionMetadata.of(expand_step(cfg, force=True, progress=False))
        require_proven(meta, cfg.train.allow_unproven, str(exp))
        check_stages(cfg, len(meta.new_layer_indices))
    tc = cfg.train
    # every held-out evaluation is a Tune report (ASHA decides there) and a checkpoint
    tc_run = dataclasses.replace(tc, checkpoint_every=tc.eval_every)
    train_ds = (shared["train_ds"] if "train_ds" in shared
                else build_train_dataset(cfg.data, load_tokenizer(str(exp))))
    evals, baseline = trial_evals(cfg, plan, shared)
    result = run_training(tc_run, str(exp), str(rd), train_ds, evals, seq_len=cfg.data.seq_len,
                          name=f"train-{trial_id}", seed=cfg.run.seed,
                          early_stop_on=tc.early_stop_on or plan.domain_sets[0],
                          trust_remote_code=cfg.model.trust_remote_code,
                          storage_path=str(rd / "ray"), **_reporting(TrialObjective.of(baseline, plan)))
    if result.error is not None:
        raise RuntimeError(f"trial {trial_id}: training failed: {result.error}")
