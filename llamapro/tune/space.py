"""The search space: one trial's sampled values put into a config, Ray Tune's ``param_space``, and
what the whole space is checked and bounded by before any trial starts (every value valid, the
largest budgets). Pure except ``search_space`` (Ray Tune's distributions)."""

from __future__ import annotations

import copy
import itertools

from llamapro.config import Config, ConfigError, from_dict
from llamapro.config.tune import PLACEMENT_KEY
from llamapro.errors import ScheduleError
from llamapro.expansion.strategies import PlacementError
from llamapro.expansion.strategies import plan as plan_placement
from llamapro.training.stages import allocate, build_stages

_BUDGET_KEYS = ("train.max_steps", "train.max_tokens", "train.micro_batch_size", "train.grad_accum",
                "train.num_workers", "train.eval_batches", "data.seq_len")


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
    for key, spec in space.items():
        for v in _values(spec):
            where = f"tune.space[{key!r}] value {v!r}"
            try:
                cfg = from_dict(Config, apply_params(copy.deepcopy(base), {key: v}))
                p = plan_placement(num_layers, cfg.expand.blocks, cfg.expand.strategy,
                                   cfg.expand.positions or None)
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


def shares_data(space: dict) -> bool:
    """Trials can share the driver's data unless the space changes the data or the model."""
    return not any(k.startswith(("data.", "model.")) for k in space)
