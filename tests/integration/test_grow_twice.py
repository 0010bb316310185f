"""Growing twice with real training (Ray Train + DeepSpeed, 2 CPU workers): generation 1 is the
staged run (conftest's ``staged``, trained on ZeRO-2), generation 2 is expanded from it and trained
on ZeRO-3, which leaves generation 1's blocks frozen. This is also the suite's 2-worker ZeRO-3
run: the stage that ran, Adam state only for the trainable block, held-out loss falling."""

from __future__ import annotations

import json

import pytest

from llamapro.expansion import api as steps
from tests.integration.training_helpers import changed, events, only_layers, tensors, train

pytestmark = pytest.mark.integration


def test_generation_two_trains_only_its_own_blocks_under_zero3(ray_start_4_cpus, staged):
    t1 = staged / "model"
    g2 = staged.parent / "g2"
    meta2 = steps.expand(str(t1), str(g2), blocks=1, strategy="top", progress=False)
    assert meta2["generation"] == 2 and meta2["verification"]["ok"]
    assert meta2["new_layer_indices"] == [6] and meta2["frozen_layer_indices"] == [2, 5]
    out, res = train(ray_start_4_cpus, staged.parent, "run-g2", model="g2", zero_stage=3, max_steps=4,
                     eval_every=2)
    assert res.error is None
    assert [s["zero_stage"] for s in events(out, "stage_start")] == [3]  # the stage that ran
    assert only_layers(changed(tensors(g2), tensors(out / "model")), 6)
    st = events(out, "optimizer_state")[0]
    assert 2 * st["trainable_params"] <= st["numel"] <= 2 * st["trainable_params"] + 4096
    ev = [e["eval_loss"]["domain"] for e in events(out, "eval")]
    assert ev[-1] < ev[0]
    meta = json.loads((out / "model" / "llamapro.json").read_text())
    assert meta["generation"] == 2 and [g["generation"] for g in meta["generations"]] == [1, 2]
