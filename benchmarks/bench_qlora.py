"""Training the new blocks on a quantized base (train.quantize_base) vs the full-precision base.

    python benchmarks/bench_qlora.py [--steps 8] [--seq 128] [--batch 2]
    python benchmarks/bench_qlora.py --shape 360m --steps 3 --batch 1     # SmolLM2-360M's shapes
    python benchmarks/bench_qlora.py --shape 1.7b --steps 3 --batch 1     # SmolLM2-1.7B's shapes

``--shape demo`` (default) expands the SmolLM2-135M-Instruct demo. ``--shape 360m`` / ``1.7b``
builds a RANDOM-INITIALIZED Llama with SmolLM2-360M's / SmolLM2-1.7B's configuration (layers,
widths, heads, vocabulary; the demo's tokenizer), saved in bf16 like the published checkpoints, so
memory can be measured at sizes where the quantized base matters without downloading them: its
memory figures are those of the real model (they depend on shapes, not values); its losses are
meaningless (untrained weights) and only show that every kind trains. Each model is expanded once
(``--blocks``: 6 by default for demo, 8 for 360m (32 -> 40 layers), 4 for 1.7b (24 -> 28)), then trains
only the new blocks with plain AdamW on the same real-text windows (the Python tutorial,
python3-doc, PSF-2.0) from the same seed, once per base: fp32 (baseline), nf4 and int8
(bitsandbytes), each loaded by the loader `llamapro train` uses (llamapro.training.model.load_model
with train.quantize_base) and with its parameters chosen by the workers' select_parameters. Each
run is its own process so peak RSS is its own. Reports weight memory, resident memory once loaded
and after the steps, peak resident memory (which includes loading: bitsandbytes quantizes from the
full-precision checkpoint), seconds per step and the loss curve side by side (same invocation).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line  # noqa: E402  (benchmarks/ on sys.path first)


# SmolLM2's published configurations (config.json of HuggingFaceTB/SmolLM2-360M and -1.7B): shapes only
SHAPES = {
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_attention_heads": 15,
             "num_key_value_heads": 5, "num_hidden_layers": 32, "rope_theta": 100000.0,
             "max_position_embeddings": 8192},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
             "num_key_value_heads": 32, "num_hidden_layers": 24, "rope_theta": 130000.0,
             "max_position_embeddings": 8192},
}
BLOCKS = {"demo": 6, "360m": 8, "1.7b": 4}


def make_random_base(shape: str, out: str) -> None:
    """A random-initialized Llama of ``shape`` (bf16, the demo's tokenizer and special ids) in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamapro.demo import ensure_demo_model
    from llamapro.tensors import copy_side_files

    demo = ensure_demo_model()
    cfg = AutoConfig.from_pretrained(demo)
    for k, v in SHAPES[shape].items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # transformers' own init
    model.save_pretrained(out)
    copy_side_files(demo, Path(out))
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n}))


