"""Export formats side by side: file size, held-out perplexity and CPU tokens/s.

    python benchmarks/bench_export.py [--model DIR] [--windows 8] [--new-tokens 48]

Exports one model (default: the SmolLM2-135M-Instruct demo) as fp32 safetensors (the baseline),
bf16 safetensors, f16 / bf16 / Q8_0 / Q4_0 GGUF and torchao int8 weight-only, in this one
invocation, then for each: bytes on disk, perplexity on held-out real text (the Debian Reference,
debian-reference-en, GPL-2+; evenly spaced windows) and greedy decode tokens/s (batch 1, best of
3, ratio to fp32). GGUF files are read back by transformers, which dequantizes them to fp32: their
tokens/s is fp32's; their quantized speed is llama.cpp's to measure, their quality is measured here.
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


def tokens_per_s(model, tok, new_tokens: int) -> float:
    import torch

    ids = tok("Debian packages are built from source packages by", return_tensors="pt")["input_ids"]
    best = 0.0
    with torch.no_grad():
        for _ in range(3):
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
    ap.add_argument("--new-tokens", type=int, default=48)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamapro.demo import ensure_demo_model
    from llamapro.publish.export import export_format
    from llamapro.publish.quant import heldout_windows, perplexity

    src = Path(a.model) if a.model else ensure_demo_model()
    print(f"# {time.strftime('%Y-%m-%d')}  {cpu_line()}  torch threads {torch.get_num_threads()}")
    print(f"# model {src}; held-out: Debian Reference, {a.windows} x {a.seq} tokens; "
          f"greedy {a.new_tokens} new tokens, batch 1, best of 3")
    tok = AutoTokenizer.from_pretrained(src)
    windows = heldout_windows(tok, n=a.windows, seq=a.seq)
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = []

    def row(name, path, model, speed=True):
        t = time.perf_counter()
        ppl = perplexity(model, windows)
        tps = tokens_per_s(model, tok, a.new_tokens) if speed else None
        rows.append((name, size(path), ppl, tps))
        print(f"  row: {name} | {rows[-1][1] / 2**20:.1f} MiB | ppl {ppl:.3f} | "
              f"{f'{tps:.1f} tok/s' if tps else '-'}", flush=True)
        print(f"  measured {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

    fp32 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    fp32.save_pretrained(work / "fp32")
    row("fp32 safetensors (baseline)", work / "fp32", fp32)
    bf16 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    bf16.save_pretrained(work / "bf16")
    row("bf16 safetensors", work / "bf16", bf16)
    del bf16
    for q in ("f16", "bf16", "q8_0", "q4_0"):
        res = export_format("gguf", src, work / f"gguf-{q}", quant=q)
        m = AutoModelForCausalLM.from_pretrained(work / f"gguf-{q}", gguf_file=res["file"],
                                                 dtype=torch.float32).eval()
        row(f"GGUF {q.upper()}", Path(res["path"]), m, speed=False)
        del m
    res = export_format("torchao-int8", src, work / "int8")
    m = AutoModelForCausalLM.from_pretrained(work / "int8").eval()
    row("torchao int8 weight-only", work / "int8", m)

    base = rows[0]
    print("\n| format | size MiB | size vs fp32 | held-out ppl | ppl vs fp32 | tokens/s | speed vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, b, ppl, tps in rows:
        sp = f"{tps:.1f} | {tps / base[3]:.2f}x" if tps else "= fp32 in transformers (dequantized) | -"
        print(f"| {name} | {b / 2**20:.1f} | {b / base[1]:.2f} | {ppl:.3f} | {ppl / base[2] - 1:+.2%} | {sp} |")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
