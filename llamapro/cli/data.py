"""`llamapro data preview` and `llamapro data corpora`.

    llamapro data corpora [--out DIR] [--force]
    llamapro data preview --config jobs/configs/data_demo.yaml [--json] [--max-files N] [k=v ...]

Importing this module imports neither ray nor transformers (the CLI stays quick to start).
"""

from __future__ import annotations

import json
import os
import sys

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2  # as in llamapro.cli


def add_data_commands(subparsers) -> None:
    """Register `data preview` and `data corpora` on an argparse subparsers object."""
    d = subparsers.add_parser("data", help="check corpora and build the demo corpora")
    dsub = d.add_subparsers(dest="data_cmd", required=True, metavar="DATA_COMMAND")

    p = dsub.add_parser(
        "preview", help="read the configured sources; print counts, skips and the first block",
        description="Runs the data pipeline over every source of the config (on a local Ray "
                    "cluster unless RAY_ADDRESS is set) and reports documents read, skipped and "
                    "why, held out, tokens, packed blocks, mixture shares and the first block. "
                    "Exit code 2 when a training run would fail on this data.")
    p.add_argument("--config", required=True, help="YAML config with a data section")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=512")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--max-files", type=int, default=None,
                   help="read at most N shards per source (a quick look at a big corpus)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or hub id (default: the config's model.base)")
    p.set_defaults(fn=cmd_data_preview)

    c = dsub.add_parser(
        "corpora", help="build the demo corpora (debian-manuals, python-docs, perl-docs) as parquet shards",
        description="Builds two real corpora from Debian documentation packages (installing "
                    "them with apt-get when missing): debian-manuals, the new domain, and "
                    "python-docs, the retention set. Each gets a README.md with its licence.")
    c.add_argument("--out", default=None,
                   help="output directory (default: $LLAMAPRO_CACHE/corpora or "
                        "~/.cache/llamapro/corpora)")
    c.add_argument("--force", action="store_true", help="rebuild even when up to date")
    c.add_argument("--max-mb", type=float, default=3.0, help="text per corpus, in MB")
    c.add_argument("--shards", type=int, default=4, help="parquet shards per corpus")
    c.add_argument("--no-install", action="store_true",
                   help="never run apt-get; fail naming the missing package instead")
    c.add_argument("--json", action="store_true", help="print the manifests as JSON")
    c.set_defaults(fn=cmd_data_corpora)


def cmd_data_corpora(a) -> int:
    from llamapro.data.corpora import CorpusError, build_corpora

    say = (lambda *_: None) if a.json else (lambda m: print(m, flush=True))
    try:
        res = build_corpora(a.out, max_bytes=int(a.max_mb * (1 << 20)), shards=a.shards,
                            install=not a.no_install, force=a.force, say=say)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if a.json:
        print(json.dumps(res, indent=2))
    return EXIT_OK


def _start_ray():
    """Connect to RAY_ADDRESS if set, else start a local cluster with spare logical CPUs: the
    tokenizer actors must never wait for CPUs that nothing will free (Ray Data then starves silently)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
    return True


def cmd_data_preview(a) -> int:
    from llamapro.config import load_config
    from llamapro.data import DataError, preview

    cfg = load_config(a.config, a.overrides)
    if not cfg.data.sources:
        print(f"error: {a.config} configures no data.sources", file=sys.stderr)
        return EXIT_BAD_INPUT
    tokenizer = a.tokenizer
    if tokenizer is None:
        from llamapro.demo import resolve_model

        tokenizer = resolve_model(cfg.model.base)
    started = _start_ray()
    try:
        _quiet_ray_data()
        report = preview(cfg.data, tokenizer, max_files=a.max_files)
    except DataError as e:  # a path that matches nothing, an unusable tokenizer
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if started:
            import ray

            ray.shutdown()
    if a.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_preview(report))
    return EXIT_OK if report["ok"] else EXIT_BAD_INPUT


def _quiet_ray_data():
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


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
