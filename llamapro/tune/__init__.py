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

A method comparison searches ``train.mode`` too (grids only, scheduler fifo): a trial whose mode is
a baseline (full, lora, freeze_last_n) trains the unexpanded base at the same budget and data
(``llamapro.config.train.baseline_of``, as ``run.baselines``); each mode may have its own grids
(``tune.mode_space``, e.g. its own learning rates); the llamapro-only keys (placement, blocks,
stages) vary for llamapro trials only; the trials run round robin over the modes; and the best
trial is also chosen per mode by the same objective (``best_by_mode``, ``best-<mode>.yaml``).
``benchmarks/study.py`` runs such an experiment, then ``llamapro compare`` on each mode's best.

An experiment is a directory ``<run.output_dir>/<tune name>/``::

    experiment/            Ray Tune's state: running the same command again restores from it
    trials/<trial id>/     each trial's run dir: config.yaml (a training config), expanded/,
                           model/, metrics.jsonl, ray/train-<trial id>/checkpoint_* (Train)
    baselines/             the base's held-out losses, cached per held-out set digest
    scheduler_stops.jsonl  the trials the scheduler stopped early (step, objective)
    results.csv results.md pareto.png best.yaml summary.json

The parts, in the order an experiment uses them: ``space`` (the search space and its checks),
``plan`` (the validated experiment, no Ray), ``objective`` (gain, forgetting, objective),
``trial`` (one trial: expand, train, evaluate, report), ``driver`` (cluster, scheduler, Tuner:
``run_tune``), ``results`` and ``plot`` (the table, the best config, the Pareto plot).
"""

from __future__ import annotations

from llamapro.eval.compare import pareto_front  # the Pareto front, shared with eval compare
from llamapro.tune.driver import concurrency, ensure_tune_ray, run_tune
from llamapro.tune.objective import METRIC, MODE, TIME_ATTR, TrialObjective, objective_metrics
from llamapro.tune.plan import (EXPERIMENT_DIR, SHARED_MAX_TOKENS, SPEC_FILE, STOPS_FILE, TunePlan,
                                objective_sets, plan_experiment)
from llamapro.tune.plot import plot_pareto
from llamapro.tune.results import (collect_rows, format_summary, pick_best, pick_best_by_mode, write_best_config,
                                   write_outputs)
from llamapro.tune.space import (apply_params, check_space_values, check_stages, eval_rows_of, flat_params, largest,
                                 max_over_budgets, method_points, search_space, shares_data, steps_of,
                                 train_blocks_of)
from llamapro.tune.trial import (_reporting, base_losses, prepare_shared, run_trial, training_yaml,
                                 trial_config, trial_evals)

__all__ = [
    "EXPERIMENT_DIR", "METRIC", "MODE", "SHARED_MAX_TOKENS", "SPEC_FILE", "STOPS_FILE", "TIME_ATTR",
    "TrialObjective", "TunePlan", "_reporting", "apply_params", "base_losses", "check_space_values",
    "check_stages", "collect_rows", "concurrency", "ensure_tune_ray", "eval_rows_of",
    "flat_params", "format_summary", "largest", "method_points", "pick_best_by_mode",
    "max_over_budgets", "objective_metrics", "objective_sets",
    "pareto_front", "pick_best", "plan_experiment", "plot_pareto", "prepare_shared", "run_trial",
    "run_tune", "search_space", "shares_data", "steps_of", "train_blocks_of", "training_yaml",
    "trial_config", "trial_evals", "write_best_config", "write_outputs",
]
