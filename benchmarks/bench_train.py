"""Training speed and memory: the product's real training path, lever by lever, beside full FT and
beside the peers (LLaMA-Factory, ms-swift) run in the same invocation.

    python benchmarks/bench_train.py --only default,eager,fp32,full --peers lf_freeze,swift_llamapro
    python benchmarks/bench_train.py --only default,full --peers ""   # just the headline pair
    python benchmarks/bench_train.py --steps 10 --json out.json

Peers come from ``$PEERS_SCRIPT`` (default ../shared/peers/peer_train_bench.sh beside the checkout):
the same model (SmolLM2 30 -> 36, LLaMA-Factory's expansion), batch 4 x 256, 2 threads, fp32 (their
CPU default), the same number of steps, median of steps 3..N, peak RSS of the process tree (GNU time).

Every row is one ``llamapro.training.run_training`` call (a Ray Train worker, a DeepSpeed ZeRO engine,
packed blocks from the Ray Data pipeline over the demo corpora) on SmolLM2-135M-Instruct expanded
30 -> 36 layers (6 new blocks), batch 4 x 256 tokens, the settings the peers run with
(LLaMA-Factory and ms-swift, timed side by side in the same invocation).
Rows (levers added one at a time, then variants):

  naive      new blocks only; plain HF loss on full logits, no checkpointing, glibc's default heap
  +chunked   + chunked loss with its gradient made in the same pass (no full-vocabulary logits)
  +malloc    + large allocations from mmap (freed activations go back to the OS)
  default    the shipped defaults: dtype auto (bf16 where the CPU has it natively), checkpointing
             auto (none in bf16; in fp32 the frozen layers above the lowest new block), lean_malloc,
             compile auto (in bf16 with >= 16 steps: the decoder layers compiled in place)
  eager      the default without compilation (train.compile: off)
  ckpt-all   checkpointing of every layer from the lowest new block up, instead
  heap       the default with glibc's default heap (lean_malloc off): faster, fragmented
  heap-all   heap + checkpointing of every layer from the lowest new block up
  heap-off   heap + no checkpointing (the fastest; the most memory)
  zero0/1    the default at ZeRO stage 0 / 1 (the default row is ZeRO-2)
  fp32       the default forced to fp32 (dtype auto picks bf16 where the CPU has it natively)
  bf16       the default forced to bf16
  fast       dtype auto, no checkpointing, glibc's default heap (the speed end)
  ds-bf16    bf16 through DeepSpeed's own bf16 mode (everything bf16, flat fp32 master copy;
             what ZeRO-3 uses) instead of autocast over fp32 trainable blocks
  2x1        the default on 2 workers x 1 thread instead of 1 worker x 2 threads
  full       full fine-tuning of the same 36-layer model (every parameter), shipped defaults
  no-ray     the default row's step (same recipe, same DeepSpeed engine at ZeRO-0) in one process
             outside Ray (benchmarks/train_outside_ray.py): default - no-ray = the Ray Train path's cost

Printed per row: median step time (steps 3..N), tokens/s, the training worker's peak RSS (its
``ru_maxrss``, summed over workers: the process that holds the model, what the peer figures
measure), the peak PSS of the whole process tree under this driver (Ray's own processes, the data
pipeline's workers and the training worker(s); sampled every 2 s: reading smaps takes the
kernel's mmap lock of every process, and at 0.2 s it slowed training by itself), the loss curve's largest
deviation from the naive row (same data: the dataset is materialized once), and ratios.
Targets (issue "Training speed"): the default >= 1.3x LLaMA-Factory's tokens/s with worker peak RSS
<= ms-swift's, in one configuration; step time <= 0.55x full fine-tuning. Timings on a shared
machine are noisy: compare ratios within one invocation, and read the load average printed with them.
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

BASE = dict(allow_unproven=True,  # the expansion is made with verify=False: a speed bench, not a product run
            micro_batch_size=4, lr=2e-5, eval_every=10**6, checkpoint_every=10**6, max_failures=0,
            warmup_ratio=0.0)
ROWS = {
    "naive": dict(chunked_loss=False, lean_malloc=False, gradient_checkpointing="off"),
    "+chunked": dict(chunked_loss=True, lean_malloc=False, gradient_checkpointing="off"),
    "+malloc": dict(chunked_loss=True, lean_malloc=True, gradient_checkpointing="off"),
    "default": dict(),
    "eager": dict(compile="off"),
    "heap": dict(lean_malloc=False),
    "heap-all": dict(lean_malloc=False, gradient_checkpointing="all"),
    "heap-off": dict(lean_malloc=False, gradient_checkpointing="off"),
    "ckpt-all": dict(gradient_checkpointing="all"),
    "zero0": dict(zero_stage=0),
    "zero1": dict(zero_stage=1),
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "fast": dict(lean_malloc=False, gradient_checkpointing="off"),
    "fast-lean": dict(gradient_checkpointing="off"),
    "ds-bf16": dict(dtype="bfloat16", zero_stage=3),
    "2x1": dict(num_workers=2, cpus_per_worker=1),
    "full": dict(mode="full"),
    "no-ray": {},  # the default's step outside Ray (benchmarks/train_outside_ray.py)
}
PEER_RUNS = {"lf_freeze": "LLaMA-Factory", "swift_llamapro": "ms-swift", "lf_full": "LLaMA-Factory full"}


def cpu_summary() -> dict:
    """CPU model, the flags that matter for training speed, and what the bf16 probe says."""
    import torch

    from llamapro.training.precision import cpu_flags, native_bf16

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown")
    flags = sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                    "amx_bf16", "amx_tile", "avx512_fp16"})
    native, why = native_bf16(torch.device("cpu"))
    return {"model": model, "cores": len(os.sched_getaffinity(0)), "flags": flags,
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "bf16_native": native,
            "bf16_probe": why, "load_avg": os.getloadavg()}


def run_peers(names: list[str], steps: int) -> dict:
    """Run the peers' own training through their bench script; parse its summary lines."""
    import re
    import subprocess

    script = os.environ.get("PEERS_SCRIPT") or str(
        Path(__file__).resolve().parents[2] / "shared" / "peers" / "peer_train_bench.sh")
    if not Path(script).is_file():
        print(f"[bench] no peer script at {script} (set PEERS_SCRIPT); peers skipped", flush=True)
        return {}
    out = {}
    for name in names:
        t0 = time.perf_counter()
        r = subprocess.run(["bash", script, name], capture_output=True, text=True,
                           env={**os.environ, "STEPS": str(steps)})
        line = next((ln for ln in r.stdout.splitlines() if "s/step=" in ln or "FAILED" in ln), "")
        m = re.search(r"s/step=\s*([\d.]+).*tokens/s=\s*([\d.]+).*peakRSS=([\d.]+) GiB", line)
        if not m:
            print(f"[bench] peer {name} gave no result: {line or r.stderr[-500:]}", flush=True)
            continue
        tr = re.search(r"trainable=\s*([\d,]+)", line)
        out[name] = {"step_s": float(m.group(1)), "tokens_per_s": float(m.group(2)),
                     "worker_peak_gb": float(m.group(3)) * 2**30 / 1e9, "tree_peak_gb": float("nan"),
                     "trainable_m": int(tr.group(1).replace(",", "")) / 1e6 if tr else float("nan"),
                     "wall_s": time.perf_counter() - t0, "peer": True, "line": line.strip()}
        print(f"[bench] {name}: {line.strip()}", flush=True)
    return out


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


