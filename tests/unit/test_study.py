"""The method comparison's pure parts (issue 17): one Tune experiment over train.mode x train.lr,
each method with its own LR grid, baselines trained as ``baseline_of`` says, the best LR chosen per
method by the same objective; the study runner's reading of an experiment cut short; and
``llamapro compare`` scoring the base's battery once (the same numbers as the per-run path)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamapro.config import Config, ConfigError, from_dict, load_config, to_dict
from llamapro.config.train import TrainConfig, baseline_of
from llamapro.tune import apply_params
from llamapro.tune.results import pick_best, pick_best_by_mode
from llamapro.tune.space import POINT_KEY, flat_params, method_points

SPACE = ["tune.scheduler.type=fifo",
         "tune.space={train.mode: {grid: [llamapro, full, lora]}, train.lr: {grid: [1.0e-4, 3.0e-4]}, "
         "expand.blocks: {grid: [2, 4]}}",
         "tune.mode_space={full: {train.lr: {grid: [1.0e-5, 3.0e-5, 1.0e-4]}}}"]


def test_each_method_gets_its_own_grid_round_robin_and_no_duplicate_baselines():
    cfg = load_config(None, SPACE)
    pts = method_points(cfg.tune.space, cfg.tune.mode_space)
    by = {}
    for p in pts:
        by.setdefault(p["train.mode"], []).append(p)
    # llamapro: its lr grid x block counts; full: its own lr grid, no block axis; lora: the default grid
    assert [(p["train.lr"], p["expand.blocks"]) for p in by["llamapro"]] == [
        (1e-4, 2), (1e-4, 4), (3e-4, 2), (3e-4, 4)]
    assert by["full"] == [{"train.mode": "full", "train.lr": v} for v in (1e-5, 3e-5, 1e-4)]
    assert by["lora"] == [{"train.mode": "lora", "train.lr": v} for v in (1e-4, 3e-4)]
    assert len(pts) == 4 + 3 + 2 and len({json.dumps(p, sort_keys=True) for p in pts}) == len(pts)
    # round robin: every method is tried before any method's second point
    assert [p["train.mode"] for p in pts[:3]] == ["llamapro", "full", "lora"]
    assert [p["train.mode"] for p in pts[3:6]] == ["llamapro", "full", "lora"]
    assert flat_params({POINT_KEY: pts[1]}) == pts[1]


def test_a_baseline_trial_is_baseline_of_the_same_budget():
    base = to_dict(load_config(None, ["train.num_stages=3", "train.stage_ratios=[0.3]", "train.top_lr_scale=2.0",
                                      "train.max_steps=24", "train.micro_batch_size=4", "train.num_workers=2"]))
    for mode in ("full", "lora", "freeze_last_n"):
        d = apply_params(json.loads(json.dumps(base)), {"train.mode": mode, "train.lr": 3e-5})
        got = from_dict(Config, d).train
        want = baseline_of(from_dict(TrainConfig, {**base["train"], "lr": 3e-5}), mode)
        assert got == want
        assert (got.mode, got.num_stages, got.top_lr_scale, got.lr) == (mode, 1, 1.0, 3e-5)
        assert got.total_steps(256) == 24 and (got.micro_batch_size, got.num_workers) == (4, 2)
    lp = from_dict(Config, apply_params(json.loads(json.dumps(base)), {"train.mode": "llamapro"})).train
    assert (lp.num_stages, lp.top_lr_scale) == (3, 2.0)


@pytest.mark.parametrize("overrides, message", [
    (["tune.scheduler.type=fifo", "tune.space={train.lr: {grid: [1.0e-4]}}",
      "tune.mode_space={full: {train.lr: {grid: [1.0e-5]}}}"], "applies only when tune.space searches train.mode"),
    (["tune.space={train.mode: {grid: [llamapro, full]}}"], "must be fifo when train.mode is searched"),
    (["tune.scheduler.type=fifo", "tune.space={train.mode: {choice: [llamapro, full]}}"], "give a grid of modes"),
    (["tune.scheduler.type=fifo", "tune.space={train.mode: {grid: [llamapro, full]}, "
      "train.lr: {loguniform: [1.0e-5, 1.0e-3]}}"], "every dimension is a grid"),
    (["tune.scheduler.type=fifo", "tune.space={train.mode: {grid: [llamapro, full]}}",
      "tune.mode_space={full: {train.max_steps: {grid: [48]}}}"], "same budget"),
    (["tune.scheduler.type=fifo", "tune.space={train.mode: {grid: [llamapro, full]}}",
      "tune.mode_space={ful: {train.lr: {grid: [1.0e-5]}}}"], "'ful' is not a train.mode"),
    (["tune.scheduler.type=fifo", "tune.space={train.mode: {grid: [llamapro, full]}}",
      "tune.mode_space={full: {train.lr: {choice: [1.0e-5]}}}"], "give a grid"),
])
def test_bad_method_comparisons_are_clear(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_typo_in_a_mode_space_key_fails_before_any_trial(tmp_path):
    from llamapro.tune import plan_experiment
    from tests.unit.eval_support import make_base

    base = make_base(tmp_path)
    cfg = load_config(None, [f"model.base={base}", "data.sources=[{name: d, paths: [x], eval_fraction: 0.1}]",
                             "tune.scheduler.type=fifo", "tune.space={train.mode: {grid: [llamapro, full]}}",
                             "tune.mode_space={full: {train.lrr: {grid: [1.0e-5]}}}"])
    with pytest.raises(ConfigError, match="no config key 'train.lrr'"):
        plan_experiment(cfg, tmp_path)


def _row(tid, mode, lr, objective, status="completed", feasible=True):
    return {"trial_id": tid, "train.mode": mode, "train.lr": lr, "objective": objective,
            "domain_gain": objective, "forgetting": 0.0, "status": status, "feasible": feasible}


def test_best_lr_is_chosen_per_method_not_once_for_all():
    rows = [_row("a", "llamapro", 1e-3, 0.30), _row("b", "llamapro", 1e-4, 0.10),
            _row("c", "full", 1e-3, -0.50), _row("d", "full", 3e-5, 0.20),
            _row("e", "full", 1e-5, 0.90, status="stopped early (asha, step 4)"),
            _row("f", "lora", 1e-3, 0.05, feasible=False), _row("g", "lora", 3e-4, 0.01)]
    best = pick_best_by_mode(rows)
    assert {m: b["train.lr"] for m, b in best.items()} == {"llamapro": 1e-3, "full": 3e-5, "lora": 3e-4}
    assert pick_best(rows)["trial_id"] == "a"  # one LR for all would have given full 1e-3


def test_study_reads_an_experiment_cut_short_from_its_trial_dirs(tmp_path):
    from benchmarks.study import best_by_mode, trials_from_dirs

    cfg = load_config(None, ["data.sources=[{name: dom, paths: [x], eval_fraction: 0.1}, "
                             "{name: ret, paths: [y], eval_fraction: 0.1}]", "tune.forgetting_penalty=2.0",
                             "tune.scheduler.type=fifo", "tune.space={train.mode: {grid: [llamapro, full]}}"])
    exp = tmp_path / "tune"
    (exp / "baselines").mkdir(parents=True)
    (exp / "baselines" / "x.json").write_text(json.dumps({"dom": 3.0, "ret": 2.0}))
    trials = {"t1": ("llamapro", 1e-4, {"dom": 2.8, "ret": 2.0}), "t2": ("llamapro", 1e-3, {"dom": 2.5, "ret": 2.05}),
              "t3": ("full", 1e-4, {"dom": 2.0, "ret": 2.6}), "t4": ("full", 1e-5, {"dom": 2.6, "ret": 2.01}),
              "t5": ("full", 3e-5, None)}  # t5 never finished
    for tid, (mode, lr, losses) in trials.items():
        td = exp / "trials" / tid
        (td / "model").mkdir(parents=True)
        (td / "trial.json").write_text(json.dumps({"trial_id": tid, "params": {"train.mode": mode, "train.lr": lr}}))
        if losses:
            (td / "model" / "config.json").write_text("{}")
            (td / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": 24, "eval_loss": losses}) + "\n")
    rows = trials_from_dirs(exp, cfg)
    assert sorted(r["trial_id"] for r in rows) == ["t1", "t2", "t3", "t4"]
    o = {r["trial_id"]: r["objective"] for r in rows}
    assert o["t2"] == pytest.approx(0.5 - 2 * 0.05) and o["t3"] == pytest.approx(1.0 - 2 * 0.6)
    best = best_by_mode(rows)
    assert best["llamapro"]["trial_id"] == "t2" and best["full"]["trial_id"] == "t4"


def test_compare_scores_the_base_battery_once_with_the_same_numbers(tmp_path):
    """The study's compare path (the base's battery scored once, cached) gives each run exactly
    the battery entries and gate the per-run path (``run_eval``, base via skipped blocks) gives."""
    from llamapro.eval import run_eval
    from llamapro.eval.compare import evaluate_run
    from tests.unit.eval_support import counting_blocks, make_base, make_run

    root = tmp_path
    make_base(root)
    runs = [make_run(root, "a", perturb=0.3, seed=1), make_run(root, "b", perturb=0.6, seed=2)]
    held = {"domain": counting_blocks(), "kept": counting_blocks(seed=3)}
    data = root / "battery" / "PIQA"
    data.mkdir(parents=True)
    data.joinpath("validation.jsonl").write_text("\n".join(json.dumps(
        {"question": f"q {i} {'x' * (i % 5)}", "options": f"A. a{i}\nB. bb{i % 3}", "answer": f"A. a{i}"})
        for i in range(12)))
    cfg = load_config(None, [
        f"model.base={root / 'base'}", "eval.prompts=''", "eval.check_rollback=false", "eval.max_blocks=4",
        f"eval.battery={{enabled: true, tasks: [piqa], data_dir: {root / 'battery'}, batch_size: 4}}",
        "eval.gate={domain_sets: [domain], retention_sets: [kept], max_retention_ppl_increase: 100.0, "
        "min_domain_ppl_decrease: -0.99, max_accuracy_drop: 0.0}"])
    cache = root / "study"
    lines = []
    shared = [evaluate_run(cfg, r, lines.append, base_cache=cache, heldout=held) for r in runs]
    assert len(list(cache.glob("base-battery-*.json"))) == 1
    assert sum("once for every run" in m for m in lines) == 1 and sum("reused" in m for m in lines) == 1
    for r, s in zip(runs, shared):
        ref = run_eval(cfg, run_dir=str(r), heldout=held)
        assert s["battery"]["base_scored_once"] is True
        assert s["battery"]["tasks"] == ref["battery"]["tasks"]
        assert s["gate"]["passed"] == ref["gate"]["passed"]
        assert [c for c in s["gate"]["checks"] if c["set"].startswith("battery")] == \
               [c for c in ref["gate"]["checks"] if c["set"].startswith("battery")]
        assert np.isclose(s["sets"]["domain"]["ppl_change"], ref["sets"]["domain"]["ppl_change"])


def test_a_best_lr_on_the_edge_gets_one_more_lr_beyond_it(tmp_path):
    from benchmarks.study import edge_points, extension_config

    rows = [_row("a", "llamapro", 1e-4, 0.10), _row("b", "llamapro", 3e-4, 0.20), _row("c", "llamapro", 1e-3, 0.15),
            _row("d", "full", 1e-5, 0.05), _row("e", "full", 3e-5, 0.10), _row("f", "full", 1e-4, 0.20),
            _row("g", "lora", 3e-4, 0.30), _row("h", "lora", 1e-3, 0.20),
            _row("i", "freeze_last_n", 1e-3, 0.10)]
    chosen = pick_best_by_mode(rows)
    # llamapro's best is inside its grid; full's on the top edge, LoRA's on the bottom edge; one LR: no step
    assert edge_points(rows, chosen) == {"full": pytest.approx(3e-4, rel=0.01), "lora": pytest.approx(1e-4, rel=0.01)}
    src = tmp_path / "study.yaml"
    src.write_text("run: {name: study}\ntune:\n  scheduler: {type: fifo}\n"
                   "  space: {train.mode: {grid: [llamapro, full, lora]}, train.lr: {grid: [1.0e-4, 3.0e-4]}}\n"
                   "  mode_space: {full: {train.lr: {grid: [1.0e-5]}}}\n")
    path = extension_config(src, "study-tune-ext1", {"full": 3e-4, "lora": 1e-4}, tmp_path)
    cfg = load_config(path)
    assert cfg.tune.name == "study-tune-ext1"
    assert method_points(cfg.tune.space, cfg.tune.mode_space) == [
        {"train.mode": "full", "train.lr": 3e-4}, {"train.mode": "lora", "train.lr": 1e-4}]
    # the extended LRs beat the edge: nothing more to extend
    rows += [_row("j", "full", 3e-4, 0.15), _row("k", "lora", 1e-4, 0.25)]
    assert edge_points(rows, pick_best_by_mode(rows)) == {}


def test_llamapros_shapes_are_their_own_rows_at_its_chosen_lr(tmp_path):
    from benchmarks.study import best_by_mode, edge_points, method_label, parse_variant, variant_config

    assert method_label({"train.mode": "full", "train.lr": 1e-4}) == "full"
    assert method_label({"train.mode": "llamapro", "train.lr": 3e-4}) == "llamapro"
    assert method_label({"train.mode": "llamapro", "train.lr": 3e-4, "expand.blocks": 12}) == "llamapro-blocks12"
    assert method_label({"train.mode": "llamapro", "expand.placement": "top"}) == "llamapro-top"
    assert method_label({"train.mode": "llamapro", "expand.placement": [3, 9]}) == "llamapro-placement3-9"
    assert parse_variant("expand.blocks=3,12") == {"expand.blocks": [3, 12]}
    assert parse_variant("expand.placement=top,bottom") == {"expand.placement": ["top", "bottom"]}
    assert method_label({"train.mode": "llamapro", "train.compile": "off"}) == "llamapro-compileoff"
    assert parse_variant("train.compile=off") == {"train.compile": ["off"]}
    # the replay share: a named source's weight; its row keeps the source's name
    assert parse_variant("data.sources.python-docs.weight=0.1,0.7") == {
        "data.sources.python-docs.weight": [0.1, 0.7]}
    assert method_label({"train.mode": "llamapro", "data.sources.python-docs.weight": 0.1}) == \
        "llamapro-python-docs-weight0.1"
    # a shape at LRs of its own: every LR of it is the same row, so its best LR is chosen for it
    assert parse_variant("train.num_stages=1 train.lr=1e-4,1e-3") == {
        "train.num_stages": [1], "train.lr": [1e-4, 1e-3]}
    assert method_label({"train.mode": "llamapro", "train.lr": 1e-3, "train.num_stages": 1}) == \
        "llamapro-num_stages1"
    with pytest.raises(ValueError, match="beside another key"):
        parse_variant("train.lr=1e-4,3e-4")
    with pytest.raises(ValueError, match="not a variant key"):
        parse_variant("train.mode=full")
    with pytest.raises(ValueError, match="given twice"):
        parse_variant("expand.blocks=3 expand.blocks=12")
    with pytest.raises(ValueError, match="expected KEY=V1,V2"):
        parse_variant("expand.blocks")
    # a shape beats llamapro's own row but does not replace it; a shape is never LR-extended
    rows = [_row("a", "llamapro", 1e-4, 0.10), _row("b", "llamapro", 3e-4, 0.20),
            {**_row("c", "llamapro", 3e-4, 0.25), "method": "llamapro-blocks12"}]
    chosen = best_by_mode(rows)
    assert {m: b["trial_id"] for m, b in chosen.items()} == {"llamapro": "b", "llamapro-blocks12": "c"}
    assert edge_points(rows, chosen) == {"llamapro": pytest.approx(1e-3, rel=0.01)}
    src = tmp_path / "study.yaml"
    src.write_text("run: {name: study}\ntune:\n  scheduler: {type: fifo}\n"
                   "  space: {train.mode: {grid: [llamapro, full]}, train.lr: {grid: [1.0e-4]}}\n"
                   "  mode_space: {full: {train.lr: {grid: [1.0e-5]}}}\n")
    cfg = load_config(variant_config(src, "study-tune-blocks", {"expand.blocks": [3, 12]}, 3e-4, tmp_path))
    assert cfg.tune.name == "study-tune-blocks"
    assert method_points(cfg.tune.space, cfg.tune.mode_space) == [
        {"train.mode": "llamapro", "train.lr": 3e-4, "expand.blocks": 3},
        {"train.mode": "llamapro", "train.lr": 3e-4, "expand.blocks": 12}]
    # a variant with LRs of its own replaces the chosen LR; a source's weight is a searchable key
    src.write_text("run: {name: study}\ndata:\n  sources:\n"
                   "    - {name: dom, paths: [a], weight: 0.7}\n    - {name: replay, paths: [b], weight: 0.3}\n"
                   "tune:\n  scheduler: {type: fifo}\n"
                   "  space: {train.mode: {grid: [llamapro, full]}, train.lr: {grid: [1.0e-4]}}\n")
    cfg = load_config(variant_config(src, "study-tune-x", {"train.num_stages": [1], "train.lr": [1e-4, 1e-3],
                                                           "data.sources.replay.weight": [0.1]}, 3e-4, tmp_path))
    points = method_points(cfg.tune.space, cfg.tune.mode_space)
    assert [p["train.lr"] for p in points] == [1e-4, 1e-3]
    assert all(p["data.sources.replay.weight"] == 0.1 and p["train.num_stages"] == 1 for p in points)
    from llamapro.config import to_dict
    from llamapro.tune.space import apply_params
    d = apply_params(to_dict(cfg), points[0])
    assert [s["weight"] for s in d["data"]["sources"]] == [0.7, 0.1]


def test_the_lr_table_lists_every_lr_a_shape_ran_at(tmp_path):
    from benchmarks.study import best_by_mode, lr_table

    src = tmp_path / "study.yaml"
    src.write_text("run: {name: study}\ntune:\n  scheduler: {type: fifo}\n"
                   "  space: {train.mode: {grid: [llamapro]}, train.lr: {grid: [1.0e-4, 3.0e-4]}}\n")
    cfg = load_config(src)
    rows = [_row("a", "llamapro", 1e-4, 0.05), _row("b", "llamapro", 3e-4, 0.10)]
    rows += [{**_row(t, "llamapro", lr, obj), "method": "llamapro-num_stages1"}
             for t, lr, obj in (("c", 3e-4, 0.145), ("d", 1e-3, 0.181), ("e", 3e-3, 0.177))]
    md = lr_table(cfg, best_by_mode(rows), 49152, rows)
    assert "| llamapro | 0.0001 (0.050), 0.0003 (0.100) | 0.0003 (still the edge) |" in md, md
    assert "| llamapro-num_stages1 | 0.0003 (0.145), 0.001 (0.181), 0.003 (0.177) | 0.001 |" in md, md


def test_verdicts_judge_each_run_against_the_baselines_of_its_own_mixture():
    """A replay-share study compares several mixtures in one table: each llamapro run is judged
    against the full fine-tuning run trained on its own mixture, not the best full run overall."""
    from llamapro.eval.compare import mixture_of, table_md, verdicts

    def row(label, mode, gain, mix):
        return {"label": label, "mode": mode, "lr": 1e-3, "tokens": 49152, "mixture": mix,
                "domain_gain": gain, "not_replayed_rise": -0.1, "replayed_rise": -0.1,
                "not_replayed_sets": ["perl"], "replayed_sets": ["py"], "battery": {}, "battery_drop": None,
                "greedy_exact": None, "greedy_prefix": None, "gate_passed": True}

    no, half = mixture_of({"data": {"sources": [{"name": "deb", "weight": 1}, {"name": "py", "weight": 0}]}}), \
        mixture_of({"data": {"sources": [{"name": "deb", "weight": 0.7}, {"name": "py", "weight": 0.7}]}})
    assert (no, half) == ("deb 100%, py 0%", "deb 50%, py 50%")
    assert mixture_of({"data": {"sources": [{"name": "deb", "weight": 0.5}, {"name": "py", "weight": 0.5}]}}) == half
    rows = [row("llamapro-0", "llamapro", 0.18, no), row("llamapro-50", "llamapro", 0.20, half),
            row("full-0", "full", 0.19, no), row("full-50", "full", 0.25, half)]
    v = verdicts(rows)
    # 0.18 / 0.19 = 95% of its own mixture's full run (against the best full overall it would be 72%)
    assert v["llamapro-0"].startswith("meets the target"), v["llamapro-0"]
    assert "95% of full fine-tuning's (full-0)" in v["llamapro-0"]
    assert v["llamapro-50"].startswith("misses the target"), v["llamapro-50"]
    assert "80% of full fine-tuning's (full-50)" in v["llamapro-50"]
    assert v["full-0"].startswith("reference") and v["full-50"].startswith("reference")
    # a run whose mixture no full run shares is judged against the best full run
    v = verdicts(rows + [row("llamapro-70", "llamapro", 0.20, "deb 30%, py 70%")])
    assert "80% of full fine-tuning's (full-50)" in v["llamapro-70"]
    md = table_md(rows, v)
    assert "| mixture |" in md and "| deb 50%, py 50% |" in md
    assert "| mixture |" not in table_md(rows[:1], verdicts(rows[:1]))
