"""How many floating-point operations one training step of the bench_train setting needs, and
what that means on this CPU: counts with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
attention; elementwise work is not counted, so these are lower bounds) over one real forward +
backward of SmolLM2 expanded 30 -> 36 (new blocks trainable, the rest frozen, chunked loss), for
each checkpointing choice, and compares with the CPU's peak fp32 FMA throughput.

    python benchmarks/flops_train.py [--model DIR] [--batch 4] [--seq 256]

Two ceilings: the nominal peak = cores x FMA units (2) x fp32 lanes (16 with avx512f, else 8 with
avx2) x 2 x clock (MHz from /proc/cpuinfo; boost clocks can beat it), and the measured throughput
of a large fp32 GEMM with all threads (what the step's matmuls can at best reach). Prints, per
checkpointing choice, GFLOP per step and the best possible tokens/s at each ceiling.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_gflops() -> tuple[float, str]:
    info = Path("/proc/cpuinfo").read_text()
    flags = set(next(l for l in info.splitlines() if l.startswith("flags")).split(":")[1].split())
    mhz = float(next(l for l in info.splitlines() if l.startswith("cpu MHz")).split(":")[1])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    cores = len(os.sched_getaffinity(0))
    isa = "avx512f" if lanes == 16 else "avx2+fma" if lanes == 8 else "sse"
    return cores * 2 * lanes * 2 * mhz / 1e3, f"{cores} cores x {isa} x {mhz:.0f} MHz"


def gemm_gflops(n: int = 2048, reps: int = 10) -> float:
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from llamapro.artifacts import read_metadata
    from llamapro.config.train import TrainConfig
    from llamapro.training.loss import causal_lm_ce_sum
    from llamapro.training.model import load_model
    from llamapro.training.params import (
        apply_checkpointing,
        decoder_layers,
        select_parameters,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="an expanded checkpoint (default: expand the demo)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    model_dir = a.model
    if model_dir is None:
        import tempfile

        from llamapro.demo import ensure_demo_model
        from llamapro.expansion import api as steps

        model_dir = str(Path(tempfile.mkdtemp()) / "expanded")
        steps.expand(str(ensure_demo_model()), model_dir, blocks=6, strategy="even", verify=False,
                     progress=False)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    new = sorted(read_metadata(Path(model_dir)).new_layer_indices)
    peak, what = peak_gflops()
    tokens = a.batch * a.seq
    ids = torch.randint(0, 1000, (a.batch, a.seq))
    print(f"model {model_dir}: new layers {new}; batch {a.batch} x {a.seq} = {tokens} tokens")
    gemm = gemm_gflops()
    print(f"nominal peak fp32: {peak:.0f} GFLOP/s ({what}); measured 2048^3 sgemm: {gemm:.0f} GFLOP/s")
    for how in ("off", "frozen", "all"):
        model = load_model(model_dir, torch.float32)
        select_parameters(model, TrainConfig(), new)  # freezes everything (no stage given) ...
        layers = decoder_layers(model)
        for i in new:  # ... then the new blocks train, as in a one-stage run
            layers[i].requires_grad_(True)
        apply_checkpointing(model, how)
        model.train()
        with FlopCounterMode(display=False) as fc:
            loss, n = causal_lm_ce_sum(model, ids, ids, chunked=True)
            (loss / n).backward()
        g = fc.get_total_flops() / 1e9
        print(f"  checkpointing {how:6s}: {g:7.1f} GFLOP/step -> at most {tokens / (g / peak):4.0f} tokens/s "
              f"at nominal peak, {tokens / (g / gemm):4.0f} at sgemm speed ({g / gemm:4.2f} s/step)")
        del model


if __name__ == "__main__":
    main()
