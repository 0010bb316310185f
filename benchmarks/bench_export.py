"""Export formats side by side: file size, held-out perplexity and CPU tokens/s.

    python benchmarks/bench_export.py [--model DIR] [--windows 8] [--new-tokens 64] [--repeats 3]
        [--formats fp32,bf16,gguf-f16,gguf-q8_0,torchao-int8] [--threads N]

Exports one model (default: the SmolLM2-135M-Instruct demo) as fp32 safetensors (the baseline),
bf16 safetensors, GGUF (f16 and q8_0 by default; bf16 and q4_0 on request) and torchao int8
weight-only, in this one invocation, then for each: bytes on disk, perplexity on held-out real
text (the Debian Reference, debian-reference-en, GPL-2+; evenly spaced windows) and greedy decode
tokens/s (batch 1, N new tokens, one untimed warm-up, best of ``--repeats``, ratio to fp32).

GGUF files are loaded back by transformers (``gguf_file=``), which DEQUANTIZES them to fp32 on
load: their perplexity is the quantized weights' (the rounding survives dequantization), but their
tokens/s is transformers' fp32 speed, not the format's; llama.cpp's own speed is not measured here.

Timings need a quiet machine: the CPU model, flags, torch threads and the load average before and
after are printed; compare rows only within one invocation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line  # noqa: E402


def size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


FORMATS = ("fp32", "bf16", "gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0", "torchao-int8")


def tokens_per_s(model, tok, new_tokens: int, repeats: int = 3) -> float:
    import torch

    ids = tok("Debian packages are built from source packages by", return_tensors="pt")["input_ids"]
    best = 0.0
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,  # warm-up: not timed
                       pad_token_id=tok.eos_token_id)
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
            best = max(best, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF directory (default: the demo model)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per format (best kept)")
    ap.add_argument("--formats", default="fp32,bf16,gguf-f16,gguf-q8_0,torchao-int8",
                    help=f"comma-separated, fp32 first; from {', '.join(FORMATS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    formats = a.formats.split(",")
    bad = [f for f in formats if f not in FORMATS]
    if bad or formats[0] != "fp32":
        ap.error(f"--formats: fp32 first, then any of {', '.join(FORMATS)} (got {a.formats})")

    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamapro.demo import ensure_demo_model
    from llamapro.publish.export import export_format
    from llamapro.publish.quant import heldout_windows, perplexity

    if a.threads:
        torch.set_num_threads(a.threads)
    src = Path(a.model) if a.model else ensure_demo_model()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_line()}  torch {torch.__version__} threads "
          f"{torch.get_num_threads()}  load average {os.getloadavg()[0]:.2f}")
    print(f"# model {src}; held-out: Debian Reference, {a.windows} x {a.seq} tokens; "
          f"greedy {a.new_tokens} new tokens, batch 1, warm-up + best of {a.repeats}")
    tok = AutoTokenizer.from_pretrained(src)
    windows = heldout_windows(tok, n=a.windows, seq=a.seq)
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = []

    def row(name, path, model):
        t = time.perf_counter()
        ppl = perplexity(model, windows)
        tps = tokens_per_s(model, tok, a.new_tokens, a.repeats)
        rows.append((name, size(path), ppl, tps))
        print(f"  row: {name} | {rows[-1][1] / 2**20:.1f} MiB | ppl {ppl:.3f} | {tps:.1f} tok/s", flush=True)
        print(f"  measured {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

    try:
        for f in formats:
            if f in ("fp32", "bf16"):
                dt = torch.float32 if f == "fp32" else torch.bfloat16
                m = AutoModelForCausalLM.from_pretrained(src, dtype=dt).eval()
                m.save_pretrained(work / f)
                row(f"{f} safetensors" + (" (baseline)" if f == "fp32" else ""), work / f, m)
            elif f.startswith("gguf-"):
                q = f.split("-", 1)[1]
                res = export_format("gguf", src, work / f, quant=q)
                m = AutoModelForCausalLM.from_pretrained(work / f, gguf_file=res["file"],
                                                         dtype=torch.float32).eval()
                row(f"GGUF {q.upper()} (dequantized to fp32 on load)", Path(res["path"]), m)
            else:
                export_format(f, src, work / f)
                m = AutoModelForCausalLM.from_pretrained(work / f).eval()
                row("torchao int8 weight-only", work / f, m)
            del m
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)

    base = rows[0]
    print("\n| format | size MiB | size vs fp32 | held-out ppl | ppl vs fp32 | tokens/s | speed vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, b, ppl, tps in rows:
        print(f"| {name} | {b / 2**20:.1f} | {b / base[1]:.2f} | {ppl:.3f} | {ppl / base[2] - 1:+.2%} | "
              f"{tps:.1f} | {tps / base[3]:.2f}x |")
    print(f"# load average at the end {os.getloadavg()[0]:.2f} (timings are comparable only if it stayed "
          f"well below the {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
