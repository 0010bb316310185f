import pytest

from llamapro.config import ConfigError, from_dict
from llamapro.config.train import TrainConfig
from llamapro.training.stages import (
    ScheduleError,
    allocate,
    build_stages,
    normalise_ratios,
    split_groups,
)


def test_groups_bottom_to_top_and_cumulative_unfreezing():
    st = build_stages([5, 11, 17, 23, 29, 35], num_stages=3, top_lr_scale=2.0)
    assert [s.layers for s in st] == [[5, 11], [5, 11, 17, 23], [5, 11, 17, 23, 29, 35]]
    assert st[2].lr_scale == {5: 1.0, 11: 1.0, 17: 1.5, 23: 1.5, 29: 2.0, 35: 2.0}
    st = build_stages([5, 11, 17], num_stages=3, cumulative=False)
    assert [s.layers for s in st] == [[5], [11], [17]]


def test_single_stage_is_plain_llama_pro():
    (s,) = build_stages([3, 7], num_stages=1)
    assert s.layers == [3, 7] and s.ratio == 1.0 and s.name == "llamapro"


def test_stage_ratios_and_budgets():
    assert normalise_ratios([0.3], 3) == pytest.approx([0.3, 0.35, 0.35])
    st = allocate(build_stages([1, 2, 3], 3, [0.3]), 20)
    assert [s.steps for s in st] == [6, 7, 7] and sum(s.steps for s in st) == 20
    st = allocate(build_stages([1, 2], 2, [0.25, 0.75], final_originals_ratio=0.2), 10)
    assert st[-1].train_originals and sum(s.steps for s in st) == 10 and all(s.steps >= 1 for s in st)


def test_schedule_errors():
    with pytest.raises(ScheduleError, match="only 2 new blocks"):
        split_groups([1, 2], 3)
    with pytest.raises(ScheduleError, match="sum to 1"):
        normalise_ratios([0.5, 0.2], 2)
    with pytest.raises(ScheduleError, match="2 entries for 3"):
        normalise_ratios([0.5, 0.5], 3)
    with pytest.raises(ScheduleError, match="only 2 optimizer steps"):
        allocate(build_stages([1, 2, 3], 3), 2)


def test_train_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="train.mode"):
        from_dict(TrainConfig, {"mode": "magic"}, "train")
    with pytest.raises(ConfigError, match="train.zero_stage"):
        from_dict(TrainConfig, {"zero_stage": 4}, "train")
    with pytest.raises(ConfigError, match="train.original_lr"):
        from_dict(TrainConfig, {"original_lr": 0.1}, "train")
    with pytest.raises(ConfigError, match="train.final_originals_ratio"):
        from_dict(TrainConfig, {"final_originals_ratio": 0.1}, "train")
    with pytest.raises(ConfigError, match="unknown config key.*train.lr_peak"):
        from_dict(TrainConfig, {"lr_peak": 1.0}, "train")
    with pytest.raises(ConfigError, match="train.lora.rank"):
        from_dict(TrainConfig, {"lora": {"rank": 4}}, "train")
    tc = from_dict(TrainConfig, {"max_tokens": 8192, "micro_batch_size": 2, "num_workers": 2}, "train")
    assert tc.total_steps(256) == 8


def test_deepspeed_config_is_a_pure_function_with_user_override(tmp_path):
    from llamapro.training import build_ds_config

    tc = TrainConfig(zero_stage=3, micro_batch_size=2, grad_accum=4, max_grad_norm=0.5)
    cfg = build_ds_config(tc, bf16=False)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5 and not cfg["bf16"]["enabled"]
    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}')
    cfg = build_ds_config(TrainConfig(deepspeed_config=str(user)), bf16=True)
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["bf16"]["enabled"]
    # one worker has nothing to partition: stage 1/2 become 0, stage 3 stays
    assert build_ds_config(TrainConfig(num_workers=1, zero_stage=2), bf16=False)["zero_optimization"]["stage"] == 0
    assert build_ds_config(TrainConfig(num_workers=1, zero_stage=3), bf16=False)["zero_optimization"]["stage"] == 3
    assert build_ds_config(TrainConfig(num_workers=2, zero_stage=2), bf16=False)["zero_optimization"]["stage"] == 2


def test_select_parameters_trains_only_the_stage_and_modules():
    import copy

    from llamapro.expansion.strategies import plan
    from llamapro.expansion.surgery import expand_model
    from llamapro.training.stages import build_stages
    from tests.tiny_models import tiny_model

    m = tiny_model("llama")
    expand_model(m, plan(4, 2, "even"))  # new layers 2 and 5
    st = build_stages([2, 5], 2)
    groups = TrainConfig(trainable_modules=["mlp"])
    from llamapro.training import select_parameters

    g = select_parameters(m, groups, [2, 5], st[0])
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {f"model.layers.2.mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    g = select_parameters(copy.deepcopy(m), TrainConfig(original_lr=1e-6, train_norms=True), [2, 5], st[1])
    assert {x["name"] for x in g} == {"new_x1", "originals", "extra"}
    assert [x["lr"] for x in g if x["name"] == "originals"] == [1e-6]


def test_one_stage_takes_the_whole_budget_whatever_the_staged_ratio():
    # README's `train.num_stages=1` on the staged demo config (stage_ratios [0.3]) used to fail
    # inside the Train worker with "must sum to 1"
    assert normalise_ratios([0.3], 1) == [1.0]
    with pytest.raises(ScheduleError, match="sum to 1"):
        normalise_ratios([0.3, 0.3], 2)
