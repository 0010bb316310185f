"""Running an experiment: the Ray cluster (the job's, or a local one started for the trials), how
many trials run at once, the scheduler, and Ray Tune's Tuner, started or restored from an
interrupted experiment of the same spec; then the outputs.

Tune over Train V2: the trainable is a *function* that builds and fits a TorchTrainer
(``run_training``) with a ``TuneReportCallback``, takes a custom resource for its driver (never
``{"CPU": 0}``), names its Train run after the trial id (stable across restarts, so a restored
trial resumes its Train run), and the local cluster keeps its dashboard."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llamapro.config import Config, ConfigError, from_dict, to_dict
from llamapro.jsonl import append_record
from llamapro.runtime import ensure_ray
from llamapro.tune.objective import METRIC, MODE, TIME_ATTR
from llamapro.tune.plan import (EXPERIMENT_DIR, SPEC_FILE, STOPS_FILE, TunePlan, legacy_spec_digests,
                                plan_experiment, spec_digest)
from llamapro.tune.results import collect_rows, write_outputs
from llamapro.tune.space import search_space
from llamapro.tune.trial import prepare_shared, run_trial


def ensure_tune_ray(cfg: Config, plan: TunePlan) -> int | None:
    """Join the job's cluster (RAY_ADDRESS) or start a local one sized for the trials, with the
    driver resource and the dashboard (Train V2 cleans up a stopped trial's placement group through
    the State API the dashboard serves; without it the next trial hung). Returns the number of
    trials the local machine's cores hold when it started the cluster, else None.

    The local cluster publishes its address to its workers (``publish_address``): Train V2's
    PlacementGroupCleaner finds the cluster through the State API with no address; with another Ray
    instance on the machine it cannot tell which is ours, its monitor dies, and a stopped trial's
    placement group leaks (the next trial then waits forever)."""
    import ray

    r = cfg.tune.driver_resource
    local = None
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        ensure_ray("tune", log_to_driver=True)  # the job's cluster (nothing to do when connected)
    else:
        per = plan.trial_resources["CPU"]
        local = cfg.tune.max_concurrent or max(1, (os.cpu_count() or 1) // per)
        # logical CPUs beyond the trials' own: Ray Data's actors must never starve (with every CPU
        # held by Train they wait silently)
        extra = int(cfg.data.actors * cfg.data.cpus_per_actor) + 1
        ensure_ray("tune", num_cpus=max(4, local * per + extra), resources={r: 100},
                   include_dashboard=True, log_to_driver=True, publish_address=True)
    if ray.cluster_resources().get(r, 0) <= 0:
        raise ConfigError(
            f"the Ray cluster declares no {r!r} resource, which each trial's driver takes 0.01 of: "
            f"start the head node with --resources='{{\"{r}\": 100}}' (or add it to the head "
            f"node's resources in cluster.yaml), or set tune.driver_resource")
    return local


def concurrency(cfg: Config, plan: TunePlan, local: int | None = None, say=print) -> int:
    """Trials at once: what the cluster's CPUs (and GPUs) hold (on a cluster started here, what the
    machine's cores hold), capped by tune.max_concurrent."""
    import ray

    total = ray.cluster_resources()
    need = {k: v for k, v in plan.trial_resources.items() if v > 0}
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


def _scheduler(cfg: Config, plan: TunePlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    s = cfg.tune.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    stops = Path(plan.exp_dir) / STOPS_FILE

    class RecordingASHA(ASHAScheduler):
        """ASHA that writes down which trials it stopped early, and where."""

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and not result.get("final"):
                step = result.get(TIME_ATTR)
                rec = {"trial_id": trial.trial_id, "step": step, METRIC: result.get(METRIC),
                       "reason": "max_t" if step is not None and step >= plan.max_t else "asha"}
                append_record(stops, rec)
            return action

    return RecordingASHA(time_attr=TIME_ATTR, max_t=plan.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets)


def run_tune(cfg: Config, force: bool = False, say=print) -> dict:
    """Run the experiment of ``cfg.tune``, or resume it when an interrupted one of the same name
    and spec exists; write the table, the plot and the best config; return the summary."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    plan = plan_experiment(cfg)
    cfg = from_dict(Config, plan.base)  # absolute paths, the base resolved to its directory
    exp_dir = Path(plan.exp_dir)
    exp_path = exp_dir / EXPERIMENT_DIR
    spec = {"digest": spec_digest(plan), "tune": to_dict(cfg.tune)}
    if force and exp_dir.exists():
        if not (exp_dir / SPEC_FILE).is_file():
            raise ConfigError(f"{exp_dir} exists and is not a llamapro tune experiment; not removing it")
        shutil.rmtree(exp_dir)
    resume = tune.Tuner.can_restore(str(exp_path))
    if resume:
        old = json.loads((exp_dir / SPEC_FILE).read_text()) if (exp_dir / SPEC_FILE).is_file() else {}
        if old.get("digest") in legacy_spec_digests(plan):  # written by an earlier llamapro: same spec
            (exp_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1, default=str) + "\n")
        elif old.get("digest") != spec["digest"]:
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
        say(f"[tune] {plan.name}: {cfg.tune.num_samples} sample(s) of {list(plan.space)}, "
            f"{n} trial(s) at a time, scheduler {cfg.tune.scheduler.type} (max_t {plan.max_t} steps)")
        tuner = tune.Tuner(
            trainable, param_space=search_space(plan.space, plan.mode_space),
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
