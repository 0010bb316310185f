"""Ray Tune over Ray Train: search where to insert blocks, how many, stage ratios, LR, any key.

Every trial is a real training run: it expands the base itself (the streaming path, into its own
directory, so trials share no mutable state), trains the new blocks with Ray Train + DeepSpeed and
evaluates the held-out sets at every ``train.eval_every`` steps. Its objective says what the product
promises: learn the new domain without forgetting,

    domain_gain = base loss - trained loss      (mean over the domain sets)
    forgetting  = trained loss - base loss      (worst retention set)
    objective   = domain_gain - tune.forgetting_penalty * max(0, forgetting)      (maximised)

where the base's losses are the expanded model's at step 0 (its new blocks are identities), computed
once per held-out set on the unexpanded base. ASHA stops trials whose objective trails at a rung.

Tune over Train V2: the trainable is a *function* that builds and fits a TorchTrainer
(``run_training``) with a ``TuneReportCallback``, takes a custom resource for its driver (never
``{"CPU": 0}``), names its Train run after the trial id (stable across restarts, so a restored
trial resumes its Train run), and the local cluster keeps its dashboard.

An experiment is a directory ``<run.output_dir>/<tune name>/``::

    experiment/            Ray Tune's state: running the same command again restores from it
    trials/<trial id>/     each trial's run dir: config.yaml (a training config), expanded/,
                           model/, metrics.jsonl, ray/train-<trial id>/checkpoint_* (Train)
    baselines/             the base's held-out losses, cached per held-out set digest
    scheduler_stops.jsonl  the trials the scheduler stopped early (step, objective)
    results.csv results.md pareto.png best.yaml summary.json
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
from pathlib import Path

import yaml

from llamapro.checkpoint import write_json_atomic
from llamapro.config import Config, ConfigError, from_dict, to_dict
from llamapro.jsonl import append_record, read_records
from llamapro.config.tune import PLACEMENT_KEY

EXPERIMENT_DIR = "experiment"
SPEC_FILE = "tune_spec.json"
STOPS_FILE = "scheduler_stops.jsonl"
METRIC, MODE, TIME_ATTR = "objective", "max", "step"
_BUDGET_KEYS = ("train.max_steps", "train.max_tokens", "train.micro_batch_size", "train.grad_accum",
                "train.num_workers", "train.eval_batches", "data.seq_len")
SHARED_MAX_TOKENS = 20_000_000
"""Up to this many training tokens per trial, the driver tokenizes the training blocks once and every
trial reads the same materialized blocks (nobody re-tokenizes, and trials differ only in what the
space varies). Larger budgets stream per trial."""


# --- the objective (pure) -------------------------------------------------------------------------

def objective_metrics(losses: dict, baseline: dict, domain: list[str], retention: list[str],
                      penalty: float, max_forgetting: float | None) -> dict:
    """Gain, forgetting and the objective from held-out losses and the base's (nats/token)."""
    gain = sum(baseline[s] - losses[s] for s in domain) / len(domain)
    forgetting = max((losses[s] - baseline[s] for s in retention), default=0.0)
    out = {"domain_loss": sum(losses[s] for s in domain) / len(domain),
           "domain_gain": gain, "forgetting": forgetting,
           "objective": gain - penalty * max(0.0, forgetting),
           "feasible": max_forgetting is None or forgetting <= max_forgetting}
    if retention:
        out["retention_loss"] = max(losses[s] for s in retention)
    return out


# --- the space (pure) -----------------------------------------------------------------------------

