"""Ray Train + DeepSpeed on CPU (2 workers, gloo) training only the inserted blocks.

Where each training claim lives: the staged ZeRO-2 run (conftest's ``staged``) here; ZeRO-1 in the
LoRA run below (and test_train_quantized.py's int8 run); ZeRO-3 with 2 workers in
test_grow_twice.py (generation 2 trains under ZeRO-3) and with 1 worker in test_resume.py; a worker
killed mid-stage in the bf16 run below; a run killed and rerun in test_resume.py; a full disk at a
checkpoint in test_disk_full.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from llamapro.config.train import TrainConfig
from llamapro.training import run_training
from tests.integration.training_helpers import (
    SEQ,
    changed,
    data,
    events,
    kill_at_checkpoint,
    only_layers,
    rows,
    tensors,
    train,
)

pytestmark = pytest.mark.integration


def test_staged_zero2_trains_only_new_blocks(expanded, staged):
    out = staged
    # staged schedule: bottom group first, then both, with the configured budgets
    starts = events(out, "stage_start")
    assert [s["layers"] for s in starts] == [[2], [2, 5]]
    assert [s["steps"] for s in starts] == [2, 6]
    assert [s["zero_stage"] for s in starts] == [2, 2]
    # top group at 2x the bottom group's LR
    groups = starts[1]["optimizer_groups"]
    assert set(groups) == {"new_x1", "new_x2"}
    # the optimizer holds state only for the inserted blocks: Adam's 2 moments per parameter
    for st in events(out, "optimizer_state"):
        assert 2 * st["trainable_params"] <= st["numel"] <= 2 * st["trainable_params"] + 4096
    total = starts[0]["total_params"]
    assert starts[1]["trainable_params"] < total / 2
    # only inserted-block parameters changed; originals bit-identical
    assert only_layers(changed(tensors(expanded / "exp"), tensors(out / "model")), 2, 5)
    # loss falls on held-out data
    ev = [e["eval_loss"]["domain"] for e in events(out, "eval")]
    assert ev[-1] < ev[0]
    assert all(e["eval_loss"]["one-row"] > 0.1 for e in events(out, "eval"))  # 2 workers, 1 row
    meta = json.loads((out / "model" / "llamapro.json").read_text())
    assert meta["kind"] == "trained" and meta["training"]["originals_frozen"]
    assert meta["new_layer_indices"] == [2, 5]
    # dtype auto: the worker's probe chose, and the run says what and why
    assert meta["training"]["dtype"]["requested"] == "auto"
    assert meta["training"]["dtype"]["compute"] in ("bfloat16", "float32")
    assert meta["training"]["dtype"]["reason"].startswith("auto: ")


def test_early_stopping_and_distillation(ray_start_4_cpus, expanded):
    # a vanishing LR cannot improve held-out loss: patience 1 stops the first stage early
    out, res = train(ray_start_4_cpus, expanded, "early", lr=1e-12, num_stages=2, max_steps=12,
                     eval_every=1, patience=1, distill_weight=0.5)
    assert res.error is None
    stops = events(out, "early_stop")
    assert stops and stops[0]["stage"] == 0
    steps_done = events(out, "step")
    assert len(steps_done) < 12
    # distillation to the skipped-blocks base: at init the model IS the base, so KL ~ 0
    assert all("kl" in e for e in steps_done) and abs(steps_done[0]["kl"]) < 1e-4


def _kl_to_base(model_dir, base_dir, rs) -> float:
    """Mean over next-token positions of KL(base || model), from the definition, in float64."""
    from transformers import AutoModelForCausalLM

    x = torch.as_tensor(np.stack([r["input_ids"] for r in rs]))
    with torch.no_grad():
        s = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=x).logits.double()
        t = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=x).logits.double()
    p = t.softmax(-1)
    return float((p * (p.log() - s.log_softmax(-1))).sum(-1)[:, :-1].mean())


def test_distillation_holds_the_trained_model_near_the_base(ray_start_4_cpus, expanded):
    # an LR that really moves the new blocks in 4 steps (at 3e-3 the held-out KL to the base was only
    # 4e-4): without the KL term they drift from the base, a large distill_weight holds them near it
    # (KL to the base on held-out rows, measured here). One worker per run: the distributed path is
    # the early-stopping test's.
    w, runs = 100.0, {}
    for weight in (0.0, w):
        out, res = train(ray_start_4_cpus, expanded, f"distill{weight:g}", lr=1e-2, max_steps=4,
                         eval_every=4, checkpoint_every=100, num_workers=1, distill_weight=weight)
        assert res.error is None
        runs[weight] = out, events(out, "step")
    plain, distilled = runs[0.0][1], runs[w][1]
    assert len(plain) == len(distilled) == 4
    assert all("kl" not in e for e in plain)
    # the logged term: 0 at the identity init, then > 0 as the blocks move, and inside the loss
    kls = [e["kl"] for e in distilled]
    assert abs(kls[0]) < 1e-4 and max(kls[1:]) > 1e-6
    assert all(e["loss"] >= w * e["kl"] for e in distilled)
    held_out = rows(16, 1)
    kl_plain = _kl_to_base(runs[0.0][0] / "model", expanded / "base", held_out)
    kl_distilled = _kl_to_base(runs[w][0] / "model", expanded / "base", held_out)
    assert kl_plain > 1e-3, kl_plain  # training really moved the undistilled model from the base
    assert kl_distilled < 0.5 * kl_plain, (kl_distilled, kl_plain)


def test_lora_on_new_blocks_merged_under_zero1(ray_start_4_cpus, expanded):
    """LoRA on the new blocks, merged into a plain model, on ZeRO-1 (the ZeRO-1 run of this file:
    the stage that ran, Adam state only for what trains, only new blocks changed, loss falls)."""
    out, res = train(ray_start_4_cpus, expanded, "lora", lora_new_blocks=True, zero_stage=1, max_steps=4,
                     eval_every=2, lr=1e-2)
    assert res.error is None
    st = events(out, "stage_start")[0]
    assert set(st["optimizer_groups"]) == {"lora"}
    assert st["zero_stage"] == 1
    opt = events(out, "optimizer_state")[0]
    assert 2 * opt["trainable_params"] <= opt["numel"] <= 2 * opt["trainable_params"] + 4096
    # merged: a plain model with the expanded checkpoint's tensors, no adapter tensors
    assert only_layers(changed(tensors(expanded / "exp"), tensors(out / "model")), 2, 5)
    ev = [e["eval_loss"]["domain"] for e in events(out, "eval")]
    assert ev[-1] < ev[0]


def test_baselines_full_and_freeze_last_n(ray_start_4_cpus, expanded):
    # one worker, one step, no evaluation and only the final checkpoint: what each mode trains
    for mode, kw in (("full", {}), ("freeze_last_n", {"freeze_last_n": 1}), ("lora", {})):
        out, res = train(ray_start_4_cpus, expanded, f"base-{mode}", model="base", mode=mode, max_steps=1,
                         lr=1e-3, eval_every=100, checkpoint_every=100, num_workers=1, **kw)
        assert res.error is None
        moved = changed(tensors(expanded / "base"), tensors(out / "model"))
        if mode == "freeze_last_n":
            assert only_layers(moved, 3)
        else:
            assert len(moved) > 10


def test_llamapro_mode_refuses_an_unexpanded_model(ray_start_4_cpus, expanded):
    ds, ev = data(ray_start_4_cpus)
    with pytest.raises(ValueError, match="records no inserted layers"):
        run_training(TrainConfig(), str(expanded / "base"), str(expanded / "x"), ds, ev, seq_len=SEQ)


@pytest.fixture(scope="module")
def bf16_killed(ray_start_4_cpus, expanded):
    """bf16 forced (hardware-independent), ZeRO-2, 2 workers, a failure budget of 1: worker 1
    SIGKILLs itself about to write the step-6 checkpoint, once Ray Train registered step 4's."""
    name = "bf16"
    out = expanded / name
    hook = kill_at_checkpoint(6, rank=1, storage=out / "ray" / name, registered=4, marker=expanded / "bf16.killed")
    out, res = train(ray_start_4_cpus, expanded, name, dtype="bfloat16", zero_stage=2, max_steps=8,
                     eval_every=2, checkpoint_every=2, max_failures=1, report_metrics=hook)
    assert (expanded / "bf16.killed").exists(), "the worker was never killed"
    assert res.error is None and res.metrics["final"]
    return out


