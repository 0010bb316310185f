"""The ``tune`` section of the config tree: what `llamapro tune` searches and how. Pure: no torch, no
ray (the Ray Tune objects are built from it in ``llamapro/tune/space.py``).

    tune:
      num_samples: 1                          # repeats of the grid (or random samples)
      forgetting_penalty: 1.0                 # objective = domain gain - 1.0 x forgetting
      scheduler: {type: asha, grace_period: 4}
      space:
        expand.placement: {grid: [even, top, bottom, middle, [1, 3]]}   # strategies or position sets
        expand.blocks: {choice: [2, 4]}
        train.stage_ratios: {choice: [[0.3], [0.5]]}
        train.lr: {loguniform: [2.0e-5, 2.0e-4]}

A method comparison searches ``train.mode`` itself (``llamapro`` against the baselines ``full``,
``lora``, ``freeze_last_n``, each trained from the *unexpanded* base at the same budget, as
``run.baselines`` does), every dimension a grid, each method with its own LR grid::

    tune:
      scheduler: {type: fifo}                 # ASHA would judge one method against another
      space:
        train.mode: {grid: [llamapro, full, lora, freeze_last_n]}
        train.lr: {grid: [1.0e-4, 3.0e-4]}    # the grid of methods not named in mode_space
        expand.blocks: {grid: [3, 6]}         # llamapro only (a baseline has no new blocks)
      mode_space:
        full: {train.lr: {grid: [1.0e-5, 3.0e-5, 1.0e-4]}}

Every key of ``space`` is a dotted path of the config tree (``train.lr``, ``expand.strategy``,
``data.seq_len``, ...) or ``expand.placement`` (a strategy name *or* an explicit list of new-block
indices, so one dimension can compare both); every value names exactly one distribution.

Whether a key names a field of the tree is a question about the whole tree, so the root
(``llamapro.config.Config``) asks it once every section is built: ``check_space(space, Config)``.
This module never imports the root (the root imports it).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from llamapro.config.train import MODES
from llamapro.errors import ConfigError

# distribution -> number of arguments (None: a non-empty list of values)
DISTRIBUTIONS = {"choice": None, "grid": None, "uniform": 2, "quniform": 3, "loguniform": 2,
                 "qloguniform": 3, "randint": 2, "qrandint": 3, "lograndint": 2}
PLACEMENT_KEY = "expand.placement"
"""Virtual key: a strategy name sets expand.strategy, a list of indices sets expand.positions."""
SCHEDULERS = ("asha", "fifo")
BUDGET_KEYS = ("train.max_steps", "train.max_tokens", "train.micro_batch_size", "train.grad_accum",
               "train.num_workers", "train.eval_batches", "data.seq_len")
"""Keys that set a trial's budget: the same for every method of a comparison."""
# keys a trial may not change: they place the trial's own files
_FIXED = ("run.name", "run.output_dir", "run.baselines")
# sections a trial never reads (a trial trains and evaluates; it does not serve)
_UNSEARCHABLE = ("serve",)