def _outside_ray(exp: Path, steps: int, work: Path) -> dict:
    """The ``no-ray`` row: the default's step in a plain process (peak RSS is that process's)."""
    import subprocess

    out = work / f"no-ray-{time.time_ns()}.json"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("train_outside_ray.py")), "--model", str(exp),
                        "--steps", str(steps), "--json", str(out)], capture_output=True, text=True)
    if r.returncode != 0 or not out.is_file():
        print(f"[bench] no-ray: FAILED ({r.stderr[-500:]})", flush=True)
        return {}
    res = json.loads(out.read_text())
    res.update(tree_peak_gb=float("nan"), trainable_m=21.240576, wall_s=time.perf_counter() - t0,
               checkpointed_layers=0, data_s=0.0)
    print(f"[bench] no-ray: {res['step_s']:.2f} s/step {res['tokens_per_s']:.0f} tok/s "
          f"worker {res['worker_peak_gb']:.2f} GB compiled {res['compiled']} "
          f"(first step {res['first_step_s']:.1f} s)", flush=True)
    return res


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
    ap.add_argument("--steps", type=int, default=16,
                    help="optimizer steps per row (>= 16: train.compile auto compiles from 16 steps)")
    ap.add_argument("--only", default=",".join(ROWS), help="comma-separated rows to run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--peers", default="lf_freeze,swift_llamapro",
                    help=f"peer runs beside ours (of {', '.join(PEER_RUNS)}); empty: none")
    a = ap.parse_args()
    only = [r.strip() for r in a.only.split(",") if r.strip()]
    unknown = [r for r in only if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")

    import ray

    from llamapro.config import DataConfig, SourceConfig
    from llamapro.config.train import TrainConfig
    from llamapro.data import build_train_dataset
    from llamapro.demo import ensure_demo_model
    from llamapro.expansion import api as steps
    from llamapro.runtime import ensure_ray
    from llamapro.training import run_training

    cpu = cpu_summary()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, torch {cpu['torch_capability']}, flags "
          f"{' '.join(cpu['flags'])}; bf16 native: {cpu['bf16_native']} ({cpu['bf16_probe']}); "
          f"load average {cpu['load_avg'][0]:.1f} {cpu['load_avg'][1]:.1f} {cpu['load_avg'][2]:.1f}",
          flush=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    # the peers first (each in its own venv and processes), then ours, in this one invocation
    peers = run_peers([p.strip() for p in a.peers.split(",") if p.strip()], a.steps)
    base = ensure_demo_model()
    exp = work / "expanded"
    if not (exp / "llamapro.json").is_file():
        steps.expand(str(base), str(exp), blocks=6, strategy="even", verify=False, progress=False, force=True)
    data = DataConfig(seq_len=256, actors=1, sources=[
        SourceConfig(name="debian-manuals", paths=["demo:debian-manuals"], weight=0.7),
        SourceConfig(name="python-docs", paths=["demo:python-docs"], weight=0.3)])
    ensure_ray("bench_train", num_cpus=4, include_dashboard=False, log_to_driver=False,
               _system_config={"worker_niceness": 0})
    # the same blocks in the same order for every row: loss curves are comparable
    ds = build_train_dataset(data, str(exp)).limit(4 * 2 * (a.steps + 2)).materialize()
    idle = _tree_pss(os.getpid())

    rows = {}
    for row in only:
        if row == "no-ray":
            res = _outside_ray(exp, a.steps, work)
            if res:
                rows[row] = res
            continue
        kw = {**BASE, **ROWS[row]}
        kw.setdefault("num_workers", 1)
        kw.setdefault("cpus_per_worker", 2)
        tc = TrainConfig(max_steps=a.steps, **kw)
        out = work / f"run-{row}-{time.time_ns()}"
        sampler = _Sampler()
        sampler.start()
        t0 = time.perf_counter()
        res = run_training(tc, str(exp), str(out), ds, {}, seq_len=256, name=f"bench-{row}-{time.time_ns()}")
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        if res.error is not None or not (out / "metrics.jsonl").is_file():
            print(f"[bench] {row}: FAILED ({str(res.error).splitlines()[0][:200] if res.error else 'no metrics'})",
                  flush=True)
            continue
        ev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        st = [e for e in ev if e["event"] == "step"]
        start = [e for e in ev if e["event"] == "stage_start"][0]
        step_s = statistics.median(e["step_s"] for e in st[2:]) if len(st) > 2 else st[-1]["step_s"]
        # rank 0 logs its own peak; with several workers each holds a model copy of the same size
        workers = tc.num_workers
        rows[row] = {"step_s": step_s, "tokens_per_s": 4 * 256 * workers / step_s,
                     "dtype": start.get("dtype", {}).get("compute"),
                     "cpu_s": statistics.median(e.get("cpu_s", float("nan")) for e in st[2:] or st),
                     "data_s": statistics.median(e.get("data_s", float("nan")) for e in st[2:] or st),
                     "worker_peak_gb": max(e["peak_rss_bytes"] for e in st) * workers / 1e9,
                     "tree_peak_gb": sampler.peak / 1e9, "losses": [e["loss"] for e in st],
                     "trainable_m": start["trainable_params"] / 1e6, "wall_s": wall,
                     "checkpointed_layers": len(start.get("checkpointed_layers", [])),
                     "compiled": (start.get("compile") or {}).get("on"), "first_step_s": st[0]["step_s"],
                     "chunked_loss": start.get("chunked_loss")}
        r = rows[row]
        print(f"[bench] {row}: {r['step_s']:.2f} s/step {r['tokens_per_s']:.0f} tok/s "
              f"worker {r['worker_peak_gb']:.2f} GB tree {r['tree_peak_gb']:.2f} GB "
              f"compiled {r['compiled']} (first step {r['first_step_s']:.1f} s)", flush=True)
    ray.shutdown()

    ref = rows.get("naive", {}).get("losses")
    print(f"\nSmolLM2-135M expanded 30->36, batch 4x256, median of steps 3..{a.steps}; "
          f"Ray idle tree {idle / 1e9:.2f} GB")
    lf, sw = peers.get("lf_freeze"), peers.get("swift_llamapro")
    print(f"{'row':<15}{'dtype':>9}{'trainable':>10}{'s/step':>8}{'cpu s':>7}{'data s':>7}{'tok/s':>7}"
          f"{'worker':>9}{'tree':>8}{'ckpt':>6}{'loss dev':>10}{'x LF':>6}{'x swift':>8}")
    for name, r in {**rows, **peers}.items():
        dev = (max(abs(x - y) for x, y in zip(r["losses"], ref))
               if ref and "losses" in r and name not in ("full", "2x1") else float("nan"))
        r["loss_dev_vs_naive"] = dev
        r["x_lf"] = r["tokens_per_s"] / lf["tokens_per_s"] if lf else float("nan")
        r["x_swift"] = r["tokens_per_s"] / sw["tokens_per_s"] if sw else float("nan")
        print(f"{name:<15}{r.get('dtype') or 'fp32':>9}{r['trainable_m']:>9.1f}M{r['step_s']:>8.2f}"
              f"{r.get('cpu_s', float('nan')):>7.2f}{r.get('data_s', float('nan')):>7.2f}"
              f"{r['tokens_per_s']:>7.0f}{r['worker_peak_gb']:>7.2f}GB{r['tree_peak_gb']:>6.2f}GB"
              f"{r.get('checkpointed_layers', 0):>6}{dev:>10.2e}{r['x_lf']:>6.2f}{r['x_swift']:>8.2f}")
    print("worker = training worker peak RSS (ours: ru_maxrss; peers: GNU time, the largest process); "
          "x LF / x swift = tokens/s ratio to the peer in this invocation")
    verdicts = {}
    if "default" in rows:
        d = rows["default"]
        for name, r in rows.items():
            if name == "no-ray":  # not a product configuration
                continue
            if lf and sw and r["tokens_per_s"] >= 1.3 * lf["tokens_per_s"] and \
                    r["worker_peak_gb"] <= sw["worker_peak_gb"]:
                verdicts[f"{name}: >= 1.3x LLaMA-Factory tok/s at <= ms-swift's worker peak"] = True
        if lf and sw and not any(verdicts):
            verdicts[">= 1.3x LLaMA-Factory tok/s at <= ms-swift's worker peak (any row)"] = False
        if "full" in rows:
            f = rows["full"]
            rs, rm = d["step_s"] / f["step_s"], d["worker_peak_gb"] / f["worker_peak_gb"]
            print(f"default / full: step time {rs:.2f}x, worker peak {rm:.2f}x")
            verdicts["step <= 0.55x full"] = rs <= 0.55
            verdicts["peak memory <= 0.40x full"] = rm <= 0.40
    for k, ok in verdicts.items():
        print(f"  {k:<32} {'PASS' if ok else 'MISS'}")
    result = {"rows": rows, "peers": peers, "cpu": cpu, "verdicts": verdicts, "idle_tree_gb": idle / 1e9,
              "load_avg_end": os.getloadavg()}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk != "losses"} for k, r in rows.items()}))


if __name__ == "__main__":
    main()
