"""Training speed and memory: the product's real training path, lever by lever, beside full FT.

    python benchmarks/bench_train.py                      # every lever, ~20 min on 2 cores
    python benchmarks/bench_train.py --only default,full  # just the headline pair
    python benchmarks/bench_train.py --steps 10 --json out.json

Every row is one ``llamapro.train.run_training`` call (a Ray Train worker, a DeepSpeed ZeRO engine,
packed blocks from the Ray Data pipeline over the demo corpora) on SmolLM2-135M-Instruct expanded
30 -> 36 layers (6 new blocks), batch 4 x 256 tokens, the settings of the peer figures in
DESIGN.md. Rows (levers added one at a time, then variants):

  naive      new blocks only; plain HF loss on full logits, no checkpointing, glibc's default heap
  +chunked   + chunked loss with its gradient made in the same pass (no full-vocabulary logits)
  +malloc    + large allocations from mmap (freed activations go back to the OS)
  default    + checkpointing of the frozen layers above the lowest new block (the shipped default)
  ckpt-all   checkpointing of every layer from the lowest new block up, instead
  heap       the default with glibc's default heap (lean_malloc off): faster, fragmented
  heap-all   heap + checkpointing of every layer from the lowest new block up
  heap-off   heap + no checkpointing (the fastest; the most memory)
  zero0/1    the default at ZeRO stage 0 / 1 (the default row is ZeRO-2)
  bf16       the default in bf16 (DeepSpeed bf16: bf16 weights and activations, fp32 master
             weights of the trainable blocks)
  2x1        the default on 2 workers x 1 thread instead of 1 worker x 2 threads
  full       full fine-tuning of the same 36-layer model (every parameter), shipped defaults

Printed per row: median step time (steps 3..N), tokens/s, the training worker's peak RSS (its
``ru_maxrss``, summed over workers: the process that holds the model, what the peer figures
measure), the peak PSS of the whole process tree under this driver (Ray's own processes, the data
pipeline's workers and the training worker(s); sampled every 2 s: reading smaps takes the
kernel's mmap lock of every process, and at 0.2 s it slowed training by itself), the loss curve's largest
deviation from the naive row (same data: the dataset is materialized once), and ratios.
Targets (issue "Training efficiency"): >= 245 tokens/s and worker peak RSS <= 2.2 GB at once in
fp32, step time <= 0.55x full fine-tuning; issue "Train": step <= 0.65x, peak memory <= 0.40x full.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASE = dict(micro_batch_size=4, lr=2e-5, eval_every=10**6, checkpoint_every=10**6, max_failures=0,
            warmup_ratio=0.0)
ROWS = {
    "naive": dict(chunked_loss=False, lean_malloc=False, gradient_checkpointing="off"),
    "+chunked": dict(chunked_loss=True, lean_malloc=False, gradient_checkpointing="off"),
    "+malloc": dict(chunked_loss=True, lean_malloc=True, gradient_checkpointing="off"),
    "default": dict(),
    "heap": dict(lean_malloc=False),
    "heap-all": dict(lean_malloc=False, gradient_checkpointing="all"),
    "heap-off": dict(lean_malloc=False, gradient_checkpointing="off"),
    "ckpt-all": dict(gradient_checkpointing="all"),
    "zero0": dict(zero_stage=0),
    "zero1": dict(zero_stage=1),
    "bf16": dict(dtype="bfloat16"),
    "2x1": dict(num_workers=2, cpus_per_worker=1),
    "full": dict(mode="full"),
}
PEERS = "LLaMA-Factory freeze+llama_pro 189 tok/s at 3.2 GB; ms-swift llamapro 152 tok/s at 2.2 GB"


def _tree_pss(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants (shared pages split fairly)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _tree_pss(os.getpid()))
            self.stop.wait(2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", default=",".join(ROWS), help="comma-separated rows to run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    only = [r.strip() for r in a.only.split(",") if r.strip()]
    unknown = [r for r in only if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")

    import ray

    from llamapro import steps
    from llamapro.config import DataConfig, SourceConfig
    from llamapro.data import build_train_dataset
    from llamapro.demo import ensure_demo_model
    from llamapro.train import run_training
    from llamapro.train_config import TrainConfig

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    base = ensure_demo_model()
    exp = work / "expanded"
    if not (exp / "llamapro.json").is_file():
        steps.expand(str(base), str(exp), blocks=6, strategy="even", verify=False, progress=False, force=True)
    data = DataConfig(seq_len=256, actors=1, sources=[
        SourceConfig(name="debian-manuals", paths=["demo:debian-manuals"], weight=0.7),
        SourceConfig(name="python-docs", paths=["demo:python-docs"], weight=0.3)])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})
    # the same blocks in the same order for every row: loss curves are comparable
    ds = build_train_dataset(data, str(exp)).limit(4 * 2 * (a.steps + 2)).materialize()
    idle = _tree_pss(os.getpid())

    rows = {}
    for row in only:
        kw = {**BASE, **ROWS[row]}
        kw.setdefault("num_workers", 1)
        kw.setdefault("cpus_per_worker", 2)
        tc = TrainConfig(max_steps=a.steps, **kw)
        out = work / f"run-{row}-{time.time_ns()}"
        sampler = _Sampler()
        sampler.start()
        t0 = time.perf_counter()
        run_training(tc, str(exp), str(out), ds, {}, seq_len=256, name=f"bench-{row}-{time.time_ns()}")
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        ev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        st = [e for e in ev if e["event"] == "step"]
        start = [e for e in ev if e["event"] == "stage_start"][0]
        step_s = statistics.median(e["step_s"] for e in st[2:]) if len(st) > 2 else st[-1]["step_s"]
        # rank 0 logs its own peak; with several workers each holds a model copy of the same size
        workers = tc.num_workers
        rows[row] = {"step_s": step_s, "tokens_per_s": 4 * 256 * workers / step_s,
                     "worker_peak_gb": max(e["peak_rss_bytes"] for e in st) * workers / 1e9,
                     "tree_peak_gb": sampler.peak / 1e9, "losses": [e["loss"] for e in st],
                     "trainable_m": start["trainable_params"] / 1e6, "wall_s": wall,
                     "checkpointed_layers": len(start.get("checkpointed_layers", [])),
                     "chunked_loss": start.get("chunked_loss")}
        r = rows[row]
        print(f"[bench] {row}: {r['step_s']:.2f} s/step {r['tokens_per_s']:.0f} tok/s "
              f"worker {r['worker_peak_gb']:.2f} GB tree {r['tree_peak_gb']:.2f} GB", flush=True)
    ray.shutdown()

    ref = rows.get("naive", {}).get("losses")
    print(f"\nSmolLM2-135M expanded 30->36, batch 4x256, median of steps 3..{a.steps}; "
          f"Ray idle tree {idle / 1e9:.2f} GB")
    print(f"{'row':<10}{'trainable':>10}{'s/step':>8}{'tok/s':>7}{'worker':>9}{'tree':>8}"
          f"{'ckpt':>6}{'loss dev':>10}")
    for name, r in rows.items():
        dev = (max(abs(x - y) for x, y in zip(r["losses"], ref)) if ref and name not in ("full", "2x1")
               else float("nan"))
        r["loss_dev_vs_naive"] = dev
        print(f"{name:<10}{r['trainable_m']:>9.1f}M{r['step_s']:>8.2f}{r['tokens_per_s']:>7.0f}"
              f"{r['worker_peak_gb']:>7.2f}GB{r['tree_peak_gb']:>6.2f}GB{r['checkpointed_layers']:>6}"
              f"{dev:>10.2e}")
    print(f"peers (DESIGN.md, same settings): {PEERS}")
    verdicts = {}
    if "default" in rows:
        d = rows["default"]
        verdicts["tokens/s >= 245 (fp32)"] = d["tokens_per_s"] >= 245
        verdicts["worker peak <= 2.2 GB (fp32)"] = d["worker_peak_gb"] <= 2.2
        if "full" in rows:
            f = rows["full"]
            rs, rm = d["step_s"] / f["step_s"], d["worker_peak_gb"] / f["worker_peak_gb"]
            print(f"default / full: step time {rs:.2f}x, worker peak {rm:.2f}x")
            verdicts["step <= 0.55x full"] = rs <= 0.55
            verdicts["peak memory <= 0.40x full"] = rm <= 0.40
    for k, ok in verdicts.items():
        print(f"  {k:<32} {'PASS' if ok else 'MISS'}")
    result = {"rows": rows, "verdicts": verdicts, "idle_tree_gb": idle / 1e9}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk != "losses"} for k, r in rows.items()}))


if __name__ == "__main__":
    main()
