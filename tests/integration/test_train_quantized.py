"""train.quantize_base through ``run_training`` (Ray Train + DeepSpeed on CPU): the originals are held
quantized by bitsandbytes (nf4, int8), only the new blocks train, and the written model is an
ordinary full-precision checkpoint with the originals bit-identical, loadable by plain transformers;
a run whose worker is killed mid-stage resumes into a freshly quantized model (nf4: the int8 run
loads its quantized base the same way, and its worker-killed path is the same restore)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.training_helpers import (
    changed,
    events,
    kill_at_checkpoint,
    only_layers,
    rows,
    tensors,
    train,
)

pytestmark = pytest.mark.integration
pytest.importorskip("bitsandbytes", reason="train.quantize_base needs bitsandbytes (llamapro[quant])")


@pytest.mark.parametrize("kind,zero_stage,lora", [("nf4", 2, False), ("int8", 1, False), ("nf4", 2, True)],
                         ids=["nf4-zero2-killed", "int8-zero1", "nf4-lora"])
def test_quantized_base_trains_only_new_blocks(ray_start_4_cpus, expanded_q, kind, zero_stage, lora):
    name = f"q-{kind}-zero{zero_stage}{'-lora' if lora else ''}"
    out = expanded_q / name
    # nf4-zero2: worker 1 dies about to write the step-4 checkpoint (step 2's registered); the
    # group restarts and resumes into a freshly quantized model
    killed = zero_stage == 2 and not lora
    marker = expanded_q / f"{name}.killed"
    hook = kill_at_checkpoint(4, rank=1, storage=out / "ray" / name, registered=2, marker=marker) if killed else None
    out, res = train(ray_start_4_cpus, expanded_q, name, model="exp", quantize_base=kind, zero_stage=zero_stage,
                     max_steps=6, lr=1e-2 if lora else 3e-3,  # LoRA adapters learn slower per step
                     eval_every=3, checkpoint_every=2 if killed else 6, max_failures=1 if killed else 0,
                     lora_new_blocks=lora, report_metrics=hook)
    assert res.error is None and res.metrics["final"]
    starts = events(out, "stage_start")
    assert [s["zero_stage"] for s in starts] == [zero_stage] * len(starts)
    if killed:
        assert marker.exists(), "the worker was never killed"
        (resume,) = events(out, "resume")
        assert resume["step"] == 2
        assert [e["step"] for e in events(out, "step")] == [1, 2, 3, 4, 3, 4, 5, 6]  # never from scratch
        assert [e["micro_batches_per_worker"] for e in events(out, "data_skip")] == [2]
        assert [s["quantized_base"]["kind"] for s in starts] == [kind, kind]
    else:
        assert len(starts) == 1
    # the workers held the originals quantized: every original Linear, no new block's
    start = starts[-1]
    q = start["quantized_base"]
    assert q["kind"] == kind and q["new_layer_indices"] == [2, 5] and q["quantized_linears"] == 4 * 7
    assert 0 < start["trainable_params"] < start["total_params"] / 2
    # the originals never changed; every new block did (LoRA: merged); the output is full precision
    before, after = tensors(expanded_q / "exp"), tensors(out / "model")
    assert all(v.dtype == torch.float32 for v in after.values())
    moved = changed(before, after)
    assert only_layers(moved, 2, 5) and {k.split(".")[2] for k in moved} == {"2", "5"}
    ev_loss = [e["eval_loss"]["domain"] for e in events(out, "eval")]
    assert ev_loss[-1] < ev_loss[0]
    meta = json.loads((out / "model" / "llamapro.json").read_text())
    assert meta["kind"] == "trained" and meta["training"]["originals_frozen"]
    assert meta["training"]["quantize_base"] == kind == meta["training"]["config"]["quantize_base"]
    assert meta["training"]["dtype"]["frozen_weights"].startswith(kind)
    # an ordinary checkpoint: plain transformers loads it, nothing quantized about it
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert "quantization_config" not in m.config.to_dict() and m.config.num_hidden_layers == 6
    with torch.no_grad():
        logits = m(input_ids=torch.as_tensor([rows(1, 1)[0]["input_ids"]])).logits
    assert torch.isfinite(logits).all()
