#!/usr/bin/env python
"""Benchmark: serving a pack on one base vs today's two-deployment canary (memory per replica), and
per-row gating vs grouping rows by pack (decode throughput).

What it measures (one invocation, side by side, same model and machine)
    memory    the two-deployment canary (``base`` = the base model, ``expanded`` = the base with the
              pack applied, one replica each) against one replica of ``base`` declaring the pack
              (``packs: {pack: DIR}``), each after answering both names. Per replica: RSS, USS (pages
              only that process holds) and the model's weights (tied tensors once). The canary needs
              the sum of its two replicas for one copy of each model.
    exactness the pack replica's greedy answers for ``base`` and for the pack equal the canary's
              ``base`` and ``expanded`` replicas' answers (printed, not timed).
    gating    in-process, ``--rows`` rows half base / half pack, ``--tokens`` greedy tokens each:
              gated   = one engine, both kinds of rows in one batch, every pack block runs for every
                        row and keeps its output only for the pack's rows (what a replica does)
              grouped = the base rows on the base alone plus the pack rows on the applied model
                        (one forward per group per token: what grouping by pack would cost)
              base-only traffic on the gated engine vs the plain base engine shows what a loaded
              pack costs rows that do not use it. Rounds alternate the modes to cancel drift.

Run
    . .venv/bin/activate
    python benchmarks/bench_serve_packs.py                  # SmolLM2-135M-Instruct + a 6-block pack
    python benchmarks/bench_serve_packs.py --blocks 2 --rows 8 --tokens 32 --rounds 3

Builds the expanded model and its pack under --work (a temp dir by default), starts its own local
Ray cluster and Serve on a free loopback port, shuts both down at the end.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
           "What is 12 times 7?", "Explain photosynthesis briefly.", "Who wrote Hamlet?",
           "What does a CPU do?", "Why is the sky blue?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_pack(base: str, work: Path, blocks: int) -> tuple[Path, Path]:
    """The base expanded by ``blocks`` blocks, the new blocks moved off the identity as training
    moves them, packed; and the pack applied to the base (the canary's "expanded" model)."""
    import torch
    from safetensors.torch import load_file, save_file

    from llamapro.artifacts import write_metadata
    from llamapro.expansion import api as steps
    from llamapro.publish.pack import apply_packs, make_pack

    trained, pack, applied = work / "trained", work / "pack", work / "applied"
    if not (applied / "config.json").is_file():
        steps.expand(base, str(trained), blocks=blocks, strategy="even", verify=False, progress=False,
                     force=True)
        meta = json.loads((trained / "llamapro.json").read_text())
        g = torch.Generator().manual_seed(0)
        for f in sorted(trained.glob("*.safetensors")):
            sd = load_file(f)
            for k in sd:
                parts = k.split(".")
                if "layers" in parts and int(parts[parts.index("layers") + 1]) in meta["new_layer_indices"]:
                    sd[k] = (sd[k].float() + torch.randn(sd[k].shape, generator=g) * 0.02).to(sd[k].dtype)
            save_file(sd, f, metadata={"format": "pt"})
        meta["kind"] = "trained"
        write_metadata(trained, meta)
        make_pack(str(trained), str(pack), name="pack", force=True)
        apply_packs(base, [str(pack)], str(applied), force=True)
    return pack, applied


def req(prompt: str, tokens: int) -> dict:
    return {"kind": "chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "default_max_tokens": tokens, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None,
            "ignore_eos": True}


def gating(base: str, pack: Path, applied: Path, rows: int, tokens: int, rounds: int, threads: int):
    from llamapro.serve.engine import TransformersEngine
    from llamapro.serve.packs import ServePacks

    gated = TransformersEngine(base, threads=threads)
    gated.packs = ServePacks(gated.model, base, {"pack": str(pack)})
    gated.call(lambda e: e.packs.load("pack")).result()
    plain = TransformersEngine(base, threads=threads)
    full = TransformersEngine(str(applied), threads=threads)

    def run(engine, packs: list[str]) -> tuple[int, float]:
        ps = []
        for i, name in enumerate(packs):
            p = engine.prepare(req(PROMPTS[i % len(PROMPTS)], tokens))
            p.pack = name
            ps.append(p)
        t0 = time.perf_counter()
        out = engine.generate(ps)
        return sum(o["completion_tokens"] for o in out), time.perf_counter() - t0

    half = rows // 2
    mixed = [""] * half + ["pack"] * (rows - half)
    for e in (gated, plain, full):  # warm up
        run(e, ["pack"] if e is gated else [""])
    acc = {k: [0, 0.0] for k in ("gated", "grouped", "base_gated", "base_plain")}
    for _ in range(rounds):
        for key, parts in (("gated", [(gated, mixed)]),
                           ("grouped", [(plain, [""] * half), (full, [""] * (rows - half))]),
                           ("base_gated", [(gated, [""] * rows)]),
                           ("base_plain", [(plain, [""] * rows)])):
            for eng, names in parts:
                tok, sec = run(eng, names)
                acc[key][0] += tok
                acc[key][1] += sec
    return {k: v[0] / v[1] for k, v in acc.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:smollm2-135m-instruct")
    ap.add_argument("--blocks", type=int, default=6, help="blocks in the pack (the demo run adds 6)")
    ap.add_argument("--rows", type=int, default=8, help="rows per batch in the gating comparison")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="", help="where the expanded model and the pack go")
    a = ap.parse_args(argv)

    import ray

    from llamapro.demo import resolve_model
    from llamapro.runtime import ensure_ray
    from llamapro.serve import deploy, serve_config_from_dict

    base = resolve_model(a.model)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-serve-packs-"))
    print(f"{cpu_line()}\nmodel {base}; pack of {a.blocks} blocks; fp32 replicas, "
          f"{a.threads} torch threads", flush=True)
    pack, applied = build_pack(base, work, a.blocks)
    pack_mb = (pack / "blocks.safetensors").stat().st_size / 1e6
    print(f"pack {pack} ({pack_mb:.1f} MB on disk)", flush=True)

    rates = gating(base, pack, applied, a.rows, a.tokens, a.rounds, a.threads)

    model = {"num_cpus": 1, "torch_threads": a.threads, "max_batch_size": 8}
    canary = {"models": {"base": {"path": base, **model}, "expanded": {"path": str(applied), **model}},
              "canary": {"weights": {"base": 0.9, "expanded": 0.1}}}
    packed = {"models": {"base": {"path": base, "packs": {"pack": str(pack)}, **model}},
              "canary": {"weights": {"base": 0.9, "pack": 0.1}}}
    ensure_ray("serve packs benchmark", address="local", num_cpus=4, include_dashboard=False,
               log_to_driver=False)
    mem, answers = {}, {}
    try:
        from openai import OpenAI

        from ray import serve

        port = free_port()  # one HTTP proxy per cluster: both apps use its port, one after the other
        for label, conf, names in (("canary", canary, {"base": "base", "expanded": "expanded"}),
                                   ("packs", packed, {"base": "base", "expanded": "pack"})):
            cfg = serve_config_from_dict({"app_name": f"bench-{label}", "port": port, **conf,
                                          "limits": {"max_tokens": 256}})
            deploy(cfg, wait_s=900)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                            timeout=600)
            for role, name in names.items():
                answers[(label, role)] = [client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": q}], max_tokens=16,
                    temperature=0).choices[0].message.content for q in PROMPTS[:3]]
            for dep in cfg.models:
                mem[(label, dep)] = serve.get_deployment_handle(
                    f"model-{dep}", cfg.app_name).memory.remote().result()
            serve.delete(cfg.app_name)
        serve.shutdown()
    finally:
        ray.shutdown()

    mb = 1 / 2**20
    print(f"\n{'replica':34s} {'RSS MiB':>8s} {'USS MiB':>8s} {'weights MiB':>12s}")
    tot = {"canary": [0, 0, 0], "packs": [0, 0, 0]}
    for (label, dep), m in mem.items():
        extra = f" (+ pack {','.join(m['loaded_packs'])})" if m["loaded_packs"] else ""
        print(f"{label + ': model-' + dep + extra:34s} {m['rss'] * mb:8.0f} {m['uss'] * mb:8.0f} "
              f"{m['weights_bytes'] * mb:12.0f}")
        for i, k in enumerate(("rss", "uss", "weights_bytes")):
            tot[label][i] += m[k]
    for label in tot:
        print(f"{label + ': all model replicas':34s} {tot[label][0] * mb:8.0f} {tot[label][1] * mb:8.0f} "
              f"{tot[label][2] * mb:12.0f}")
    print(f"\nmemory for base + pack: one pack replica / two-deployment canary = "
          f"RSS {tot['packs'][0] / tot['canary'][0]:.2f}x, USS {tot['packs'][1] / tot['canary'][1]:.2f}x, "
          f"weights {tot['packs'][2] / tot['canary'][2]:.2f}x")
    same = all(answers[("packs", r)] == answers[("canary", r)] for r in ("base", "expanded"))
    print(f"greedy answers of the pack replica equal the canary's replicas' (base and expanded): {same}")

    print(f"\ndecode, {a.rows} rows ({a.rows // 2} base + {a.rows - a.rows // 2} pack), {a.tokens} tokens, "
          f"{a.rounds} rounds:")
    print(f"  gated (one batch)           {rates['gated']:8.1f} tokens/s")
    print(f"  grouped (a batch per pack)  {rates['grouped']:8.1f} tokens/s   "
          f"gated/grouped = {rates['gated'] / rates['grouped']:.2f}x")
    print(f"  base-only rows, pack loaded {rates['base_gated']:8.1f} tokens/s   vs base alone "
          f"{rates['base_plain']:8.1f}: {rates['base_gated'] / rates['base_plain']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
