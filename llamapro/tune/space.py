"""The search space: one trial's sampled values put into a config, Ray Tune's ``param_space``, and
what the whole space is checked and bounded by before any trial starts (every value valid, the
largest budgets). Pure except ``search_space`` (Ray Tune's distributions)."""

from __future__ import annotations

import copy
import itertools

from llamapro.config import Config, ConfigError, from_dict, to_dict
from llamapro.config.loader import get_dotted, set_dotted
from llamapro.config.train import TrainConfig, baseline_of
from llamapro.config.tune import BUDGET_KEYS, PLACEMENT_KEY
from llamapro.errors import ScheduleError
from llamapro.expansion.strategies import PlacementError
from llamapro.expansion.strategies import plan as plan_placement
from llamapro.training.stages import allocate, build_stages

_BUDGET_KEYS = BUDGET_KEYS
POINT_KEY = "point"
"""A method comparison's one Tune dimension: a grid of explicit points (``method_points``)."""
LLAMAPRO_ONLY = ("expand.", "train.num_stages", "train.stage_ratios", "train.top_lr_scale",
                 "train.cumulative", "train.final_originals_ratio", "train.original_lr",
                 "train.lora_new_blocks", "train.distill_weight", "train.quantize_base")
"""Keys that mean nothing to a baseline (it trains the unexpanded base in one stage):
``llamapro.config.train.baseline_of`` drops them, so a comparison searches them for llamapro only."""


def _set(d: dict, key: str, value) -> None:
    set_dotted(d, key, copy.deepcopy(value), f"tune.space[{key!r}]")


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
    mode = (d.get("train") or {}).get("mode", "llamapro")
    if mode != "llamapro":
        # a baseline: the same budget and optimizer settings on the unexpanded base
        # (llamapro.config.train.baseline_of, what run.baselines trains)
        tc = from_dict(TrainConfig, {**d["train"], "mode": "llamapro"}, "train")
        d["train"] = to_dict(baseline_of(tc, mode))
    return d


def flat_params(params: dict) -> dict:
    """A trial's values as dotted keys (a method comparison's point unpacked)."""
    params = dict(params or {})
    point = params.pop(POINT_KEY, None)
    return {**params, **(point or {})}


def _llamapro_only(key: str) -> bool:
    return key == PLACEMENT_KEY or key.startswith(LLAMAPRO_ONLY)


def method_points(space: dict, mode_space: dict | None = None) -> list[dict]:
    """A method comparison (``train.mode`` in the space, every dimension a grid): the explicit
    trials. Per mode, the space with that mode's ``tune.mode_space`` entries put in (its own LR
    grid, say), and for a baseline without the llamapro-only keys (no duplicate baseline trials
    per block count). Ordered round robin over the modes (each mode's first point, then each
    one's second, ...), so an experiment cut short has tried every method."""
    mode_space = mode_space or {}
    per_mode = []
    for mode in space["train.mode"]["grid"]:
        sub = {k: v for k, v in space.items() if k != "train.mode"}
        sub.update(mode_space.get(mode, {}))
        if mode != "llamapro":
            sub = {k: v for k, v in sub.items() if not _llamapro_only(k)}
        keys = list(sub)
        pts = [{"train.mode": mode, **dict(zip(keys, combo))}
               for combo in itertools.product(*[sub[k]["grid"] for k in keys])]
        per_mode.append(pts)
    out = []
    for i in range(max(map(len, per_mode), default=0)):
        out += [pts[i] for pts in per_mode if i < len(pts)]
    return out


def space_keys(space: dict, mode_space: dict | None = None) -> list[str]:
    """The searched keys (the table's columns): the space's, then keys only a mode_space adds."""
    keys = list(space)
    for sub in (mode_space or {}).values():
        keys += [k for k in sub if k not in keys]
    return keys


def _values(spec: dict) -> list:
    """Representative values of a distribution: every choice, or the bounds of a range."""
    (dist, args), = spec.items()
    if dist in ("choice", "grid"):
        return list(args)
    low, high = args[0], args[1]
    if dist in ("randint", "lograndint"):
        high -= 1  # exclusive upper bound
    return [low, high]


def search_space(space: dict, mode_space: dict | None = None) -> dict:
    """The Ray Tune param_space (dotted keys kept as they are: they name the table's columns). A
    method comparison is one grid dimension of explicit points (``method_points``)."""
    from ray import tune

    if "train.mode" in space:
        return {POINT_KEY: tune.grid_search(method_points(space, mode_space))}

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


def _check_point(base: dict, params: dict, num_layers: int, where: str) -> None:
    try:
        cfg = from_dict(Config, apply_params(copy.deepcopy(base), params))
        p = plan_placement(num_layers, cfg.expand.blocks, cfg.expand.strategy,
                           cfg.expand.positions or None)
        check_stages(cfg, p.num_new)
    except (ConfigError, PlacementError) as e:
        raise ConfigError(f"{where}: {e}") from None


def check_space_values(base: dict, space: dict, num_layers: int, mode_space: dict | None = None) -> None:
    """Every value of every searched key, put into the base config alone, must make a valid
    config and placement: a typo in a choice fails here, not in trial 7 an hour later. A method
    comparison checks every one of its points."""
    if "train.mode" in space:
        for p in method_points(space, mode_space):
            _check_point(base, p, num_layers, f"tune.space point {p}")
        return
    for key, spec in space.items():
        for v in _values(spec):
            _check_point(base, {key: v}, num_layers, f"tune.space[{key!r}] value {v!r}")


def largest(space: dict, base: dict, key: str):
    """The largest value ``key`` can take in this experiment (the base's when not searched)."""
    vals = _values(space[key]) if key in space else []
    node = get_dotted(base, key)
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