def _bad(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")


@dataclass
class SchedulerConfig:
    """The early-stopping scheduler. Its clock is the optimizer step of each trial and it judges
    the objective at every held-out evaluation (train.eval_every)."""

    type: str = "asha"
    """asha: Asynchronous Successive Halving stops trials whose objective trails the others' at a
    rung (grace_period, grace_period x reduction_factor, ...). fifo: no early stopping."""
    grace_period: int = 4
    """Optimizer steps every trial runs before ASHA may stop it (the first rung). Make it a
    multiple of train.eval_every: ASHA judges at evaluations."""
    reduction_factor: float = 2.0
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    max_t: int = 0
    """The last rung's step. 0: the largest step budget any trial of the space can have."""
    brackets: int = 1
    """ASHA brackets (1 is the usual choice; more hedge against a too-short grace period)."""

    def __post_init__(self):
        k = "tune.scheduler."
        if self.type not in SCHEDULERS:
            _bad(k + "type", f"{self.type!r} is not one of {', '.join(SCHEDULERS)}")
        if self.grace_period < 1:
            _bad(k + "grace_period", f"must be >= 1 optimizer step, got {self.grace_period}")
        if not self.reduction_factor > 1:
            _bad(k + "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        if self.max_t < 0:
            _bad(k + "max_t", f"must be >= 0 (0: from the step budgets), got {self.max_t}")
        if self.max_t and self.max_t <= self.grace_period:
            _bad(k + "max_t", f"must exceed grace_period ({self.grace_period}), got {self.max_t}")
        if self.brackets < 1:
            _bad(k + "brackets", f"must be >= 1, got {self.brackets}")


@dataclass
class TuneConfig:
    """``llamapro tune``: a Ray Tune experiment whose trials are real training runs (each expands
    the base itself, trains with Ray Train + DeepSpeed, and is evaluated on the held-out sets)."""

    name: str = ""
    """Experiment name: its directory under run.output_dir. Empty: <run.name>-tune. Running the
    same command again resumes an interrupted experiment of this name."""
    space: dict = field(default_factory=dict)
    """What to search: dotted config key -> {distribution: arguments}. Distributions: choice
    [values], grid [values] (every value, times num_samples), uniform/loguniform [low, high],
    quniform/qloguniform [low, high, q], randint/lograndint [low, high) and qrandint
    [low, high, q]. expand.placement takes strategy names and/or lists of new-block indices."""
    num_samples: int = 4
    """Trials drawn from the space (with grid entries: repeats of the whole grid)."""
    seed: int = 0
    """Seeds the random draws, so the same config samples the same trials."""
    max_concurrent: int = 0
    """Trials running at once. 0: as many as the cluster's CPUs (and GPUs) hold, counting each
    trial's Train workers and Ray Data actors. A larger value is capped to that."""
    domain_sets: list[str] = field(default_factory=list)
    """Held-out sets (data source names) of the new domain. Empty: eval.gate.domain_sets, else
    the first data source."""
    retention_sets: list[str] = field(default_factory=list)
    """Held-out sets of what the model already knew. Empty: eval.gate.retention_sets, else every
    other data source that holds data out."""
    forgetting_penalty: float = 1.0
    """The objective, maximised: domain_gain - forgetting_penalty x max(0, forgetting), where
    domain_gain = base loss - trained loss on the domain sets (mean) and forgetting = trained loss
    - base loss on the retention sets (the worst one), in nats/token. The base's losses are the
    expanded model's at step 0 (its new blocks are identities)."""
    max_forgetting: typing.Optional[float] = None
    """Optional constraint: a trial whose forgetting exceeds this is infeasible and never chosen as
    the best (it is still reported). null: no constraint, only the penalty."""
    driver_resource: str = "llamapro_tune_driver"
    """Custom Ray resource each trial's driver takes 0.01 of (the Train workers take the CPUs).
    A local cluster declares it; on your own cluster add it to the head node's resources."""
    max_failures: int = 0
    """Times Tune retries a trial whose driver failed (its Train run resumes from its last
    checkpoint). Worker failures are retried by train.max_failures inside the trial."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    mode_space: dict = field(default_factory=dict)
    """With ``train.mode`` in the space (a method comparison): per mode, entries that replace or
    add to the space for that mode's trials, e.g. ``{full: {train.lr: {grid: [1.0e-5, 3.0e-5]}}}``:
    each method is searched at its own learning rates (never one LR chosen for all). Grids only;
    budget keys (steps, tokens, batch, workers, seq_len) cannot differ between methods."""

    def __post_init__(self):
        if not isinstance(self.space, dict):
            _bad("tune.space", "must be a mapping of dotted config keys to distributions")
        self.space = flatten_space(self.space)  # each entry is checked by the root: check_space
        if not isinstance(self.mode_space, dict):
            _bad("tune.mode_space", "must map a train.mode to a space, e.g. "
                                    "{full: {train.lr: {grid: [1.0e-5, 3.0e-5]}}}")
        ms = {}
        for mode, sub in self.mode_space.items():
            if mode not in MODES:
                _bad("tune.mode_space", f"{mode!r} is not a train.mode ({', '.join(MODES)})")
            if not isinstance(sub, dict) or not sub:
                _bad(f"tune.mode_space.{mode}", "must be a non-empty mapping of dotted keys to grids")
            ms[mode] = flatten_space(sub)
            for key, spec in ms[mode].items():
                if key == "train.mode":
                    _bad(f"tune.mode_space.{mode}", "cannot set train.mode (it is the method)")
                if key in BUDGET_KEYS:
                    _bad(f"tune.mode_space.{mode}[{key!r}]", "every method trains at the same budget: "
                                                             "search budget keys in tune.space")
                if not (isinstance(spec, dict) and len(spec) == 1 and "grid" in spec):
                    _bad(f"tune.mode_space.{mode}[{key!r}]", f"give a grid, e.g. {{grid: [1.0e-5, "
                                                             f"3.0e-5]}}; got {spec!r}")
        self.mode_space = ms
        if ms and "train.mode" not in self.space:
            _bad("tune.mode_space", "applies only when tune.space searches train.mode "
                                    "(e.g. train.mode: {grid: [llamapro, full, lora]})")
        if "train.mode" in self.space:
            spec = self.space["train.mode"]
            if not (isinstance(spec, dict) and list(spec) == ["grid"]):
                _bad("tune.space['train.mode']", f"give a grid of modes, e.g. {{grid: [llamapro, full, "
                                                 f"lora, freeze_last_n]}}; got {spec!r}")
            for key, sp in self.space.items():
                if not (isinstance(sp, dict) and list(sp) == ["grid"]):
                    _bad(f"tune.space[{key!r}]", "with train.mode searched every dimension is a grid "
                                                 "(each method is judged at points of its own grid); "
                                                 f"got {sp!r}")
            if self.scheduler.type != "fifo":
                _bad("tune.scheduler.type", "must be fifo when train.mode is searched: ASHA would stop "
                                            "one method's trials for trailing another method's")
        if self.num_samples < 1:
            _bad("tune.num_samples", f"must be >= 1, got {self.num_samples}")
        if self.max_concurrent < 0:
            _bad("tune.max_concurrent", f"must be >= 0 (0: from the cluster's resources), got "
                                        f"{self.max_concurrent}")
        if self.forgetting_penalty < 0:
            _bad("tune.forgetting_penalty", f"must be >= 0, got {self.forgetting_penalty}")
        if self.max_forgetting is not None and self.max_forgetting < 0:
            _bad("tune.max_forgetting", f"must be >= 0 or null, got {self.max_forgetting}")
        both = set(self.domain_sets) & set(self.retention_sets)
        if both:
            _bad("tune.domain_sets", f"{sorted(both)} also listed in retention_sets")
        if not self.driver_resource or not self.driver_resource.replace("_", "").isalnum():
            _bad("tune.driver_resource", f"{self.driver_resource!r}: letters, digits and _ only")
        if self.max_failures < 0:
            _bad("tune.max_failures", f"must be >= 0, got {self.max_failures}")
        if self.name and not set(self.name) <= set(
                "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-."):
            _bad("tune.name", f"{self.name!r}: letters, digits, _ - . only (it names a directory)")

    def experiment_name(self, run_name: str) -> str:
        return self.name or f"{run_name}-tune"


def flatten_space(space: dict, prefix: str = "") -> dict:
    """Nested mappings become dotted keys, so ``train: {lr: {loguniform: ...}}`` and the CLI
    override ``tune.space.train.lr={loguniform: [1.0e-5, 1.0e-3]}`` mean ``train.lr``."""
    out: dict = {}
    for k, v in space.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and not (set(v) & set(DISTRIBUTIONS)) and isinstance(k, str):
            out.update(flatten_space(v, key))
        else:
            out[key] = v
    return out


def check_space(space: dict, root: type, mode_space: dict | None = None) -> None:
    """Every entry of a (flattened) ``tune.space`` (and of each ``tune.mode_space``), in order: a
    searchable key of the config tree ``root`` and exactly one well-formed distribution. Called by
    the root once it is built (and by the experiment's plan for mode_space)."""
    for key, spec in space.items():
        check_space_entry(key, spec, root)
    for sub in (mode_space or {}).values():
        for key, spec in sub.items():
            check_space_entry(key, spec, root)


def check_space_entry(key, spec, root: type) -> None:
    """Shape of one ``tune.space`` entry: a known path of the config tree ``root`` and exactly one
    distribution with well-formed arguments. (Whether each value is valid for its key is checked
    against the whole config by llamapro.tune before any trial starts.)"""
    where = f"tune.space[{key!r}]"
    if not isinstance(key, str) or not key:
        _bad("tune.space", f"keys are dotted config paths such as train.lr, got {key!r}")
    check_space_path(key, root)
    if not isinstance(spec, dict) or len(spec) != 1:
        _bad(where, f"give exactly one distribution, e.g. {{choice: [a, b]}} or "
                    f"{{loguniform: [1.0e-5, 1.0e-3]}}; got {spec!r}. Known: {', '.join(DISTRIBUTIONS)}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        _bad(where, f"unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
    n = DISTRIBUTIONS[dist]
    if not isinstance(args, list) or not args:
        _bad(where, f"{dist} takes a non-empty list, got {args!r}")
    if n is None:
        return
    if len(args) != n or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        shape = "[low, high]" if n == 2 else "[low, high, q]"
        _bad(where, f"{dist} takes {shape} numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        _bad(where, f"{dist} needs low < high, got {args!r}")
    if dist.startswith(("log", "qlog")) and low <= 0:
        _bad(where, f"{dist} needs low > 0, got {args!r}")
    if dist.endswith("randint") and not all(float(a).is_integer() for a in args):
        _bad(where, f"{dist} takes integers, got {args!r}")
    if n == 3 and not args[2] > 0:
        _bad(where, f"{dist} needs q > 0, got {args!r}")


def check_space_path(key: str, root: type) -> None:
    """``key`` must name a scalar or list field of the config tree ``root`` (or expand.placement)."""
    if key == PLACEMENT_KEY:
        return
    where = f"tune.space[{key!r}]"
    if key.startswith("tune.") or key in _FIXED:
        _bad(where, "the experiment's own settings and the trial's directory cannot be searched")
    if key.split(".")[0] in _UNSEARCHABLE:
        _bad(where, f"{key.split('.')[0]} is not a searchable section")
    cls, parts = root, key.split(".")
    named = False  # the previous part was a list of named sections: this part is an entry's name
    for i, part in enumerate(parts):
        if named:
            named = False
            continue
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            if cls is dict or typing.get_origin(cls) is dict:
                _bad(where, f"{'.'.join(parts[:i])} is not a searchable section")
            if i == len(parts) - 1:  # e.g. train.lr: {choise: [...]} flattened to train.lr.choise
                _bad(f"tune.space[{'.'.join(parts[:i])!r}]",
                     f"{part!r} is not a distribution; use one of {', '.join(DISTRIBUTIONS)}")
            _bad(where, f"{'.'.join(parts[:i])} is not a section")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            section = ".".join(parts[:i]) or "the top level"
            _bad(where, f"no config key {key!r}: {section} has {', '.join(names)}"
                        + (f" (and the virtual key {PLACEMENT_KEY})" if parts[:i] == ["expand"] else ""))
        cls = hints[part]
        args = typing.get_args(cls)
        if typing.get_origin(cls) is list and args and dataclasses.is_dataclass(args[0]) \
                and i < len(parts) - 1:
            if i == len(parts) - 2:
                _bad(where, f"name an entry of {'.'.join(parts[:i + 1])} and one of its keys "
                            f"({'.'.join(parts[:i + 1])}.<name>.<key>, e.g. data.sources.python-docs.weight)")
            cls, named = args[0], True
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        _bad(where, f"{key} is a section; search one of its keys (e.g. {key}."
                    f"{dataclasses.fields(cls)[0].name})")
    if typing.get_origin(cls) is dict or cls is dict or key == "data.sources":
        _bad(where, f"{key} is not a searchable value")
