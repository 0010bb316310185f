#!/usr/bin/env python
"""Benchmark: the Ray Data tokenize+pack pipeline against HF `datasets` batched `map`.

What it measures
    One corpus, the demo corpora's parquet shards (debian-manuals + python-docs, ~4.7 MB of
    text, built with `llamapro data corpora` when missing), copied 1x and 10x. For each size
    each pipeline runs in a fresh child process, packing into blocks of --seq-len tokens with
    the demo model's tokenizer (SmolLM2-135M-Instruct, a fast tokenizer):

    ray      ``llamapro.data.build_train_dataset`` (one source, no held-out split: the same work
             as the baseline) consumed to the end with ``iter_batches`` on the driver: reading,
             parsing, tokenizing in the actor pool (``data.actors`` actors), packing and
             streaming the blocks. ``ray.init(num_cpus=<cores>)`` happens before the clock.
    hf       ``datasets.load_dataset("parquet")``, then ``map(tokenize, batched=True)``
             (``tokenizer(texts)`` + EOS per document) and ``map(group_texts, batched=True)``
             (concatenate, cut into blocks; run_clm.py's recipe), with ``num_proc`` 1 and 2.
             Its ``load_dataset`` (conversion to its Arrow cache) is timed apart and *not*
             counted in its throughput, so the ratio is conservative.

    Throughput is packed tokens per second of wall time after the tokenizer is loaded in the
    child (both load it the same way). Peak memory is the peak summed RSS of the child and all
    its descendants (the local Ray cluster's processes included), sampled every 50 ms; it
    double-counts shared pages (the plasma store), the same way at every size.

Fairness on a shared machine
    The pipelines run interleaved (ray, hf, hf, ray, hf, hf, ...) --repeats times and each
    reports its best run, so a burst of load from other processes hurts neither side more.
    Ray starts its workers at nice 15 (``RAY_worker_niceness``); the benchmark sets it to 0 so
    that, when other processes compete for the cores, the Ray workers compete on the same terms
    as the HF child. On an idle machine neither makes a difference.

Targets (from the issue)
    ray tokens/s >= 1.0 x hf (the best of its num_proc settings) on the same corpus in the
    same run; ray's peak memory flat as the corpus grows 10x.

Run
    . .venv/bin/activate
    python benchmarks/bench_data.py                      # ~5-10 minutes on 2 cores
    python benchmarks/bench_data.py --sizes 1,10 --seq-len 1024 --actors 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- children -------------------------------------------------------------------------------------

def child_ray(corpus: str, seq_len: int, actors: int) -> dict:
    import ray

    from llamapro import data as D
    from llamapro.config import DataConfig, SourceConfig
    from llamapro.demo import ensure_demo_model
    from llamapro.runtime import ensure_ray

    ensure_ray("bench_data", address="local", num_cpus=os.cpu_count(), include_dashboard=False,
               log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tok = D.load_tokenizer(str(ensure_demo_model()))
    cfg = DataConfig(seq_len=seq_len, actors=actors, sources=[
        SourceConfig(name="corpus", paths=[corpus], eval_fraction=0.0)])
    t0 = time.perf_counter()
    ds = D.build_train_dataset(cfg, tok)
    blocks = 0
    for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        blocks += len(b["input_ids"])
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {"tokens": blocks * seq_len, "seconds": wall}


def child_hf(corpus: str, seq_len: int, num_proc: int) -> dict:
    import glob

    import datasets

    from llamapro.demo import ensure_demo_model
    from llamapro.loading import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(ensure_demo_model())
    eos = tok.eos_token_id
    t0 = time.perf_counter()
    ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob(f"{corpus}/*.parquet")),
                               split="train")
    load = time.perf_counter() - t0

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tok(batch["text"])["input_ids"]]}

    def group_texts(batch):  # run_clm.py: concatenate, drop the remainder of each batch
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, n, seq_len)]}

    t1 = time.perf_counter()
    kw = {"num_proc": num_proc} if num_proc > 1 else {}
    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, **kw)
    ds = ds.map(group_texts, batched=True, **kw)
    wall = time.perf_counter() - t1
    return {"tokens": len(ds) * seq_len, "seconds": wall, "load_seconds": load}


# --- parent ---------------------------------------------------------------------------------------

def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(args: list[str], env: dict) -> dict:
    """Run this script as a child; return its JSON result plus the peak RSS of its tree."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = peak / 2**20
    return res


