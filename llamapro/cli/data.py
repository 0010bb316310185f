"""`llamapro data preview` and `llamapro data corpora`.

    llamapro data corpora [--out DIR] [--force]
    llamapro data preview --config jobs/configs/data_demo.yaml [--json] [--max-files N] [k=v ...]

Importing this module imports neither ray nor transformers (the CLI stays quick to start).
"""

from __future__ import annotations

import contextlib
import json
import sys

from llamapro.errors import EXIT_BAD_INPUT, EXIT_OK, CorpusError, DataError
from llamapro.runtime import ensure_ray, spare_cpus


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
        "corpora",
        help="build the demo corpora (debian-manuals, python-docs, perl-docs) as parquet shards",
        description="Builds three real corpora from Debian documentation packages (installing "
                    "them with apt-get when missing): debian-manuals, the new domain, and "
                    "python-docs and perl-docs, the retention sets. Each gets a README.md with its "
                    "licence.")
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
    from llamapro.data.corpora import build_corpora

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


def cmd_data_preview(a) -> int:
    from llamapro.config import load_config
    from llamapro.data import format_preview, preview

    cfg = load_config(a.config, a.overrides)
    if not cfg.data.sources:
        print(f"error: {a.config} configures no data.sources", file=sys.stderr)
        return EXIT_BAD_INPUT
    tokenizer = a.tokenizer
    if tokenizer is None:
        from llamapro.demo import resolve_model

        tokenizer = resolve_model(cfg.model.base)
    # RAY_ADDRESS's cluster, else a local one with spare CPUs for the tokenizer actors
    started = ensure_ray("data", num_cpus=spare_cpus(), include_dashboard=False,
                         log_to_driver=False)
    try:
        with _quiet_ray_data():
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


@contextlib.contextmanager
def _quiet_ray_data():
    """Ray Data without progress bars or INFO lines for the block; what it changed is put back
    (the CLI runs in-process in tests and notebooks: a raised ``ray.data`` level must not stay)."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    lg = logging.getLogger("ray.data")
    old = ctx.enable_progress_bars, ctx.print_on_execution_start, lg.level
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = old[:2]
        lg.setLevel(old[2])
