"""train.quantize_base through ``run_training`` (Ray Train + DeepSpeed on CPU): the originals are held
quantized by bitsandbytes (nf4, int8), only the new blocks train, and the written model is an
ordinary full-precision checkpoint with the originals bit-identical, loadable by plain transformers;
a run whose worker is killed mid-stage resumes into a freshly quantized model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llamapro.config.train import TrainConfig
from llamapro.expansion import api as steps
from llamapro.training import run_training
from tests.tiny_models import tiny_config

pytestmark = pytest.mark.integration
pytest.importorskip("bitsandbytes", reason="train.quantize_base needs bitsandbytes (llamapro[quant])")
SEQ = 32


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    """A tiny Llama whose Linear inputs are multiples of 64 (bitsandbytes' CPU 4-bit blocks), 4 -> 6
    layers, proven (training refuses unproven expansions)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("trainq")
    cfg = tiny_config("llama", num_layers=4)
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(d / "base")
    steps.expand(str(d / "base"), str(d / "exp"), blocks=2, strategy="even", progress=False)
    return d


def _rows(n, seed):
    """Counting sequences mod a small vocabulary: learnable, so loss must fall."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = int(rng.integers(3, 60))
        ids = np.array([(start + j) % 100 + 3 for j in range(SEQ)], dtype=np.int64)
        out.append({"input_ids": ids, "labels": ids.copy()})
    return out


def _tensors(d):
    sd = {}
    for f in Path(d).glob("*.safetensors"):
        sd.update(load_file(f))
    return sd


def _events(out, kind):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.mark.parametrize("kind,zero_stage,lora", [("nf4", 2, False), ("int8", 1, False), ("nf4", 2, True)],
                         ids=["nf4-zero2", "int8-zero1", "nf4-lora"])
def test_quantized_base_trains_only_new_blocks(ray_start_4_cpus, expanded, kind, zero_stage, lora):
    ray = ray_start_4_cpus
    ev = _rows(8, 1)
    eval_sets = {"domain": {"input_ids": [r["input_ids"].tolist() for r in ev],
                            "labels": [r["labels"].tolist() for r in ev]}}
    tc = TrainConfig(quantize_base=kind, zero_stage=zero_stage, max_steps=6, lr=3e-3, micro_batch_size=4,
                     eval_every=3, checkpoint_every=6, num_workers=2, max_failures=0, lora_new_blocks=lora)
    if lora:
        tc.lr = 1e-2  # LoRA adapters learn slower per step than the blocks' full weights
    name = f"q-{kind}{'-lora' if lora else ''}"
    out = expanded / name
    res = run_training(tc, str(expanded / "exp"), str(out), ray.data.from_items(_rows(128, 0)), eval_sets,
                       seq_len=SEQ, name=name)
    assert res.error is None
    start = _events(out, "stage_start")[0]
    # the workers held the originals quantized: every original Linear, no new block's
    q = start["quantized_base"]
    assert q["kind"] == kind and q["new_layer_indices"] == [2, 5] and q["quantized_linears"] == 4 * 7
    assert 0 < start["trainable_params"] < start["total_params"] / 2
    # the originals never changed; every new block did (LoRA: merged); the output is full precision
    before, after = _tensors(expanded / "exp"), _tensors(out / "model")
    assert before.keys() == after.keys()
    assert all(v.dtype == torch.float32 for v in after.values())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k.split(".")[2] for k in changed} == {"2", "5"}
    assert all(k.startswith(("model.layers.2.", "model.layers.5.")) for k in changed)
    ev_loss = [e["eval_loss"]["domain"] for e in _events(out, "eval")]
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
        logits = m(input_ids=torch.as_tensor([ev[0]["input_ids"]])).logits
    assert torch.isfinite(logits).all()


def _kill_after_checkpoint(out: Path, name: str, rank: int):
    """A thread that SIGKILLs worker ``rank`` of run ``name`` once Ray Train has registered a mid-run
    checkpoint (as tests/integration/test_train.py does); the dict it fills says after which step."""
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                snap = json.loads((out / "ray" / name / "checkpoint_manager_snapshot.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                snap = {}
            reg = [r["metrics"]["step"] for r in snap.get("checkpoint_results", [])]
            if reg and (out / f"worker-{rank}.pid").exists():
                os.kill(int((out / f"worker-{rank}.pid").read_text()), signal.SIGKILL)
                killed["after_checkpoint"] = max(reg)
                return
            time.sleep(0.05)

    return threading.Thread(target=killer, daemon=True), killed


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_resumes_after_a_worker_is_killed(ray_start_4_cpus, expanded, kind):
    """A mid-stage DeepSpeed checkpoint of a quantized-base run (frozen quantized weights excluded)
    restores into a freshly quantized model: the run goes on and ends with the originals intact."""
    ray = ray_start_4_cpus
    name = f"qk-{kind}"
    out = expanded / name
    out.mkdir()
    t, killed = _kill_after_checkpoint(out, name, rank=1)
    t.start()
    tc = TrainConfig(quantize_base=kind, zero_stage=2, max_steps=6, lr=3e-3, micro_batch_size=4,
                     eval_every=100, checkpoint_every=2, num_workers=2, max_failures=1)
    res = run_training(tc, str(expanded / "exp"), str(out), ray.data.from_items(_rows(128, 0)), None,
                       seq_len=SEQ, name=name)
    t.join(timeout=5)
    assert killed, "the worker was never killed"
    assert res.error is None and res.metrics["final"]
    resumes = _events(out, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] >= killed["after_checkpoint"]
    assert [e["quantized_base"]["kind"] for e in _events(out, "stage_start")] == [kind, kind]
    ran = [e["step"] for e in _events(out, "step")]
    assert max(ran) == 6 and ran.count(1) == 1  # never restarted from scratch
    before, after = _tensors(expanded / "exp"), _tensors(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.layers.5.")) for k in changed)