def child(kind: str, model_dir: str, steps: int, seq: int, batch: int) -> None:
    import gc

    import torch

    from llamapro.artifacts import read_metadata
    from llamapro.config.train import TrainConfig
    from llamapro.loading import load_tokenizer
    from llamapro.publish.quant import heldout_windows
    from llamapro.training.memory import lean_malloc, rss
    from llamapro.training.model import load_model
    from llamapro.training.params import select_parameters
    from llamapro.training.quantize import weight_bytes
    from llamapro.training.stages import build_stages

    lean_malloc()  # as a `llamapro train` worker does (train.lean_malloc, on by default)
    torch.manual_seed(0)
    new = read_metadata(Path(model_dir)).new_layer_indices
    # the loader and parameter selection `llamapro train` workers use (train.quantize_base)
    tc = TrainConfig(quantize_base="none" if kind == "fp32" else kind)
    model = load_model(model_dir, torch.float32, quantize_base=tc.quantize_base, new_layers=new)
    select_parameters(model, tc, new, build_stages(new, 1)[0])
    gc.collect()
    rss_loaded = rss()
    model.train()
    tok = load_tokenizer(model_dir)
    data = heldout_windows(tok, n=steps * batch, seq=seq, source="python-docs")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    losses, t0 = [], None
    for s in range(steps):
        if s == 1:
            t0 = time.perf_counter()  # the first step pays one-off costs (weight repacking)
        ids = data[s * batch:(s + 1) * batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    dt = (time.perf_counter() - t0) / max(1, steps - 1)
    print(json.dumps({"kind": kind, "weight_bytes": weight_bytes(model),
                      "trainable": sum(p.numel() for p in params),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_loaded": rss_loaded, "rss_end": rss(),
                      "s_per_step": dt, "losses": losses}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--shape", choices=["demo", *SHAPES], default="demo",
                    help="demo: the SmolLM2-135M-Instruct demo; 360m / 1.7b: a random-initialized "
                         "Llama with SmolLM2-360M's / -1.7B's shapes")
    ap.add_argument("--blocks", type=int, default=None, help="new blocks (default per shape)")
    ap.add_argument("--kinds", default="fp32,nf4,int8", help="comma-separated bases, fp32 first")
    ap.add_argument("--workdir", default=None, help="keep the built models here (default: a temp dir, removed)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "MODEL_DIR"))
    ap.add_argument("--make-base", nargs=2, metavar=("SHAPE", "OUT"))
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.steps, a.seq, a.batch)
    if a.make_base:
        return make_random_base(*a.make_base)

    import os

    from llamapro.demo import ensure_demo_model
    from llamapro.expansion import api as steps
    from llamapro.tensors import read_config

    blocks = a.blocks or BLOCKS[a.shape]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-qlora-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.shape == "demo":
        base, what = ensure_demo_model(), "SmolLM2-135M-Instruct"
    else:
        base = work / f"base-{a.shape}"
        if not (base / "config.json").is_file():  # in its own process: its memory goes back
            subprocess.run([sys.executable, __file__, "--make-base", a.shape, str(base)], check=True,
                           cwd=str(ROOT))
        what = f"RANDOM-INITIALIZED Llama with SmolLM2-{a.shape.upper()}'s shapes (untrained: losses meaningless)"
    n0 = read_config(Path(base))["num_hidden_layers"]
    grown = work / f"grown-{a.shape}-{blocks}"
    if not (grown / "llamapro.json").is_file():
        steps.expand(str(base), str(grown), blocks=blocks, strategy="even", progress=False, verify=False)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_line()}  load average {os.getloadavg()[0]:.2f}")
    print(f"# {what} {n0} -> {n0 + blocks} layers ({blocks} new), {a.steps} AdamW steps, batch {a.batch} x "
          f"{a.seq} tokens of the Python tutorial; only the new blocks train")
    rows = []
    for kind in a.kinds.split(","):
        r = subprocess.run([sys.executable, __file__, "--child", kind, str(grown), "--steps",
                            str(a.steps), "--seq", str(a.seq), "--batch", str(a.batch)],
                           capture_output=True, text=True, cwd=str(ROOT))
        if r.returncode != 0:
            print(f"{kind} failed:\n{r.stderr[-2000:]}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"  {kind} done", file=sys.stderr, flush=True)
    base = rows[0]
    print("\n| base | weights MiB | vs fp32 | RSS loaded MiB | RSS after steps MiB | vs fp32 | peak RSS MiB "
          "| vs fp32 | s/step | vs fp32 | trainable params |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['weight_bytes'] / 2**20:.0f} | {r['weight_bytes'] / base['weight_bytes']:.2f} | "
              f"{r['rss_loaded'] / 2**20:.0f} | {r['rss_end'] / 2**20:.0f} | {r['rss_end'] / base['rss_end']:.2f} | "
              f"{r['peak_rss'] / 2**20:.0f} | {r['peak_rss'] / base['peak_rss']:.2f} | {r['s_per_step']:.2f} | "
              f"{r['s_per_step'] / base['s_per_step']:.2f}x | {r['trainable']:,} |")
    print("\nloss per step:")
    for r in rows:
        print(f"  {r['kind']:>5}: {' '.join(f'{x:.3f}' for x in r['losses'])}")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    if not a.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
