"""The experiment plan: the config validated against the base model and the whole space, its local
paths made absolute, the objective's held-out sets, each trial's resources and the budgets'
bounds; everything a trial needs, computed before anything starts (no Ray). Also the names of the
files an experiment directory holds."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from llamapro.artifacts import Record
from llamapro.config import Config, ConfigError, from_dict, to_dict
from llamapro.config.tune import check_space
from llamapro.demo import resolve_model
from llamapro.expansion.api import resolve_local
from llamapro.expansion.families import num_layers_of
from llamapro.tensors import read_config
from llamapro.tune.space import (check_space_values, eval_rows_of, largest, max_over_budgets, shares_data,
                                 steps_of, train_blocks_of)

EXPERIMENT_DIR = "experiment"
SPEC_FILE = "tune_spec.json"
STOPS_FILE = "scheduler_stops.jsonl"
SHARED_MAX_TOKENS = 20_000_000
"""Up to this many training tokens per trial, the driver tokenizes the training blocks once and every
trial reads the same materialized blocks (nobody re-tokenizes, and trials differ only in what the
space varies). Larger budgets stream per trial."""


def _key(key: str, doc: str):
    return property(lambda self: self[key], doc=doc)


class TunePlan(Record):
    """The plan of an experiment (``plan_experiment``): what the driver and every trial read. A
    ``dict`` (it travels to the trials with the trainable and its spec part is hashed as JSON)
    with a typed property per key."""

    name: str = _key("name", "the experiment's name: its directory under run.output_dir")
    exp_dir: str = _key("exp_dir", "the experiment directory (see llamapro.tune)")
    base: dict = _key("base", "the config every trial starts from: local paths absolute, the base "
                              "model resolved to its directory")
    space: dict = _key("space", "tune.space: dotted key -> {distribution: arguments}")
    mode_space: dict = property(lambda self: self.get("mode_space") or {},
                                doc="tune.mode_space: per train.mode, its own grids (a method comparison)")
    domain_sets: list = _key("domain_sets", "held-out sets of the new domain (the gain)")
    retention_sets: list = _key("retention_sets", "held-out sets of what the base knew (forgetting)")
    penalty: float = _key("penalty", "tune.forgetting_penalty")
    max_forgetting: float | None = _key("max_forgetting", "tune.max_forgetting (None: no bound)")
    trial_resources: dict = _key("trial_resources", "what one trial holds: CPU (and GPU)")
    max_t: int = _key("max_t", "the scheduler's last rung (optimizer steps)")
    max_train_blocks: int = _key("max_train_blocks", "the most training blocks a trial can read")
    shared_train: bool = _key("shared_train", "whether the driver tokenizes the training blocks "
                                              "once for every trial")
    max_eval_rows: int = _key("max_eval_rows", "the most held-out rows a trial evaluates per set")


def _absolute(d: dict, cwd: Path) -> dict:
    """Trials run in Tune's trial directories: make every local path of the config absolute."""

    def fix(p: str) -> str:
        if not p or "://" in p or p.startswith("demo:") or os.path.isabs(p):
            return p
        return str(cwd / p)

    d["run"]["output_dir"] = fix(d["run"]["output_dir"])
    base = d["model"]["base"]
    if (cwd / base).exists() and not os.path.isabs(base):
        d["model"]["base"] = str(cwd / base)
    for src in d["data"]["sources"]:
        src["paths"] = [fix(p) for p in src["paths"]]
    d["train"]["deepspeed_config"] = fix(d["train"]["deepspeed_config"])
    d["eval"]["prompts"] = fix(d["eval"]["prompts"])
    return d


def objective_sets(cfg: Config) -> tuple[list[str], list[str]]:
    """(domain sets, retention sets): tune's own, else the gate's, else first source / the rest."""
    held = [s.name for s in cfg.data.sources if s.eval_fraction > 0]
    t, g = cfg.tune, cfg.eval.gate
    domain = list(t.domain_sets or g.domain_sets or held[:1])
    retention = list(t.retention_sets or g.retention_sets or [s for s in held if s not in domain])
    if not domain:
        raise ConfigError("tune: no held-out set to measure the new domain on; give a data source "
                          "an eval_fraction > 0 and name it in tune.domain_sets")
    for s in domain + retention:
        if s not in held:
            raise ConfigError(f"tune: held-out set {s!r} is not a data source with eval_fraction > 0 "
                              f"(sources holding data out: {', '.join(held) or 'none'})")
    return domain, retention