def make_corpus(work: Path, factor: int) -> Path:
    """The demo corpora's shards, copied ``factor`` times (hard links would share page cache
    between copies only; real copies are read like a corpus 10x as large)."""
    from llamapro.data.corpora import build_corpora, default_out

    build_corpora(say=lambda m: print(f"  {m}", flush=True))
    shards = sorted(default_out().glob("*/part-*.parquet"))
    out = work / f"corpus-{factor}x"
    out.mkdir(parents=True, exist_ok=True)
    for k in range(factor):
        for s in shards:
            shutil.copyfile(s, out / f"{s.parent.name}-{k:02d}-{s.name}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10", help="corpus copies to run, e.g. 1,10")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--actors", type=int, default=2, help="tokenizer actors of the Ray pipeline")
    ap.add_argument("--hf-num-proc", default="1,2", help="num_proc settings of the HF baseline")
    ap.add_argument("--repeats", type=int, default=2, help="runs per pipeline (best is kept)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        kind, corpus, seq_len, n = a.child[0], a.child[1], int(a.child[2]), int(a.child[3])
        res = child_ray(corpus, seq_len, n) if kind == "ray" else child_hf(corpus, seq_len, n)
        print(json.dumps(res))
        return

    work = Path(a.workdir or tempfile.mkdtemp(prefix="llamapro-bench-data-"))
    sizes = [int(x) for x in a.sizes.split(",")]
    procs = [int(x) for x in a.hf_num_proc.split(",")]
    rows = []
    try:
        for f in sizes:
            corpus = make_corpus(work, f)
            mb = sum(p.stat().st_size for p in corpus.glob("*.parquet")) / 1e6
            env = {**os.environ, "HF_DATASETS_CACHE": str(work / f"hf-cache-{f}"),
                   "TOKENIZERS_PARALLELISM": "true", "RAY_worker_niceness": "0"}
            runs = [("ray", a.actors)] + [("hf", n) for n in procs]
            best: dict[str, dict] = {}
            for rep in range(a.repeats):
                for kind, n in runs:
                    label = (f"ray ({n} actors)" if kind == "ray"
                             else f"hf datasets (num_proc={n})")
                    print(f"[{f}x, {mb:.1f} MB parquet, run {rep + 1}] {label} ...", flush=True)
                    res = run_child(["--child", kind, str(corpus), str(a.seq_len), str(n)], env)
                    res.update(size=f, corpus_mb=mb, pipeline=label, kind=kind,
                               tokens_per_s=res["tokens"] / res["seconds"])
                    print(f"    {res['tokens']:,} tokens in {res['seconds']:.1f} s = "
                          f"{res['tokens_per_s']:,.0f} tokens/s, peak RSS "
                          f"{res['peak_rss_mb']:,.0f} MB"
                          + (f" (+ load_dataset {res['load_seconds']:.1f} s)"
                             if "load_seconds" in res else ""), flush=True)
                    shutil.rmtree(work / f"hf-cache-{f}", ignore_errors=True)
                    old = best.get(label)
                    if old is None or res["tokens_per_s"] > old["tokens_per_s"]:
                        res["peak_rss_mb"] = max(res["peak_rss_mb"], old["peak_rss_mb"] if old
                                                 else 0)
                        best[label] = res
                    else:
                        old["peak_rss_mb"] = max(old["peak_rss_mb"], res["peak_rss_mb"])
            rows += best.values()
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nseq_len {a.seq_len}, {os.cpu_count()} cores; tokens/s = packed tokens / wall s, best "
          f"of {a.repeats} interleaved runs; peak RSS = the highest of those runs")
    print(f"{'size':>5} {'pipeline':<26} {'tokens':>12} {'s':>7} {'tokens/s':>11} "
          f"{'vs best hf':>10} {'peak RSS MB':>12}")
    for f in sizes:
        these = [r for r in rows if r["size"] == f]
        best_hf = max(r["tokens_per_s"] for r in these if r["kind"] == "hf")
        for r in these:
            print(f"{str(f) + 'x':>5} {r['pipeline']:<26} {r['tokens']:>12,} {r['seconds']:>7.1f} "
                  f"{r['tokens_per_s']:>11,.0f} {r['tokens_per_s'] / best_hf:>9.2f}x "
                  f"{r['peak_rss_mb']:>12,.0f}")
    ray_rows = {r["size"]: r for r in rows if r["kind"] == "ray"}
    if len(sizes) > 1:
        lo, hi = ray_rows[min(sizes)], ray_rows[max(sizes)]
        print(f"\nray peak RSS {lo['peak_rss_mb']:,.0f} MB at {min(sizes)}x -> "
              f"{hi['peak_rss_mb']:,.0f} MB at {max(sizes)}x "
              f"({hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x for {max(sizes) // min(sizes)}x "
              "the corpus)")
    big = max(sizes)
    best = max(r["tokens_per_s"] for r in rows if r["size"] == big and r["kind"] == "hf")
    ratio = ray_rows[big]["tokens_per_s"] / best
    print(f"throughput at {big}x: ray / best hf = {ratio:.2f}x (target >= 1.0x): "
          f"{'MET' if ratio >= 1.0 else 'NOT MET'}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
