"""The training step of bench_train's default row, outside Ray: one process, the same model
(SmolLM2 30 -> 36), the same worker recipe (bf16 frozen originals and fp32 new blocks under
autocast where the CPU has native bf16, chunked loss, lean_malloc, ``train.compile`` auto's choice)
and the same DeepSpeed engine (ZeRO stage 0, as one worker runs it), on the same batch shape.
What it does not have: Ray Train's worker actor, its controller and Ray Data's iterator (the
blocks here are random token ids: the step's cost does not depend on them).

    python benchmarks/train_outside_ray.py --model EXPANDED_DIR [--steps 16] [--threads 2] [--json OUT]

bench_train.py runs it as its ``no-ray`` row, in the same invocation as the product's rows, so the
difference between the two is what the Ray Train path costs per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an expanded model directory (llamapro.json)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch

    from llamapro.artifacts import read_metadata
    from llamapro.config.train import TrainConfig
    from llamapro.training.compile import compile_choice, compile_layers
    from llamapro.training.loss import causal_lm_ce_sum
    from llamapro.training.memory import lean_malloc, peak_rss
    from llamapro.training.model import load_model
    from llamapro.training.optim import build_ds_config
    from llamapro.training.params import fp32_trainable, select_parameters
    from llamapro.training.precision import resolve_dtype

    tc = TrainConfig(max_steps=a.steps, micro_batch_size=a.batch, num_workers=1, cpus_per_worker=a.threads)
    lean_malloc()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype, info = resolve_dtype(tc.dtype, torch.device("cpu"))
    bf16 = dtype == torch.bfloat16
    new = list(read_metadata(a.model).new_layer_indices)
    model = load_model(a.model, torch.bfloat16 if bf16 else torch.float32, new_layers=new)
    stage = SimpleNamespace(layers=new, lr_scale={}, train_originals=False)
    groups = select_parameters(model, tc, new, stage)
    if bf16:
        fp32_trainable(model, a.model, {})
    on, why = compile_choice(tc.compile, bf16_autocast=bf16, zero3=False, lora=False, quantized=False,
                             distill=False, checkpointing="off" if bf16 else "frozen",
                             n_params=sum(p.numel() for p in model.parameters()), total_steps=a.steps)
    if not bf16:
        from llamapro.training.params import apply_checkpointing

        apply_checkpointing(model, "frozen")
    if on:
        compile_layers(model)
    model.train()

    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29591"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(tc, False),
                                           dist_init_required=False)
    vocab = model.config.vocab_size
    steps = []
    for _ in range(a.steps):
        x = torch.randint(0, vocab, (a.batch, a.seq))
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            s, n = causal_lm_ce_sum(engine.module, x, x, chunked=True)
        engine.backward(s / n)
        engine.step()
        steps.append((time.perf_counter() - t0, time.process_time() - c0))
    med = statistics.median(w for w, _ in steps[2:]) if len(steps) > 2 else steps[-1][0]
    out = {"step_s": med, "tokens_per_s": a.batch * a.seq / med, "dtype": info["compute"],
           "cpu_s": statistics.median(c for _, c in steps[2:] or steps), "first_step_s": steps[0][0],
           "worker_peak_gb": peak_rss() / 1e9, "compiled": on, "compile_reason": why}
    print(json.dumps(out), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