def test_resume_after_worker_killed(bf16_killed):
    """Ray Train restarts the worker group; it resumes from the latest registered checkpoint (not
    from scratch), past the micro-batches each worker had used."""
    out = bf16_killed
    (resume,) = events(out, "resume")
    assert resume["step"] == 4  # the latest registered when the worker died
    ran = [e["step"] for e in events(out, "step")]
    assert ran == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # died before step 6's checkpoint; never from scratch
    skips = events(out, "data_skip")  # each worker went past the micro-batches it had used
    assert [(e["step"], e["micro_batches_per_worker"]) for e in skips] == [(4, 4)]
    assert [s["zero_stage"] for s in events(out, "stage_start")] == [2, 2]


def test_bf16_training_keeps_originals_bit_identical_in_run_and_export(bf16_killed, expanded, tmp_path):
    """bf16 forced (hardware-independent): frozen originals computed in bf16, new blocks trained
    in fp32 masters; the run's model and its export take the originals from the checkpoints,
    bit for bit, never from the bf16 copy (through a worker's death and the resume, too)."""
    from llamapro.publish.export import export

    out = bf16_killed
    dtype = json.loads((out / "model" / "llamapro.json").read_text())["training"]["dtype"]
    assert dtype["compute"] == "bfloat16" and dtype["frozen_weights"] == "bfloat16"
    assert dtype["trainable_weights"] == "float32" and dtype["method"] == "torch.autocast"
    start = events(out, "stage_start")[0]
    assert start["dtype"]["compute"] == "bfloat16"
    # checkpointing auto: bf16 activations are small enough to keep
    assert start["checkpointing"] == "off" and start["checkpointed_layers"] == []
    ev = [e["eval_loss"]["domain"] for e in events(out, "eval")]
    assert all(np.isfinite(ev)) and ev[-1] < ev[0]

    exported = tmp_path / "export"
    export(str(out), str(exported))
    before = tensors(expanded / "exp")
    base = tensors(expanded / "base")
    for tree in (tensors(out / "model"), tensors(exported)):
        assert tree.keys() == before.keys()
        assert all(v.dtype == torch.float32 for v in tree.values())
        assert only_layers(changed(before, tree), 2, 5)
        # every original tensor of the 4-layer base, at its place in the 6-layer model, bit for bit
        place = dict(zip(range(4), [0, 1, 3, 4]))
        for k, v in base.items():
            if k.startswith("model.layers."):
                i, rest = k[len("model.layers."):].split(".", 1)
                k = f"model.layers.{place[int(i)]}.{rest}"
            assert torch.equal(tree[k], v), k


def test_a_failing_worker_is_one_clear_error(ray_start_4_cpus, expanded, tmp_path):
    """Train V2's fit() raises TrainingFailedError (it never returns result.error): the caller gets
    the worker's own error line and where the logs are, not Ray's wrapper traceback."""
    from llamapro.errors import TrainingError

    missing = tmp_path / "no-such-deepspeed.json"
    with pytest.raises(TrainingError) as e:
        train(ray_start_4_cpus, expanded, "fails", deepspeed_config=str(missing), max_failures=0, max_steps=2)
    msg = str(e.value)
    # both workers fail alike; whichever Ray Train saw first is the one named (under load, rank 1)
    assert re.search(r"worker [01]: \w+Error: .*no-such-deepspeed\.json", msg), msg
    assert "Traceback" not in msg and "resumes" in msg
