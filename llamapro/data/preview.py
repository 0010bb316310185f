"""`llamapro data preview`: run the training pipeline once over every source, report what it saw
(counts, skips, shares, the first block decoded) and render that report as text."""

from __future__ import annotations

import numpy as np

from llamapro.config import DataConfig
from llamapro.data.counts import check_source, new_counts
from llamapro.data.dataset import build_dataset
from llamapro.data.tokens import IGNORE_INDEX


def preview(cfg: DataConfig, tokenizer_path, max_files: int | None = None) -> dict:
    """Run the training pipeline once over every configured source and report what it saw.

    Returns a JSON-able dict: per source the documents read, skipped (by reason, with examples),
    held out, used, tokens, blocks packed and kept in the mixture, its target and actual share and
    a verdict; the stream's first block decoded; and ``ok`` (whether a training run would pass).
    ``max_files`` limits the shards read per source (a quick look at a huge corpus).
    """
    ds, plan, tok = build_dataset(cfg, tokenizer_path, "train", cfg.source_names(), enforce=False,
                           max_files=max_files)
    import ray

    blocks: dict[int, int] = {}
    first = None
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        if first is None and len(batch["source"]):
            first = (int(batch["source"][0]), batch["input_ids"][0], batch["labels"][0])
        for s, n in zip(*np.unique(batch["source"], return_counts=True)):
            blocks[int(s)] = blocks.get(int(s), 0) + int(n)
    snap = ray.get(plan.stats.snapshot.remote())
    total_blocks = sum(blocks.values())
    total_w = sum(s.weight for s in cfg.sources)
    report = {"seq_len": cfg.seq_len, "seed": cfg.seed, "mixing": cfg.mixing,
              "max_skip_fraction": cfg.max_skip_fraction, "sources": [], "errors": [],
              "warnings": []}
    for i in plan.source_indices:
        src, c = cfg.sources[i], snap.get(i) or new_counts()
        if src.weight > 0:
            problem = check_source(src.name, c, files_total=len(plan.files[i]),
                                   max_skip_fraction=cfg.max_skip_fraction, seq_len=cfg.seq_len)
        else:  # evaluation-only: judged by what it holds out (its blocks are not in the mix)
            problem = check_source(src.name, {**c, "docs_used": c["docs_held_out"],
                                              "blocks_packed": 1},
                                   files_total=len(plan.files[i]),
                                   max_skip_fraction=cfg.max_skip_fraction, seq_len=cfg.seq_len,
                                   split="eval")
        if problem:
            report["errors"].append(problem)
        if src.eval_fraction > 0 and c["docs_read"] and not c["docs_held_out"]:
            report["warnings"].append(
                f"source {src.name!r}: eval_fraction={src.eval_fraction:g} held out none of its "
                f"{c['docs_read']} documents; build_eval_dataset({src.name!r}) will fail")
        report["sources"].append({
            "name": src.name, "index": i, "kind": src.kind, "files": len(plan.files[i]),
            "units": len(plan.units[i]), "weight": src.weight,
            "target_share": src.weight / total_w if total_w else 0.0,
            "estimated_tokens": round(plan.estimates.get(src.name, 0.0)),
            "rate": plan.rates.get(src.name, 0.0),
            "docs_read": c["docs_read"], "docs_skipped": sum(c["skipped"].values()),
            "skipped": c["skipped"], "files_skipped": c["files_skipped"],
            "skip_examples": c["examples"], "docs_held_out": c["docs_held_out"],
            "docs_used": c["docs_used"], "tokens": c["tokens"], "loss_tokens": c["loss_tokens"],
            "blocks_packed": c["blocks_packed"], "blocks_in_mix": blocks.get(i, 0),
            "share": blocks.get(i, 0) / total_blocks if total_blocks else 0.0,
            "tail_tokens_dropped": c["tail_tokens_dropped"],
            "status": problem or "ok",
        })
    report["total_blocks"] = total_blocks
    report["total_tokens"] = total_blocks * cfg.seq_len
    if first is not None:
        s, ids, labels = first
        report["first_block"] = {
            "source": cfg.sources[s].name, "tokens": int(len(ids)),
            "loss_tokens": int((labels != IGNORE_INDEX).sum()),
            "text": tok.decode(ids)}
    else:
        report["first_block"] = None
    report["ok"] = not report["errors"] and total_blocks > 0
    return report


def _n(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def format_preview(r: dict) -> str:
    """The preview as a table per source, the verdict and the first decoded block."""
    cols = ["source", "kind", "files", "docs read", "skipped", "held out", "used", "tokens",
            "blocks", "in mix", "share", "target"]
    rows = []
    for s in r["sources"]:
        rows.append([s["name"], s["kind"], str(s["files"]), _n(s["docs_read"]),
                     _n(s["docs_skipped"] + sum(s["files_skipped"].values())),
                     _n(s["docs_held_out"]), _n(s["docs_used"]), _n(s["tokens"]),
                     _n(s["blocks_packed"]), _n(s["blocks_in_mix"]), f"{s['share']:.1%}",
                     f"{s['target_share']:.1%}"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [f"data preview: seq_len {r['seq_len']}, seed {r['seed']}, mixing {r['mixing']}, "
           f"skip budget {r['max_skip_fraction']:.1%}", "", fmt.format(*cols)]
    out += [fmt.format(*row) for row in rows]
    for s in r["sources"]:
        why = []
        for key, unit in (("skipped", ""), ("files_skipped", " files")):
            for reason, n in sorted(s[key].items(), key=lambda kv: -kv[1]):
                ex = (s["skip_examples"].get(reason) or [""])[0]
                why.append(f"    {reason}: {n}{unit}" + (f"  e.g. {ex}" if ex else ""))
        if why:
            out += ["", f"{s['name']} skipped:"] + why
        if s["tail_tokens_dropped"]:
            out.append(f"  {s['name']}: {s['tail_tokens_dropped']} tokens left over at the ends "
                       "of work units (shorter than one block) were dropped")
    out += ["", f"training stream: {r['total_blocks']} blocks = {_n(r['total_tokens'])} tokens"]
    out += [f"warning: {w}" for w in r.get("warnings", [])]
    if r["errors"]:
        out += ["", "FAILED: a training run would stop on this data:"]
        out += [f"  - {e}" for e in r["errors"]]
    else:
        out += ["OK: every source passes the checks"]
    fb = r.get("first_block")
    if fb:
        out += ["", f"first block (source {fb['source']}, {fb['tokens']} tokens, "
                    f"{fb['loss_tokens']} with loss):", "-" * 80, fb["text"], "-" * 80]
    return "\n".join(out)
