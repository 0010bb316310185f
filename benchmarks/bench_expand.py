#!/usr/bin/env python
"""Benchmark: streaming block expansion against `cp` and against loading the whole model.

What it measures
    For synthetic Llama checkpoints of a few sizes (hidden 2048, intermediate 5632, 32 heads,
    8 KV heads, vocab 32000, untied embeddings, fp32, ~1 GB shards with an index; only the
    number of layers changes with the size), each operation runs in a fresh child process, so
    its wall time and peak RSS (``ru_maxrss`` from ``wait4``) belong to that operation alone:

    cp       ``cp -r`` of the checkpoint directory (and ``cp+sync``: the same, then ``sync`` of
             the copied files, because the streaming expansion fsyncs its output)
    stream   ``llamapro.expansion.api.expand(base, out, blocks=N, strategy="even", verify=False)``:
             plan, fingerprint, byte copy with ``copy_file_range``, zeros for the new blocks'
             residual writers, fsync, zero check and the structural meta-device check (in a
             child process beside the copy, so the torch/transformers import is included; the
             stream RSS is the parent's peak plus that child's). Run with an empty llamapro
             cache, as the first expansion of this model and plan
    nosync   the same with ``durable=False`` (``--no-fsync``: published like cp, data possibly
             still in the page cache), also with an empty llamapro cache
    cached   nosync again with the llamapro cache nosync left behind: the same expansion
             repeated (a retried job, ``--force``), so its passed structure check is remembered
             and neither torch nor transformers is imported
    load     ``AutoModelForCausalLM.from_pretrained(dtype=float32)`` + in-memory
             ``llamapro.expansion.surgery.expand_model`` + ``save_pretrained`` (the non-streaming way)

    N = max(1, layers // 4) new blocks (LLaMA-Pro's 8 for 32). Wall times are taken by this
    parent around each child, so interpreter start-up and import time count. The stream child
    also times its phases (imports, fingerprint, copy, zeros, fsync, zero read-back, structure
    check) and the two sizes give each method's fixed cost and per-GB cost.

Page cache (``--cache``)
    cold  (default) before each run: ``sync``, then ``posix_fadvise(DONTNEED)`` on every
          checkpoint file, so tensor data comes from disk while Python/torch libraries stay
          cached (a second CLI invocation on a new checkpoint)
    warm  before each run: read every checkpoint file once, so every method reads from memory
    drop  ``sync; echo 3 > /proc/sys/vm/drop_caches`` (root only): libraries cold too
    Dirty pages of the previous run are always flushed (outside the timed window).

Targets (from the issue)
    peak RSS of stream <= 2 x largest tensor + 300 MB, and flat as the model grows
    (spread across sizes <= 64 MB); time of stream <= 1.5 x time of cp. Printed for nosync
    (like cp, no fsync) and cached (the byte path alone: the structure check remembered), and
    for stream against cp+sync. A first expansion's structure check is a fixed cost (its
    torch/transformers import, 4-6 s of CPU competing with the copy on 2 cores), so nosync
    passes only from about 12 GB on this machine; cached shows what the bytes cost.

Run
    . .venv/bin/activate
    python benchmarks/bench_expand.py                 # sizes 1,4 GB, ~4-6 minutes
    python benchmarks/bench_expand.py --sizes 1,4,8 --workdir /tmp/bench --keep --cache warm

The work directory (default: a new one under /tmp) is deleted at the end unless --keep.
Needs free disk of about 2.5 x the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 8, 32000
HEAD_DIM = HIDDEN // HEADS
DTYPES = {"fp32": ("F32", 4, "float32"), "bf16": ("BF16", 2, "bfloat16")}
MB = 1 << 20

# --- synthetic checkpoint ------------------------------------------------------------------------


def layer_shapes(i: int) -> list[tuple[str, list[int]]]:
    p = f"model.layers.{i}."
    kv = KV_HEADS * HEAD_DIM
    return [
        (p + "input_layernorm.weight", [HIDDEN]),
        (p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]),
        (p + "self_attn.k_proj.weight", [kv, HIDDEN]),
        (p + "self_attn.v_proj.weight", [kv, HIDDEN]),
        (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
        (p + "post_attention_layernorm.weight", [HIDDEN]),
        (p + "mlp.gate_proj.weight", [INTER, HIDDEN]),
        (p + "mlp.up_proj.weight", [INTER, HIDDEN]),
        (p + "mlp.down_proj.weight", [HIDDEN, INTER]),
    ]


def model_shapes(layers: int) -> list[tuple[str, list[int]]]:
    out = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(layers):
        out += layer_shapes(i)
    return out + [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layers_for(gb: float, itemsize: int) -> int:
    fixed = sum(numel(s) for _, s in model_shapes(0)) * itemsize
    per_layer = sum(numel(s) for _, s in layer_shapes(0)) * itemsize
    return max(2, round((gb * 1e9 - fixed) / per_layer))


def write_checkpoint(d: Path, layers: int, dtype: str, shard_bytes: int = 10**9) -> dict:
    """Write config.json, ~1 GB safetensors shards and the index, one tensor at a time: memory is
    one 64 MB block of random normals that every tensor reads from at its own offset."""
    import numpy as np

    st_dtype, itemsize, torch_name = DTYPES[dtype]
    block = (np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32) * 0.02)
    if dtype == "bf16":
        block = (block.view(np.uint32) >> 16).astype(np.uint16)
    block = memoryview(block.tobytes())
    d.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": torch_name,
    }
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shards, cur, cur_bytes = [], [], 0
    for name, shape in model_shapes(layers):
        nbytes = numel(shape) * itemsize
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, nbytes))
        cur_bytes += nbytes
    shards.append(cur)

    weight_map, total, largest = {}, 0, 0
    for k, tensors in enumerate(shards, 1):
        # one shard: model.safetensors without an index, as save_pretrained writes it
        fname = (f"model-{k:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                 else "model.safetensors")
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in tensors:
            header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[name] = fname
            largest = max(largest, nbytes)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(d / fname, "wb", buffering=0) as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, _, nbytes in tensors:  # tensor-dependent start: no two tensors alike
                pos = (zlib.crc32(name.encode()) % (len(block) // 8)) * 8
                left = nbytes
                while left:
                    n = min(left, len(block) - pos)
                    f.write(block[pos:pos + n])
                    left -= n
                    pos = 0
        total += off
    if len(shards) > 1:
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    os.sync()
    return {"layers": layers, "bytes": total, "largest": largest, "shards": len(shards)}


# --- page cache ----------------------------------------------------------------------------------

def files_under(d: Path) -> list[Path]:
    return [p for p in sorted(d.rglob("*")) if p.is_file()]


def prepare_cache(mode: str, base: Path) -> None:
    os.sync()  # flush the previous run's dirty pages outside every timed window
    time.sleep(1)  # and let the discards of its deleted output settle (this disk is mounted -o discard)
    if mode == "drop":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    elif mode == "cold":
        for p in files_under(base):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    else:
        for p in files_under(base):
            with open(p, "rb", buffering=0) as f:
                while f.read(16 * MB):
                    pass


def resolve_cache_mode(mode: str) -> str:
    if mode != "drop":
        return mode
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop"
    except OSError:
        print("cannot write /proc/sys/vm/drop_caches (not root?): using --cache warm")
        return "warm"


# --- measured children ---------------------------------------------------------------------------

GNU_TIME = "/usr/bin/time"


def run_measured(argv: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``argv`` as a fresh child; wall seconds, peak RSS (MiB) and the child's JSON report.

    Peak RSS comes from GNU time when installed: ``wait4``'s ``ru_maxrss`` of a direct child also
    counts this parent's own peak (Linux carries the pre-exec high-water mark across exec)."""
    rss_file = log.with_suffix(".rss")
    use_time = os.access(GNU_TIME, os.X_OK)
    cmd = [GNU_TIME, "-f", "%M %U %S", "-o", str(rss_file)] + argv if use_time else argv
    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, **env} if env else None)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed ({p.returncode}):\n{text[-3000:]}")
    if use_time:
        rss_kb, user, sys_ = rss_file.read_text().split()[-3:]
        rss_kb, cpu = int(rss_kb), float(user) + float(sys_)
    else:
        rss_kb, cpu = ru.ru_maxrss, ru.ru_utime + ru.ru_stime
    report = {}
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            report = json.loads(line[len("BENCH_JSON "):])
    out = {"wall": wall, "cpu": cpu, "rss_mb": rss_kb / 1024, **report}
    if report.get("rss_children_mb"):
        # `llamapro expand` runs its structure check in a child process beside the copy: count
        # both peaks as if they coincided (an upper bound on the pair's memory at any moment)
        out["rss_mb"] = report["rss_self_mb"] + report["rss_children_mb"]
    return out