def plan_experiment(cfg: Config, cwd: Path | None = None) -> TunePlan:
    """Everything a trial needs, validated and with absolute paths; nothing is started."""
    t = cfg.tune
    if not t.space:
        raise ConfigError("tune.space is empty: declare what to search, e.g. "
                          "tune.space: {expand.placement: {grid: [even, top, bottom, middle]}}")
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: configure the corpora trials train and evaluate on")
    if "://" in cfg.run.output_dir:
        raise ConfigError("tune: run.output_dir must be a local or shared-filesystem path (trials "
                          "write their expanded checkpoints there)")
    cwd = (cwd or Path.cwd()).resolve()
    base = _absolute(to_dict(cfg), cwd)
    cfg = from_dict(Config, base)
    domain, retention = objective_sets(cfg)
    base_dir = resolve_local(resolve_model(cfg.model.base))
    base["model"]["base"] = str(base_dir)
    check_space(t.space, Config, t.mode_space)
    check_space_values(base, t.space, num_layers_of(read_config(base_dir)), t.mode_space)
    name = t.experiment_name(cfg.run.name)
    exp_dir = Path(cfg.run.output_dir) / name
    max_blocks = max_over_budgets(t.space, base, train_blocks_of)
    shared_train = shares_data(t.space) and max_blocks * cfg.data.seq_len <= SHARED_MAX_TOKENS
    # a trial holds its Train workers, and its own tokenizer actors unless it reads shared blocks
    per_trial_cpus = largest(t.space, base, "train.num_workers") * largest(t.space, base, "train.cpus_per_worker")
    if not shared_train:
        per_trial_cpus += largest(t.space, base, "data.actors") * largest(t.space, base, "data.cpus_per_actor")
    gpus = largest(t.space, base, "train.num_workers") if largest(t.space, base, "train.use_gpu") else 0
    return TunePlan({"name": name, "exp_dir": str(exp_dir), "base": base, "space": t.space,
                     "mode_space": t.mode_space,
                     "domain_sets": domain, "retention_sets": retention,
                     "penalty": t.forgetting_penalty, "max_forgetting": t.max_forgetting,
                     "trial_resources": {"CPU": per_trial_cpus, **({"GPU": gpus} if gpus else {})},
                     "max_t": t.scheduler.max_t or max_over_budgets(t.space, base, steps_of),
                     "max_train_blocks": max_blocks, "shared_train": shared_train,
                     "max_eval_rows": max_over_budgets(t.space, base, eval_rows_of)})


_NOT_READ_BY_TRIALS = {"run": ("baselines", "baseline_lrs")}
"""Base-config keys a trial never reads (the pipeline's baselines): not part of the spec."""


def spec_digest(plan: TunePlan) -> str:
    """What an interrupted experiment must share with this one to be resumed: the base config's
    settings that differ from the defaults (so a release that adds a key with a default does not
    orphan old experiments), the space and the objective."""
    keep = {k: plan[k] for k in ("space", "domain_sets", "retention_sets", "penalty", "max_forgetting")}
    keep["base"] = _set_values(plan.base, to_dict(Config()))
    for section, keys in _NOT_READ_BY_TRIALS.items():
        for k in keys:
            keep["base"].get(section, {}).pop(k, None)
        if keep["base"].get(section) == {}:
            del keep["base"][section]
    if plan.mode_space:
        keep["mode_space"] = plan.mode_space
    return _digest(keep)


def legacy_spec_digests(plan: TunePlan) -> set[str]:
    """Digests an experiment written by an earlier llamapro has for this same spec (until
    2026-12-03 the digest hashed the whole base config, with run.baseline_lrs from the day it
    existed). Accepted on resume, and the spec is rewritten with the current digest."""
    base = json.loads(json.dumps(plan.base, default=str))
    out = set()
    for without_baseline_lrs in (False, True):
        if without_baseline_lrs:
            base.get("run", {}).pop("baseline_lrs", None)
        keep = {"base": base, **{k: plan[k] for k in ("space", "domain_sets", "retention_sets", "penalty",
                                                        "max_forgetting")}}
        if plan.mode_space:
            keep["mode_space"] = plan.mode_space
        out.add(_digest(keep))
    return out


def _digest(keep: dict) -> str:
    return hashlib.blake2b(json.dumps(keep, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def _set_values(d: dict, defaults: dict) -> dict:
    """``d`` without the entries equal to ``defaults`` (recursively through sections)."""
    out = {}
    for k, v in d.items():
        dv = defaults.get(k, _MISSING) if isinstance(defaults, dict) else _MISSING
        if isinstance(v, dict) and isinstance(dv, dict):
            sub = _set_values(v, dv)
            if sub:
                out[k] = sub
        elif dv is _MISSING or v != dv:
            out[k] = v
    return out


_MISSING = object()


