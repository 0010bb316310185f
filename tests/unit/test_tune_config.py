"""The tune section and the pure parts of llamapro.tune (no Ray started)."""

import pytest

from llamapro.config import ConfigError, load_config
from llamapro.tune import apply_params, max_over_budgets, objective_metrics, pareto_front, steps_of


def _space(**kw):
    return [f"tune.space={kw}"]


def test_space_loads_flat_nested_and_from_overrides():
    cfg = load_config(None, ["tune.space.train.lr={loguniform: [1.0e-5, 1.0e-3]}",
                             "tune.space.expand.placement={grid: [even, [1, 3]]}"])
    assert cfg.tune.space == {"train.lr": {"loguniform": [1e-5, 1e-3]},
                              "expand.placement": {"grid": ["even", [1, 3]]}}


@pytest.mark.parametrize("override, message", [
    ("tune.space={'train.lrr': {choice: [1]}}", "no config key 'train.lrr'"),
    ("tune.space={'train.lr': {choise: [1]}}", "'choise' is not a distribution"),
    ("tune.space={'train.lr': 0.1}", "give exactly one distribution"),
    ("tune.space={'train.lr': {uniform: [1]}}", r"uniform takes \[low, high\]"),
    ("tune.space={'train.lr': {uniform: [2, 1]}}", "low < high"),
    ("tune.space={'train.lr': {loguniform: [0, 1]}}", "low > 0"),
    ("tune.space={'train.micro_batch_size': {randint: [1.5, 4]}}", "takes integers"),
    ("tune.space={'train.lr': {choice: []}}", "non-empty list"),
    ("tune.space={'train': {choice: [1]}}", "is a section"),
    ("tune.space={'tune.num_samples': {choice: [1]}}", "cannot be searched"),
    ("tune.space={'serve.x': {choice: [1]}}", "serve is not a section|not a searchable"),
    ("tune.num_samples=0", "tune.num_samples: must be >= 1"),
    ("tune.scheduler.type=hyperband", "tune.scheduler.type"),
    ("tune.scheduler.grace_period=0", "grace_period"),
    ("tune.scheduler.reduction_factor=1", "reduction_factor"),
    ("tune.scheduler.typo=1", r"unknown config key\(s\): tune.scheduler.typo"),
    ("tune.max_forgetting=-1", "max_forgetting"),
    ("tune.forgetting_penalty=-1", "forgetting_penalty"),
    ("tune.name=a/b", "tune.name"),
    ("tune.nmae=x", r"unknown config key\(s\): tune.nmae"),
])
def test_bad_tune_sections_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_placement_sets_strategy_or_positions():
    d = {"expand": {"blocks": 6, "strategy": "even", "positions": []}}
    assert apply_params(d, {"expand.placement": [1, 4, 7]})["expand"] == {
        "blocks": 3, "strategy": "even", "positions": [1, 4, 7]}
    assert apply_params(d, {"expand.placement": "top"})["expand"]["positions"] == []
    d = {"expand": {"blocks": 2, "strategy": "even", "positions": [0, 1]}}
    assert apply_params(d, {"expand.strategy": "middle"})["expand"]["positions"] == []


def test_objective_penalises_only_forgetting():
    base = {"dom": 3.0, "ret": 2.0}
    m = objective_metrics({"dom": 2.5, "ret": 2.1}, base, ["dom"], ["ret"], 2.0, 0.05)
    assert m["domain_gain"] == pytest.approx(0.5) and m["forgetting"] == pytest.approx(0.1)
    assert m["objective"] == pytest.approx(0.3) and m["feasible"] is False
    m = objective_metrics({"dom": 2.5, "ret": 1.9}, base, ["dom"], ["ret"], 2.0, None)
    assert m["objective"] == pytest.approx(0.5) and m["feasible"] is True
    assert objective_metrics(base, base, ["dom"], ["ret"], 1.0, None)["objective"] == 0.0  # step 0


def test_pareto_front_and_budget_bound():
    pts = [(0.1, 0.5), (0.0, 0.2), (0.2, 0.4), (0.05, 0.5), (-0.1, 0.1)]
    assert pareto_front(pts) == [4, 1, 3]
    cfg = load_config(None, [])
    from llamapro.config import to_dict

    space = {"train.max_steps": {"choice": [4, 30]}, "train.micro_batch_size": {"choice": [1, 4]}}
    assert max_over_budgets(space, to_dict(cfg), steps_of) == 30


def test_shipped_tune_demo_declares_every_kind_of_dimension():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "jobs/configs/tune_demo.yaml")
    assert {"expand.placement", "expand.blocks", "train.stage_ratios", "train.lr"} <= set(cfg.tune.space)
    assert cfg.tune.scheduler.type == "asha"


def test_an_experiment_stays_resumable_when_a_release_adds_a_key_with_a_default():
    """The resume check hashes the base config's non-default settings: a new key at its default (as
    run.baseline_lrs was on 2026-12-03) or the pipeline's own run.baselines leave it as it was;
    a changed training setting does not. The digest an earlier llamapro wrote is still accepted."""
    import copy
    import hashlib
    import json

    from llamapro.config import Config, to_dict
    from llamapro.tune.plan import TunePlan, legacy_spec_digests, spec_digest

    base = to_dict(Config())
    base["train"]["lr"] = 3e-4
    plan = TunePlan(base=base, space={"train.mode": {"grid": ["llamapro", "full"]}}, domain_sets=["d"],
                    retention_sets=["r"], penalty=2.0, max_forgetting=None)
    d = spec_digest(plan)
    older = copy.deepcopy(plan)  # a config from before train.compile and run.baseline_lrs existed
    del older["base"]["run"]["baseline_lrs"], older["base"]["train"]["compile"]
    assert spec_digest(older) == d
    pipeline = copy.deepcopy(plan)
    pipeline["base"]["run"]["baselines"] = ["full"]
    pipeline["base"]["run"]["baseline_lrs"] = {"full": 1e-4}
    assert spec_digest(pipeline) == d
    for key, value in (("lr", 1e-3), ("max_steps", 25)):
        changed = copy.deepcopy(plan)
        changed["base"]["train"][key] = value
        assert spec_digest(changed) != d
    # the digest llamapro wrote before 2026-12-03: the whole base config without run.baseline_lrs
    old_base = copy.deepcopy(base)
    del old_base["run"]["baseline_lrs"]
    old = hashlib.blake2b(json.dumps({"base": old_base, "space": plan.space, "domain_sets": ["d"],
                                      "retention_sets": ["r"], "penalty": 2.0, "max_forgetting": None},
                                     sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
    assert old in legacy_spec_digests(plan) and old != d
