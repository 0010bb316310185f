"""Growing twice with real training (Ray Train + DeepSpeed, 2 CPU workers): generation 2 is
expanded from the trained generation 1, and training it leaves generation 1's blocks frozen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llamapro.expansion import api as steps
from llamapro.training import run_training
from llamapro.config.train import TrainConfig
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.integration
SEQ = 16


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    return [{"input_ids": (ids := np.array([(int(rng.integers(3, 60)) + j) % 100 + 3 for j in range(SEQ)])),
             "labels": ids.copy()} for _ in range(n)]


def _tensors(d):
    sd = {}
    for f in Path(d).glob("*.safetensors"):
        sd.update(load_file(f))
    return sd


def _train(ray, model_dir, out, name):
    tc = TrainConfig(max_steps=2, lr=3e-3, micro_batch_size=4, eval_every=2, checkpoint_every=2,
                     eval_batches=1, zero_stage=2)
    ev = _rows(8, 1)
    res = run_training(tc, str(model_dir), str(out), ray.data.from_items(_rows(64, 0)),
                       {"d": {"input_ids": [r["input_ids"].tolist() for r in ev],
                              "labels": [r["labels"].tolist() for r in ev]}}, seq_len=SEQ, name=name)
    assert res.error is None
    return Path(out) / "model"


def test_generation_two_trains_only_its_own_blocks(ray_start_4_cpus, tmp_path):
    ray = ray_start_4_cpus
    tiny_model("llama", num_layers=4).save_pretrained(tmp_path / "base")
    steps.expand(str(tmp_path / "base"), str(tmp_path / "g1"), blocks=2, strategy="even", progress=False)
    t1 = _train(ray, tmp_path / "g1", tmp_path / "run1", "g1")
    meta2 = steps.expand(str(t1), str(tmp_path / "g2"), blocks=1, strategy="top", progress=False)
    assert meta2["generation"] == 2 and meta2["verification"]["ok"]
    assert meta2["new_layer_indices"] == [6] and meta2["frozen_layer_indices"] == [2, 5]
    t2 = _train(ray, tmp_path / "g2", tmp_path / "run2", "g2")
    before, after = _tensors(tmp_path / "g2"), _tensors(t2)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.6.") for k in changed), sorted(changed)[:5]
    meta = json.loads((t2 / "llamapro.json").read_text())
    assert meta["generation"] == 2 and [g["generation"] for g in meta["generations"]] == [1, 2]