def child(mode: str, base: str, out: str, blocks: int) -> None:
    """Runs inside the measured child process; prints one BENCH_JSON line."""
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    extra: dict = {}

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    t = time.perf_counter()
    import llamapro.expansion.streaming as ck
    import llamapro.tensors as tensors_io
    import llamapro.expansion.api as steps
    phases["import llamapro"] = time.perf_counter() - t
    if not mode.startswith("stream"):  # `llamapro expand` imports these in the structure-check child,
        t = time.perf_counter()  # overlapping the copy (timed there as part of that check)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401
        phases["import torch+transformers"] = time.perf_counter() - t

    if mode.startswith("stream"):
        for mod, name, key in [(ck, "fingerprint", "fingerprint"), (ck, "copy_range", "copy_file_range"),
                               (ck, "write_zeros", "write zeros"), (tensors_io, "_fsync_dir_files", "fsync"),
                               (ck, "check_new_blocks_zero", "zero read-back")]:
            setattr(mod, name, timed(key, getattr(mod, name)))
        steps.check_structure_isolated = timed("structure check (meta device, child process)",
                                               steps.check_structure_isolated)
        t = time.perf_counter()
        meta = steps.expand(base, out, blocks=blocks, strategy="even", verify=False, progress=False,
                            durable=mode == "stream")
        phases["expand() total"] = time.perf_counter() - t
        assert meta["structure_check"]["ok"] and meta["num_new_layers"] == blocks
        extra["structure_cached"] = meta["structure_check"]["cached"]
    elif mode == "load":
        from llamapro.expansion.surgery import expand_model
        from llamapro.expansion.strategies import plan

        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        phases["from_pretrained"] = time.perf_counter() - t
        t = time.perf_counter()
        res = expand_model(model, plan(model.config.num_hidden_layers, blocks, "even"))
        phases["expand_model"] = time.perf_counter() - t
        if out != "-":
            t = time.perf_counter()
            res.model.save_pretrained(out)
            phases["save_pretrained"] = time.perf_counter() - t
    elif mode != "import":
        raise SystemExit(f"unknown child mode {mode}")
    phases["child total"] = time.perf_counter() - t_start
    import resource

    rss = {"rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    print("BENCH_JSON " + json.dumps({"phases": phases, **rss, **extra}), flush=True)


# --- driver --------------------------------------------------------------------------------------

def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in files_under(d))