def _set(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = copy.deepcopy(value)


def apply_params(d: dict, params: dict) -> dict:
    """Put one trial's sampled values (dotted keys) into a config dict. ``expand.placement``: a
    strategy name sets expand.strategy, a list sets expand.positions (and blocks = its length)."""
    for key, value in params.items():
        if key == PLACEMENT_KEY:
            if isinstance(value, str):
                _set(d, "expand.strategy", value)
                _set(d, "expand.positions", [])
            else:
                _set(d, "expand.positions", list(value))
        else:
            _set(d, key, value)
    if "expand.strategy" in params:
        _set(d, "expand.positions", [])
    exp = d.get("expand") or {}
    if exp.get("positions"):
        _set(d, "expand.blocks", len(exp["positions"]))
    return d


def _values(spec: dict) -> list:
    """Representative values of a distribution: every choice, or the bounds of a range."""
    (dist, args), = spec.items()
    if dist in ("choice", "grid"):
        return list(args)
    low, high = args[0], args[1]
    if dist in ("randint", "lograndint"):
        high -= 1  # exclusive upper bound
    return [low, high]


def search_space(space: dict) -> dict:
    """The Ray Tune param_space (dotted keys kept as they are: they name the table's columns)."""
    from ray import tune

    fn = {"choice": tune.choice, "grid": tune.grid_search, "uniform": tune.uniform,
          "quniform": tune.quniform, "loguniform": tune.loguniform, "qloguniform": tune.qloguniform,
          "randint": tune.randint, "qrandint": tune.qrandint, "lograndint": tune.lograndint}
    out = {}
    for key, spec in space.items():
        (dist, args), = spec.items()
        out[key] = fn[dist](list(args)) if dist in ("choice", "grid") else fn[dist](*args)
    return out


def check_stages(cfg: Config, num_new: int) -> None:
    """Fail before training when the staged schedule cannot fit the blocks or the budget."""
    from llamapro.train.stages import ScheduleError, allocate, build_stages

    tc = cfg.train
    if tc.mode != "llamapro":
        return
    try:
        allocate(build_stages(list(range(num_new)), tc.num_stages, tc.stage_ratios, tc.top_lr_scale,
                              tc.cumulative, tc.final_originals_ratio), tc.total_steps(cfg.data.seq_len))
    except ScheduleError as e:
        raise ConfigError(f"{e} (with {num_new} new blocks)") from None


def check_space_values(base: dict, space: dict, num_layers: int) -> None:
    """Every value of every searched key, put into the base config alone, must make a valid
    config and placement: a typo in a choice fails here, not in trial 7 an hour later."""
    from llamapro.expand.strategies import PlacementError, plan

    for key, spec in space.items():
        for v in _values(spec):
            where = f"tune.space[{key!r}] value {v!r}"
            try:
                cfg = from_dict(Config, apply_params(copy.deepcopy(base), {key: v}))
                p = plan(num_layers, cfg.expand.blocks, cfg.expand.strategy, cfg.expand.positions or None)
                check_stages(cfg, p.num_new)
            except (ConfigError, PlacementError) as e:
                raise ConfigError(f"{where}: {e}") from None


def largest(space: dict, base: dict, key: str):
    """The largest value ``key`` can take in this experiment (the base's when not searched)."""
    vals = _values(space[key]) if key in space else []
    node = base
    for p in key.split("."):
        node = (node or {}).get(p) if isinstance(node, dict) else None
    nums = [v for v in vals + [node] if isinstance(v, (int, float))]  # bools too: True > False
    return max(nums) if nums else node


def max_over_budgets(space: dict, base: dict, fn) -> int:
    """The largest ``fn(cfg)`` over the extremes of every searched budget key (overestimating is
    harmless: it sizes ASHA's last rung and the shared data)."""
    keys = [k for k in _BUDGET_KEYS if k in space]
    combos = itertools.product(*[(min(_values(space[k])), max(_values(space[k]))) for k in keys])
    best = 1
    for combo in combos:
        best = max(best, fn(from_dict(Config, apply_params(copy.deepcopy(base), dict(zip(keys, combo))))))
    return best


def steps_of(cfg: Config) -> int:
    return cfg.train.total_steps(cfg.data.seq_len)


def train_blocks_of(cfg: Config) -> int:
    t = cfg.train
    return steps_of(cfg) * t.micro_batch_size * t.grad_accum * t.num_workers


def eval_rows_of(cfg: Config) -> int:
    t = cfg.train
    return t.eval_batches * t.micro_batch_size * t.num_workers


# --- planning (no Ray) ----------------------------------------------------------------------------

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


def plan_experiment(cfg: Config, cwd: Path | None = None) -> dict:
    """Everything a trial needs, validated and with absolute paths; nothing is started."""
    from llamapro.checkpoint import read_config
    from llamapro.demo import resolve_model
    from llamapro.expand.families import num_layers_of
    from llamapro.expand.api import resolve_local

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
    check_space_values(base, t.space, num_layers_of(read_config(base_dir)))
    name = t.experiment_name(cfg.run.name)
    exp_dir = Path(cfg.run.output_dir) / name
    max_blocks = max_over_budgets(t.space, base, train_blocks_of)
    shared_train = shares_data(t.space) and max_blocks * cfg.data.seq_len <= SHARED_MAX_TOKENS
    # a trial holds its Train workers, and its own tokenizer actors unless it reads shared blocks
    per_trial_cpus = largest(t.space, base, "train.num_workers") * largest(t.space, base, "train.cpus_per_worker")
    if not shared_train:
        per_trial_cpus += largest(t.space, base, "data.actors") * largest(t.space, base, "data.cpus_per_actor")
    gpus = largest(t.space, base, "train.num_workers") if largest(t.space, base, "train.use_gpu") else 0
    return {"name": name, "exp_dir": str(exp_dir), "base": base, "space": t.space,
            "domain_sets": domain, "retention_sets": retention,
            "penalty": t.forgetting_penalty, "max_forgetting": t.max_forgetting,
            "trial_resources": {"CPU": per_trial_cpus, **({"GPU": gpus} if gpus else {})},
            "max_t": t.scheduler.max_t or max_over_budgets(t.space, base, steps_of),
            "max_train_blocks": max_blocks, "shared_train": shared_train,
            "max_eval_rows": max_over_budgets(t.space, base, eval_rows_of)}


def _spec_digest(plan: dict) -> str:
    keep = {k: plan[k] for k in ("base", "space", "domain_sets", "retention_sets", "penalty",
                                 "max_forgetting")}
    return hashlib.blake2b(json.dumps(keep, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


# --- one trial (runs in a Tune trial actor) -------------------------------------------------------

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

    from llamapro.eval import heldout_loss, load_model

    model = load_model(base_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    out = {name: heldout_loss(model, blocks, batch_size=batch_size)["loss"] for name, blocks in evals.items()}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, out, indent=1)  # concurrent trials may compute the same baseline
    return out


@dataclasses.dataclass(frozen=True)
class TrialObjective:
    """The objective of one trial, computed where the metrics are made: the training loop calls it
    on every report (``run_training(report_metrics=...)``) and Ray's stock ``TuneReportCallback``
    hands rank 0's metrics to Tune unchanged. Stateless (it travels to the workers and survives a
    worker-group restart): a held-out set not evaluated in a report counts at the base's loss, as
    the model is the base before the first evaluation."""

    baseline: dict
    domain: list
    retention: list
    penalty: float
    max_forgetting: float | None

    @classmethod
    def of(cls, baseline: dict, plan: dict) -> "TrialObjective":
        return cls(dict(baseline), list(plan["domain_sets"]), list(plan["retention_sets"]),
                   plan["penalty"], plan["max_forgetting"])

    def __call__(self, metrics: dict) -> dict:
        losses = {n: float(metrics.get(f"eval_loss/{n}", b)) for n, b in self.baseline.items()}
        out = {f"eval_loss/{n}": v for n, v in losses.items()}
        out.update({f"base_loss/{n}": v for n, v in self.baseline.items()})
        out.update(objective_metrics(losses, self.baseline, self.domain, self.retention,
                                     self.penalty, self.max_forgetting))
        return out


def _reporting(objective: TrialObjective) -> dict:
    """``run_training`` keywords of a trial: Ray's stock ``TuneReportCallback`` (made inside the
    Tune trial) and the objective, computed in the training loop at every report."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return {"callbacks": [TuneReportCallback()], "report_metrics": objective}


def trial_config(plan: dict, params: dict, trial_id: str) -> Config:
    d = apply_params(copy.deepcopy(plan["base"]), params)
    d["run"]["output_dir"] = str(Path(plan["exp_dir"]) / "trials")
    d["run"]["name"] = trial_id
    return from_dict(Config, d)


def training_yaml(cfg: Config) -> str:
    """A config `llamapro train --config` runs as it is (the tune section dropped)."""
    d = to_dict(cfg)
    d.pop("tune", None)
    return yaml.safe_dump(d, sort_keys=False)


def shares_data(space: dict) -> bool:
    """Trials can share the driver's data unless the space changes the data or the model."""
    return not any(k.startswith(("data.", "model.")) for k in space)


def prepare_shared(cfg: Config, plan: dict, say=print) -> dict:
    """What every trial reads and nobody mutates, prepared once by the driver: the held-out blocks
    (each trial takes its first rows), the base's losses on them, and for small budgets the
    training blocks themselves (materialized in the object store)."""
    from llamapro.data import build_train_dataset, load_tokenizer
    from llamapro.pipeline import eval_blocks

    if not shares_data(plan["space"]):
        return {}
    base_dir = plan["base"]["model"]["base"]
    shared = {"evals": eval_blocks(cfg, base_dir, plan["max_eval_rows"])}
    if plan["shared_train"]:
        say(f"[tune] tokenizing {plan['max_train_blocks']} training blocks once for every trial")
        shared["train_ds"] = build_train_dataset(cfg.data, load_tokenizer(base_dir)).limit(
            plan["max_train_blocks"]).materialize()
    trial_evals(cfg, plan, shared)  # the base's losses on the usual rows, cached for the trials
    return shared


def trial_evals(cfg: Config, plan: dict, shared: dict) -> tuple[dict, dict]:
    """(held-out rows this trial evaluates, the base's losses on exactly those rows)."""
    from llamapro.pipeline import eval_blocks, expanded_dir

    tc = cfg.train
    n = eval_rows_of(cfg)
    if "evals" in shared:
        evals = {k: {"input_ids": v["input_ids"][:n], "labels": v["labels"][:n]}
                 for k, v in shared["evals"].items()}
    else:
        evals = eval_blocks(cfg, str(expanded_dir(cfg)), n)
    sets = plan["domain_sets"] + plan["retention_sets"]
    evals = _whole_rows({k: v for k, v in evals.items() if k in sets}, tc.num_workers)
    missing = [s for s in sets if s not in evals]
    if missing:
        raise ConfigError(f"held-out sets {missing} have fewer than {tc.num_workers} blocks of "
                          f"{cfg.data.seq_len} tokens; raise their eval_fraction")
    bf16 = tc.dtype == "bfloat16" or (tc.use_gpu and tc.dtype == "auto")
    baseline = base_losses(cfg.model.base, evals, Path(plan["exp_dir"]) / "baselines",
                           tc.micro_batch_size, "bfloat16" if bf16 else "float32",
                           cfg.model.trust_remote_code)
    return evals, baseline


def run_trial(params: dict, plan: dict, shared: dict | None = None) -> None:
    """The Tune function trainable: one complete training run of one point of the space."""
    import ray.data
    from ray import tune

    from llamapro.checkpoint import read_metadata
    from llamapro.data import build_train_dataset, load_tokenizer
    from llamapro.pipeline import expand_step, expanded_dir, run_dir
    from llamapro.expand.api import require_proven
    from llamapro.train import run_training

    ray.data.DataContext.get_current().enable_progress_bars = False
    shared = shared or {}
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(plan, params, trial_id)
    rd = run_dir(cfg)
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "config.yaml").write_text(training_yaml(cfg))
    (rd / "trial.json").write_text(json.dumps({"trial_id": trial_id, "params": params}, default=str))
    # expansion inside the trial, from the base, streaming; a restarted trial reuses its own
    exp = expanded_dir(cfg)
    meta = read_metadata(exp) if exp.is_dir() else None
    if meta is None or (cfg.expand.verify and not (meta.get("verification") or {}).get("ok")):
        meta = expand_step(cfg, force=True, progress=False)
    require_proven(meta, cfg.train.allow_unproven, str(exp))
    check_stages(cfg, len(meta["new_layer_indices"]))
    tc = cfg.train
    # every held-out evaluation is a Tune report (ASHA decides there) and a checkpoint
    tc_run = dataclasses.replace(tc, checkpoint_every=tc.eval_every)
    train_ds = (shared["train_ds"] if "train_ds" in shared
                else build_train_dataset(cfg.data, load_tokenizer(str(exp))))
    evals, baseline = trial_evals(cfg, plan, shared)
    result = run_training(tc_run, str(exp), str(rd), train_ds, evals, seq_len=cfg.data.seq_len,
                          name=f"train-{trial_id}", seed=cfg.run.seed,
                          early_stop_on=tc.early_stop_on or plan["domain_sets"][0],
                          trust_remote_code=cfg.model.trust_remote_code,
                          storage_path=str(rd / "ray"), **_reporting(TrialObjective.of(baseline, plan)))
    if result.error is not None:
        raise RuntimeError(f"trial {trial_id}: training failed: {result.error}")


# --- the driver -----------------------------------------------------------------------------------

def init_local_ray(num_cpus: int, resources: dict, **kw) -> str:
    """Start a local Ray cluster whose workers know its address (RAY_ADDRESS in the job's
    runtime env). Train V2's PlacementGroupCleaner finds the cluster through the State API with no
    address; with another Ray instance on the machine it cannot tell which is ours, its monitor
    dies, and a stopped trial's placement group leaks (the next trial then waits forever). The GCS
    port is chosen up front so the address is known before the workers start."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    old = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(address="local", num_cpus=num_cpus, resources=resources,
                 runtime_env={"env_vars": {"RAY_ADDRESS": address}}, **kw)
    finally:
        if old is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = old
    return ray.get_runtime_context().gcs_address


def ensure_tune_ray(cfg: Config, plan: dict) -> int | None:
    """Join the job's cluster (RAY_ADDRESS) or start a local one sized for the trials, with the
    driver resource and the dashboard (Train V2 cleans up a stopped trial's placement group through
    the State API the dashboard serves; without it the next trial hung). Returns the number of
    trials the local machine's cores hold when it started the cluster, else None."""
    import ray

    r = cfg.tune.driver_resource
    local = None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            per = plan["trial_resources"]["CPU"]
            local = cfg.tune.max_concurrent or max(1, (os.cpu_count() or 1) // per)
            # logical CPUs beyond the trials' own: Ray Data's actors must never starve (with every CPU held by Train they wait silently)
            extra = int(cfg.data.actors * cfg.data.cpus_per_actor) + 1
            init_local_ray(max(4, local * per + extra), {r: 100}, include_dashboard=True,
                           log_to_driver=True)
    if ray.cluster_resources().get(r, 0) <= 0:
        raise ConfigError(
            f"the Ray cluster declares no {r!r} resource, which each trial's driver takes 0.01 of: "
            f"start the head node with --resources='{{\"{r}\": 100}}' (or add it to the head "
            f"node's resources in cluster.yaml), or set tune.driver_resource")
    return local


def concurrency(cfg: Config, plan: dict, local: int | None = None, say=print) -> int:
    """Trials at once: what the cluster's CPUs (and GPUs) hold (on a cluster started here, what the
    machine's cores hold), capped by tune.max_concurrent."""
    import ray

    total = ray.cluster_resources()
    need = {k: v for k, v in plan["trial_resources"].items() if v > 0}
    fits = min(int(total.get(k, 0) // v) for k, v in need.items())
    if fits < 1:
        raise ConfigError(f"one trial needs {need} (Train workers + Ray Data actors) but the cluster "
                          f"has {({k: total.get(k, 0) for k in need})}: lower train.num_workers or "
                          "data.actors, or add nodes")
    if local:
        fits = min(fits, local)
    want = cfg.tune.max_concurrent
    if want and want > fits:
        say(f"[tune] tune.max_concurrent={want} capped to {fits}: the cluster holds {fits} trial(s) "
            f"of {need}")
    return min(want, fits) if want else fits


def _scheduler(cfg: Config, plan: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    s = cfg.tune.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    stops = Path(plan["exp_dir"]) / STOPS_FILE

    class RecordingASHA(ASHAScheduler):
        """ASHA that writes down which trials it stopped early, and where."""

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and not result.get("final"):
                step = result.get(TIME_ATTR)
                rec = {"trial_id": trial.trial_id, "step": step, METRIC: result.get(METRIC),
                       "reason": "max_t" if step is not None and step >= plan["max_t"] else "asha"}
                append_record(stops, rec)
            return action

    return RecordingASHA(time_attr=TIME_ATTR, max_t=plan["max_t"], grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets)


def run_tune(cfg: Config, force: bool = False, say=print) -> dict:
    """Run the experiment of ``cfg.tune``, or resume it when an interrupted one of the same name
    and spec exists; write the table, the plot and the best config; return the summary."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    plan = plan_experiment(cfg)
    cfg = from_dict(Config, plan["base"])  # absolute paths, the base resolved to its directory
    exp_dir = Path(plan["exp_dir"])
    exp_path = exp_dir / EXPERIMENT_DIR
    spec = {"digest": _spec_digest(plan), "tune": to_dict(cfg.tune)}
    if force and exp_dir.exists():
        if not (exp_dir / SPEC_FILE).is_file():
            raise ConfigError(f"{exp_dir} exists and is not a llamapro tune experiment; not removing it")
        shutil.rmtree(exp_dir)
    resume = tune.Tuner.can_restore(str(exp_path))
    if resume:
        old = json.loads((exp_dir / SPEC_FILE).read_text()) if (exp_dir / SPEC_FILE).is_file() else {}
        if old.get("digest") != spec["digest"]:
            raise ConfigError(f"{exp_dir} holds an experiment with another space or base config; rerun "
                              "with --force to start over, or set another tune.name")
    local = ensure_tune_ray(cfg, plan)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    shared = prepare_shared(cfg, plan, say)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan, shared=shared),
                                    {cfg.tune.driver_resource: 0.01})
    if resume:
        say(f"[tune] resuming the experiment in {exp_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        n = None
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1, default=str) + "\n")
        (exp_dir / STOPS_FILE).unlink(missing_ok=True)
        n = concurrency(cfg, plan, local, say)
        say(f"[tune] {plan['name']}: {cfg.tune.num_samples} sample(s) of {list(plan['space'])}, "
            f"{n} trial(s) at a time, scheduler {cfg.tune.scheduler.type} (max_t {plan['max_t']} steps)")
        tuner = tune.Tuner(
            trainable, param_space=search_space(plan["space"]),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=cfg.tune.num_samples,
                scheduler=_scheduler(cfg, plan),
                # the generator itself caps concurrency (Tune ignores max_concurrent_trials for it)
                search_alg=BasicVariantGenerator(max_concurrent=n, random_state=cfg.tune.seed)),
            run_config=tune.RunConfig(
                name=EXPERIMENT_DIR, storage_path=str(exp_dir), verbose=1,
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures)))
    grid = tuner.fit()
    rows = collect_rows(grid, plan)
    summary = write_outputs(rows, plan)
    summary["concurrency"] = n
    summary["resumed"] = resume
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# --- outputs --------------------------------------------------------------------------------------

def _stops(exp_dir: Path) -> dict:
    return {rec["trial_id"]: rec for rec in read_records(exp_dir / STOPS_FILE) if "trial_id" in rec}


def _trial_id_of(result) -> str | None:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return tid
    import re

    m = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(str(result.path)).name)
    return m.group(1) if m else None


def _cell(v):
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v


def _reachable_checkpoint(reported: str | None, rd: Path) -> str | None:
    """The checkpoint of the last report Tune saw, or, when Train has since rotated it out (a
    stopped trial may report a little beyond the step Tune acted on), the trial's newest one."""
    if reported and Path(reported).is_dir():
        return reported
    found = sorted((rd / "ray").glob("train-*/checkpoint_*/trainer_state.json"))
    return str(found[-1].parent) if found else None


def collect_rows(grid, plan: dict) -> list[dict]:
    """One row per trial: its sampled values, where its blocks went, how far it got, its losses,
    gain, forgetting, objective, status and where its checkpoint and model are."""
    from llamapro.checkpoint import read_metadata

    exp_dir = Path(plan["exp_dir"])
    stops = _stops(exp_dir)
    sets = plan["domain_sets"] + plan["retention_sets"]
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        tid = _trial_id_of(r)
        rd = exp_dir / "trials" / str(tid)
        if m.get("final"):
            status = "completed"
        elif tid in stops:
            status = f"stopped early ({stops[tid]['reason']}, step {stops[tid]['step']})"
        elif r.error is not None:
            status = "error"
        else:
            status = "unfinished"
        meta = read_metadata(rd / "expanded") if (rd / "expanded").is_dir() else None
        row = {"trial_id": tid, "status": status}
        row.update({k: _cell((r.config or {}).get(k)) for k in plan["space"]})
        row["new_layers"] = _cell(meta["new_layer_indices"]) if meta else None
        row["num_layers"] = meta.get("num_layers") if meta else None
        row.update({"step": m.get("step"), "tokens": m.get("tokens")})
        for s in sets:
            row[f"base_loss/{s}"] = _cell(m.get(f"base_loss/{s}"))
            row[f"eval_loss/{s}"] = _cell(m.get(f"eval_loss/{s}"))
        for k in ("domain_gain", "forgetting", "objective", "feasible"):
            row[k] = _cell(m.get(k))
        row["checkpoint"] = _reachable_checkpoint(m.get("checkpoint_path"), rd)
        row["model"] = str(rd / "model") if (rd / "model" / "config.json").is_file() else None
        row["trial_dir"] = str(rd)
        row["error"] = str(r.error).strip().splitlines()[-1][:300] if r.error is not None else ""
        rows.append(row)
    rows.sort(key=lambda x: (x["objective"] is None, -(x["objective"] or 0.0)))
    return rows


def pick_best(rows: list[dict]) -> dict | None:
    """The completed, feasible trial with the highest objective (early-stopped trials never ran
    their whole budget, so they are not candidates)."""
    pool = [r for r in rows if r["status"] == "completed" and r["objective"] is not None and r["feasible"]]
    return max(pool, key=lambda r: r["objective"]) if pool else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (less forgetting, more gain),
    ordered by forgetting."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_gain = [], -math.inf
    for i in idx:
        if points[i][1] > best_gain:
            front.append(i)
            best_gain = points[i][1]
    return front


def _label(row: dict, keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = row.get(k)
        parts.append(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}")
    return ", ".join(parts)


def plot_pareto(rows: list[dict], plan: dict, best: dict | None, path: Path) -> bool:
    from matplotlib.figure import Figure

    pts = [r for r in rows if r["domain_gain"] is not None and r["forgetting"] is not None]
    if not pts:
        return False
    fig = Figure(figsize=(9, 6), dpi=110, layout="constrained")
    ax = fig.subplots()
    keys = list(plan["space"])
    done = [r for r in pts if r["status"] == "completed"]
    labels: dict = {}  # trials on the same spot share one label
    for r in pts:
        completed = r["status"] == "completed"
        ax.scatter(r["forgetting"], r["domain_gain"], s=60, zorder=3,
                   facecolors="#1f77b4" if completed else "none", edgecolors="#1f77b4")
        xy = (round(r["forgetting"], 4), round(r["domain_gain"], 4))
        labels.setdefault(xy, []).append(f"{str(r['trial_id'])[-5:]}: {_label(r, keys)}"
                                         + ("" if completed else " (stopped)"))
    for (x, y), texts in labels.items():
        ax.annotate("\n".join(texts), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front_rows = done or pts
    front = [front_rows[i] for i in pareto_front([(r["forgetting"], r["domain_gain"]) for r in front_rows])]
    ax.plot([r["forgetting"] for r in front], [r["domain_gain"] for r in front], "-s", color="#ff7f0e",
            lw=1.5, ms=4, zorder=2, label="Pareto front (completed trials)")
    if best is not None:
        ax.scatter(best["forgetting"], best["domain_gain"], marker="*", s=320, color="#d62728",
                   zorder=4, label=f"best: {best['trial_id']} (objective {best['objective']:.4f})")
    if plan["max_forgetting"] is not None:
        ax.axvline(plan["max_forgetting"], color="#7f7f7f", ls="--", lw=1,
                   label=f"max_forgetting {plan['max_forgetting']}")
    ax.axvline(0, color="#c7c7c7", lw=0.8)
    ax.axhline(0, color="#c7c7c7", lw=0.8)
    ax.scatter([], [], facecolors="#1f77b4", edgecolors="#1f77b4", label="completed")
    ax.scatter([], [], facecolors="none", edgecolors="#1f77b4", label="stopped early / unfinished")
    ax.set_xlabel(f"forgetting: retention loss increase ({', '.join(plan['retention_sets']) or 'none'}), nats/token")
    ax.set_ylabel(f"domain gain: loss decrease on {', '.join(plan['domain_sets'])}, nats/token")
    ax.set_title(f"{plan['name']}: domain gain vs forgetting per trial "
                 f"(objective = gain - {plan['penalty']:g} x max(0, forgetting))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return True


def _md(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3g}"
    return str(v).replace("|", "\\|")


def write_outputs(rows: list[dict], plan: dict) -> dict:
    exp_dir = Path(plan["exp_dir"])
    cols = list(rows[0]) if rows else ["trial_id", "status"]
    with open(exp_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    best = pick_best(rows)
    show = ["trial_id", "status", *plan["space"], "new_layers", "step", "domain_gain", "forgetting",
            "objective", "feasible", "checkpoint"]
    lines = [f"# Tune experiment {plan['name']}", "",
             f"Objective (maximised): domain gain on {', '.join(plan['domain_sets'])} "
             f"- {plan['penalty']:g} x max(0, forgetting on {', '.join(plan['retention_sets']) or 'no set'}), "
             "in nats/token against the base (= each trial's step-0 model)."
             + (f" Feasible: forgetting <= {plan['max_forgetting']}." if plan["max_forgetting"] is not None else ""),
             "", "| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    for r in rows:
        cells = [_md(r.get(c)) for c in show]
        if best is not None and r["trial_id"] == best["trial_id"]:
            cells[0] = f"**{cells[0]}** (best)"
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best: `{best['trial_id']}`; its config: `best.yaml` "
                      f"(`llamapro train --config {exp_dir / 'best.yaml'}`)."]
    (exp_dir / "results.md").write_text("\n".join(lines) + "\n")
    plotted = plot_pareto(rows, plan, best, exp_dir / "pareto.png")
    best_yaml = None
    if best is not None:
        best_yaml = write_best_config(best, plan)
    counts: dict = {}
    for r in rows:
        key = r["status"].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return {"experiment": plan["name"], "dir": str(exp_dir), "trials": len(rows), "status": counts,
            "best": best, "best_config": str(best_yaml) if best_yaml else None,
            "results_csv": str(exp_dir / "results.csv"), "results_md": str(exp_dir / "results.md"),
            "pareto_png": str(exp_dir / "pareto.png") if plotted else None,
            "objective": {"domain_sets": plan["domain_sets"], "retention_sets": plan["retention_sets"],
                          "forgetting_penalty": plan["penalty"], "max_forgetting": plan["max_forgetting"]}}


def write_best_config(best: dict, plan: dict) -> Path:
    """The best trial's exact training config, as a run of its own under run.output_dir."""
    exp_dir = Path(plan["exp_dir"])
    d = yaml.safe_load((Path(best["trial_dir"]) / "config.yaml").read_text())
    d["run"]["name"] = f"{plan['name']}-best"
    d["run"]["output_dir"] = plan["base"]["run"]["output_dir"]
    from_dict(Config, d)  # it must load as it is
    out = exp_dir / "best.yaml"
    head = [f"# The best configuration of tune experiment {plan['name']}: trial {best['trial_id']}",
            f"# (objective {best['objective']:.6f} = domain gain {best['domain_gain']:.6f} - "
            f"{plan['penalty']:g} x forgetting {best['forgetting']:.6f}; new layers {best['new_layers']}).",
            "#", f"#   llamapro train --config {out}",
            f"#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- "
            f"python jobs/train.py --config {out}", "#",
            f"# Trained in the experiment: {best['model'] or best['trial_dir']}", ""]
    out.write_text("\n".join(head) + yaml.safe_dump(d, sort_keys=False))
    return out


def format_summary(s: dict) -> str:
    lines = [f"experiment {s['experiment']}: {s['trials']} trial(s) "
             + ", ".join(f"{n} {k}" for k, n in sorted(s["status"].items())),
             f"results: {s['results_csv']} | {s['results_md']}",
             f"pareto plot: {s['pareto_png']}"]
    b = s.get("best")
    if b:
        lines.append(f"best: {b['trial_id']} objective {b['objective']:.4f} (domain gain "
                     f"{b['domain_gain']:.4f}, forgetting {b['forgetting']:.4f}), new layers {b['new_layers']}")
        lines.append(f"best config: {s['best_config']}  ->  llamapro train --config {s['best_config']}")
    else:
        lines.append("no trial completed feasibly: no best config written (see results.md)")
    return "\n".join(lines)