def bench_size(gb: float, args, work: Path) -> dict:
    _, itemsize, _ = DTYPES[args.dtype]
    layers = layers_for(gb, itemsize)
    blocks = max(1, layers // 4)
    base = work / f"base-{gb:g}gb"
    t = time.perf_counter()
    me = [sys.executable, os.path.abspath(__file__), "--child"]
    info = run_measured(me + ["gen", str(base), str(layers), args.dtype], work / "gen.log")["info"]
    print(f"[{gb:g} GB] wrote {info['bytes'] / 1e9:.2f} GB, {layers} layers, {info['shards']} shards, "
          f"largest tensor {info['largest'] / MB:.0f} MiB in {time.perf_counter() - t:.1f}s; "
          f"+{blocks} blocks", flush=True)
    runs = {}
    jobs = [
        ("cp", lambda o: ["cp", "-r", str(base), str(o)]),
        ("cp+sync", lambda o: ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(base), str(o)]),
        ("stream", lambda o: me + ["stream", str(base), str(o), str(blocks)]),
        ("nosync", lambda o: me + ["stream-nosync", str(base), str(o), str(blocks)]),
        ("cached", lambda o: me + ["stream-nosync", str(base), str(o), str(blocks)]),
    ]
    save = gb <= args.load_save_max_gb
    jobs.append(("load", lambda o: me + ["load", str(base), str(o) if save else "-", str(blocks)]))
    for rep in range(args.repeat):  # round robin, so a busy spell of the machine hits all methods
        # stream and nosync start from an empty llamapro cache: the structure check runs (a first
        # expansion of this model and plan). cached = nosync again with the cache nosync left: the
        # same expansion repeated (a retried job, --force), its structure check remembered.
        check_cache = work / f"llamapro-cache-{gb:g}-{rep}"
        shutil.rmtree(check_cache, ignore_errors=True)
        for name, argv in jobs:
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            if name in ("stream", "nosync"):
                shutil.rmtree(check_cache, ignore_errors=True)
            prepare_cache(args.cache, base)
            env = {"LLAMAPRO_CACHE": str(check_cache)} if name in ("stream", "nosync", "cached") else None
            r = run_measured(argv(out), work / f"{name}.log", env)
            if name in ("stream", "nosync", "cached"):
                assert r["structure_cached"] == (name == "cached"), (name, r["structure_cached"])
            r["out_bytes"] = dir_bytes(out) if out.exists() else 0
            print(f"[{gb:g} GB] {name:8s} {r['wall']:7.2f} s  (cpu {r['cpu']:6.2f} s)  peak RSS "
                  f"{r['rss_mb']:5.0f} MiB  wrote {r['out_bytes'] / 1e9:.2f} GB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            if name not in runs or r["wall"] < runs[name]["wall"]:  # keep the fastest repeat
                runs[name] = {**r, "rss_mb": max(r["rss_mb"], runs.get(name, r)["rss_mb"])}
    if not args.keep:
        shutil.rmtree(base)
    return {"gb": gb, "blocks": blocks, "save": save, **info, "runs": runs}


def fit(xs, ys):
    """Least-squares line: (intercept, slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def machine_load() -> str:
    """Load average and CPU pressure: other processes on the machine inflate every time here."""
    la = Path("/proc/loadavg").read_text().split()[:3]
    try:
        psi = Path("/proc/pressure/cpu").read_text().split("\n")[0].split()[1:3]
    except OSError:
        psi = []
    return f"loadavg {' '.join(la)}" + (f", cpu pressure {' '.join(psi)}" if psi else "")


def report(results: list[dict], args, import_run: dict, load_start: str) -> None:
    print()
    print(f"page cache: {args.cache} ({CACHE_DOC[args.cache]}); dtype {args.dtype}; "
          f"{os.cpu_count()} cores; wall seconds of a fresh child, fastest of {args.repeat}; peak RSS")
    print(f"machine load at start: {load_start}; at end: {machine_load()}")
    hdr = (f"{'size':>8} {'layers':>7} {'largest':>8} | {'cp':>6} {'cp+sync':>7} {'stream':>6} "
           f"{'nosync':>6} {'cached':>6} {'load':>6} | {'RSS cp':>6} {'stream':>6} {'load':>6} | "
           f"{'ns/cp':>6} {'ca/cp':>6} {'str/cp+s':>8} {'str/load':>8} {'RSS s/l':>7} | "
           f"{'RSS<=2L+300':>12} {'ns<=1.5cp':>9} {'ca<=1.5cp':>9} {'str<=1.5cp+s':>12}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        cp, cps, st, ns, ca, ld = (r["runs"][k] for k in ("cp", "cp+sync", "stream", "nosync", "cached",
                                                          "load"))
        limit = 2 * r["largest"] / MB + 300
        rss_ok = max(st["rss_mb"], ns["rss_mb"]) <= limit
        load_t = f"{ld['wall']:6.1f}" + ("" if r["save"] else "*")
        print(f"{r['bytes'] / 1e9:6.2f}GB {r['layers']:>3}+{r['blocks']:<3} {r['largest'] / MB:6.0f}MB | "
              f"{cp['wall']:6.1f} {cps['wall']:7.1f} {st['wall']:6.1f} {ns['wall']:6.1f} "
              f"{ca['wall']:6.1f} {load_t:>6} | "
              f"{cp['rss_mb']:6.0f} {st['rss_mb']:6.0f} {ld['rss_mb']:6.0f} | "
              f"{ns['wall'] / cp['wall']:6.2f} {ca['wall'] / cp['wall']:6.2f} {st['wall'] / cps['wall']:8.2f} "
              f"{st['wall'] / ld['wall']:8.2f} {st['rss_mb'] / ld['rss_mb']:7.2f} | "
              f"{'PASS' if rss_ok else 'FAIL':>4} {st['rss_mb']:4.0f}<={limit:4.0f} "
              f"{'PASS' if ns['wall'] <= 1.5 * cp['wall'] else 'FAIL':>9} "
              f"{'PASS' if ca['wall'] <= 1.5 * cp['wall'] else 'FAIL':>9} "
              f"{'PASS' if st['wall'] <= 1.5 * cps['wall'] else 'FAIL':>12}")
    print("(times s, RSS MiB; str = stream = `llamapro expand` (fsyncs before publishing), nosync = "
          "`llamapro expand --no-fsync` (publishes like cp: data may still be in the page cache); "
          "stream and nosync run the structure check (a first expansion: empty llamapro cache), "
          "cached = nosync repeated with that check remembered (same model and plan again); "
          "* = load only, no expand_model/save: size > "
          f"--load-save-max-gb {args.load_save_max_gb:g})")
    extra = [r["runs"]["stream"]["out_bytes"] / r["runs"]["cp"]["out_bytes"] - 1 for r in results]
    print(f"note: cp returns before its data is on disk, stream fsyncs it (compare cp+sync too); "
          f"stream also writes {min(extra):.0%}..{max(extra):.0%} more bytes (the new blocks)")
    rss = [r["runs"]["stream"]["rss_mb"] for r in results]
    if len(results) > 1:
        spread = max(rss) - min(rss)
        print(f"stream peak RSS across sizes: {min(rss):.0f}..{max(rss):.0f} MiB, spread {spread:.0f} MiB "
              f"-> flat (<= 64 MiB): {'PASS' if spread <= 64 else 'FAIL'}")

    print("\nstream phases (s), measured inside the child:")
    keys = []
    for r in results:
        for k in r["runs"]["stream"]["phases"]:
            if k not in keys:
                keys.append(k)
    print(f"  {'phase':42s}" + "".join(f"{r['bytes'] / 1e9:>9.2f}GB" for r in results))
    for k in keys:
        print(f"  {k:42s}" + "".join(f"{r['runs']['stream']['phases'].get(k, 0):11.2f}" for r in results))
    print(f"  {'python start-up + exit (wall - child total)':42s}" + "".join(
        f"{r['runs']['stream']['wall'] - r['runs']['stream']['phases']['child total']:11.2f}"
        for r in results))
    # the structure check (and its torch/transformers import) runs in a child beside the copy:
    # the main thread's per-byte phases are on the critical path, the rest is the fixed cost
    byte_keys = ("fingerprint", "copy_file_range", "write zeros", "fsync",
                 "zero read-back")
    per_byte = [sum(r["runs"]["stream"]["phases"].get(k, 0) for k in byte_keys) for r in results]
    fixed = [r["runs"]["stream"]["wall"] - x for x, r in zip(per_byte, results)]
    print(f"  {'= rest: start-up, imports, waits':42s}" + "".join(f"{x:11.2f}" for x in fixed))
    print(f"  {'= per-byte: fingerprint..read-backs':42s}" + "".join(f"{x:11.2f}" for x in per_byte))
    print(f"  {'  per-byte / cp':42s}" + "".join(
        f"{x / r['runs']['cp']['wall']:11.2f}" for x, r in zip(per_byte, results)))
    print(f"  {'  per-byte / cp+sync':42s}" + "".join(
        f"{x / r['runs']['cp+sync']['wall']:11.2f}" for x, r in zip(per_byte, results)))
    print(f"  {'stream child cpu (user+sys)':42s}" + "".join(
        f"{r['runs']['stream']['cpu']:11.2f}" for r in results))
    ip = import_run["phases"]
    print(f"  fixed import cost alone (fresh child, warm libs): wall {import_run['wall']:.2f} s "
          f"(llamapro {ip['import llamapro']:.2f}, torch+transformers "
          f"{ip['import torch+transformers']:.2f}), peak RSS {import_run['rss_mb']:.0f} MiB")
    if len(results) > 1:
        xs = [r["bytes"] / 1e9 for r in results]
        print("\nfixed + per-GB-of-input cost (least squares over sizes; with two sizes on a busy "
              "machine only indicative):")
        for k in ("cp", "cp+sync", "stream", "nosync", "cached", "load"):
            a, b = fit(xs, [r["runs"][k]["wall"] for r in results])
            print(f"  {k:8s} {a:6.2f} s + {b:5.2f} s/GB")
        for k in ("copy_file_range", "write zeros", "fsync"):
            a, b = fit(xs, [r["runs"]["stream"]["phases"].get(k, 0) for r in results])
            print(f"  stream {k:16s} {a:6.2f} s + {b:5.2f} s/GB")


CACHE_DOC = {
    "cold": "sync + fadvise DONTNEED on the checkpoint before each run; libraries cached",
    "warm": "checkpoint read once before each run",
    "drop": "sync + drop_caches before each run; libraries cold too",
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        if sys.argv[2] == "gen":  # gen DIR LAYERS DTYPE
            info = write_checkpoint(Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
            print("BENCH_JSON " + json.dumps({"info": info}), flush=True)
        else:  # MODE BASE OUT BLOCKS
            child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4", help="checkpoint sizes in GB, comma-separated")
    ap.add_argument("--workdir", help="where checkpoints are written (default: new dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir and checkpoints")
    ap.add_argument("--cache", choices=("cold", "warm", "drop"), default="cold")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per method and size; the fastest counts (peak RSS: the largest)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--load-save-max-gb", type=float, default=8.0,
                    help="above this size the load method only loads (no expand/save)")
    args = ap.parse_args()
    args.cache = resolve_cache_mode(args.cache)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="llamapro-bench-"))
    free = shutil.disk_usage(work).free / 1e9
    if free < 2.5 * max(sizes) + 1:
        raise SystemExit(f"{work}: {free:.0f} GB free, need about {2.5 * max(sizes) + 1:.0f} GB")
    t0 = time.perf_counter()
    try:
        me = [sys.executable, os.path.abspath(__file__), "--child", "import", "-", "-", "0"]
        run_measured(me, work / "warmup.log")  # libraries into the page cache, not measured
        import_run = run_measured(me, work / "import.log")
        load_start = machine_load()
        results = [bench_size(gb, args, work) for gb in sizes]
        report(results, args, import_run, load_start)
        print(f"\nbenchmark took {time.perf_counter() - t0:.0f} s; workdir {work}"
              + (" kept" if args.keep else " removed"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
