"""`llamapro eval`, `llamapro export` and `llamapro compare`.

    llamapro eval --config jobs/configs/eval_demo.yaml [eval.gate.max_retention_ppl_increase=0.02 ...]
    llamapro eval --run runs/demo --heldout python-docs=held.npz --retention python-docs
    llamapro export runs/demo runs/demo-export [--force] [--max-shard-size 500MB]
    llamapro export s3://bucket/runs/demo s3://bucket/runs/demo/export

A run directory (--run, SOURCE, the config's) and OUT may be URIs: the step downloads what it reads
and uploads what it writes, as jobs/ do (llamapro.pipeline).

Exit codes: 0 ok; 1 unexpected error; 2 bad input (config, arguments, checkpoint, data);
4 the regression gate failed (eval only; one plain sentence on stderr says which threshold).

Importing this module imports neither torch nor ray (the CLI stays quick to start).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from llamapro.cli.exits import guarded
from llamapro.config import load_config
from llamapro.errors import EXIT_GATE_FAILED, EXIT_OK


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _kv(s: str) -> tuple[str, str]:
    import argparse

    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip(), v.strip()


def add_heldout_args(p) -> None:
    """--heldout / --retention / --domain / --prompts (eval and fuse --alpha auto)."""
    p.add_argument("--heldout", action="append", type=_kv, default=[], metavar="NAME=PATH",
                   help="a held-out set as arrays (.npz or .jsonl of input_ids/labels); repeatable. "
                        "Without it the config's data sources are read through Ray Data")
    p.add_argument("--retention", type=_csv, default=None, help="gate: retention set names (comma-separated)")
    p.add_argument("--domain", type=_csv, default=None, help="gate: new-domain set names (comma-separated)")
    p.add_argument("--prompts", default=None, help="regression prompts jsonl ('' to skip)")


def heldout_overrides(a) -> list[str]:
    """The dotted overrides that add_heldout_args' options stand for."""
    ov = []
    if a.retention is not None:
        ov.append(f"eval.gate.retention_sets={','.join(a.retention)}")
    if a.domain is not None:
        ov.append(f"eval.gate.domain_sets={','.join(a.domain)}")
    if a.prompts is not None:
        ov.append(f"eval.prompts={a.prompts}")
    return ov


def add_eval_commands(subparsers) -> None:
    """Register `eval` and `export` on an argparse subparsers object."""
    e = subparsers.add_parser(
        "eval", help="held-out perplexity and greedy agreement vs the base; regression gate; report",
        description="Evaluates a trained model against its base on held-out sets (loss, "
                    "perplexity) and regression prompts (greedy agreement), applies the "
                    "regression gate and writes RUN/eval/results.json and RUN/report/. "
                    "Exit 4 when the gate fails, 2 on bad input.")
    e.add_argument("--config", default=None, help="YAML config (sections run, model, data, eval)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_blocks=16")
    e.add_argument("--run", default=None, help="run directory (default: run.output_dir/run.name)")
    e.add_argument("--checkpoint", default=None, help="trained model directory (default: RUN/model)")
    e.add_argument("--base", default=None, help="base model directory to compare with "
                   "(default: the trained model with its new blocks skipped, when the originals were frozen)")
    add_heldout_args(e)
    e.add_argument("--no-gate", action="store_true", help="evaluate and report, never exit 4")
    e.add_argument("--no-report", action="store_true", help="skip the Markdown/HTML report")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--json", action="store_true", help="print the results JSON")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    e.set_defaults(fn=cmd_eval)

    x = subparsers.add_parser(
        "export", help="write a clean standard HF directory with a model card (adapters merged)",
        description="Exports RUN/model (or any checkpoint) to OUT: safetensors shards, tokenizer, "
                    "generation config, llamapro.json lineage and a model card README.md. Written "
                    "atomically; an existing OUT is replaced only with --force.")
    x.add_argument("source", metavar="RUN_OR_CHECKPOINT")
    x.add_argument("out", metavar="OUT")
    x.add_argument("--config", default=None, help="YAML config with an export section")
    x.add_argument("--force", action="store_true", help="replace OUT if it exists")
    x.add_argument("--max-shard-size", default=None, help="largest safetensors shard, e.g. 500MB")
    x.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto keeps the checkpoint's dtype (needed for an exact strip rollback)")
    x.add_argument("--base-model", default=None, help="hub id for the model card's base_model")
    x.add_argument("--format", default="hf", choices=["hf", "gguf", "torchao-int8", "torchao-int4", "gptq", "awq"],
                   help="hf: safetensors directory (default); gguf: one llama.cpp/Ollama file; "
                        "torchao-*: weight-only quantized HF directory; gptq/awq: needs a GPU")
    x.add_argument("--quant", default=None, help="gguf: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1")
    x.add_argument("--trust-remote-code", action="store_true")
    x.add_argument("--json", action="store_true")
    x.add_argument("-q", "--quiet", action="store_true")
    x.set_defaults(fn=cmd_export)


def _say(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: print(f"[eval] {m}", file=sys.stderr, flush=True))


@guarded
def cmd_eval(a) -> int:
    """Returns 0 (gate passed or disabled), 2 (bad input) or 4 (gate failed). A URI run directory
    (--run, or the config's) is downloaded first and eval/ and report/ uploaded after."""
    from llamapro.eval import format_results, load_heldout_file
    from llamapro.pipeline import eval_step

    ov = list(a.overrides or []) + heldout_overrides(a)
    if a.base:
        ov.append(f"eval.base={a.base}")
    if a.no_gate:
        ov.append("eval.gate.enabled=false")
    if a.no_report:
        ov.append("eval.report=false")
    cfg = load_config(a.config, ov)
    heldout = {n: load_heldout_file(n, p) for n, p in a.heldout} if a.heldout else None
    res = eval_step(cfg, run=a.run, checkpoint=a.checkpoint, heldout=heldout,
                    trust_remote_code=a.trust_remote_code or None, say=_say(a.quiet))
    print(json.dumps(res, indent=2, ensure_ascii=False) if a.json else format_results(res), flush=True)
    if not res["gate"]["passed"]:
        print(res["gate"]["summary"], file=sys.stderr, flush=True)
        return EXIT_GATE_FAILED
    return EXIT_OK


@guarded
def cmd_export(a) -> int:
    """Returns 0 (exported) or 2 (bad input: OUT exists without --force, unreadable checkpoint).
    SOURCE and OUT may be URIs (a run behind a URI: model/, eval/, config.yaml downloaded)."""
    from llamapro.pipeline import export_step

    fmt = getattr(a, "format", "hf")
    cfg = load_config(a.config, [])
    if fmt != "hf":
        res = export_step(cfg, a.source, a.out, force=a.force, fmt=fmt, quant=a.quant,
                          trust_remote_code=a.trust_remote_code, say=_say(a.quiet))
        print(json.dumps(res, indent=2) if a.json else
              f"exported -> {res['path']} ({fmt}, {res['bytes'] / 2**20:.1f} MiB)")
        return EXIT_OK
    xc = cfg.export
    xc = dataclasses.replace(xc, max_shard_size=a.max_shard_size or xc.max_shard_size, dtype=a.dtype or xc.dtype,
                             base_model=a.base_model or xc.base_model)
    res = export_step(dataclasses.replace(cfg, export=xc), a.source, a.out, force=a.force,
                      trust_remote_code=a.trust_remote_code or None, say=_say(a.quiet))
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print_export(res)
    return EXIT_OK


def print_export(res: dict) -> None:
    """What `llamapro export` and jobs/export.py print for an HF export."""
    print(f"exported -> {res['out']} ({res['num_layers']} layers, {res['dtype']}, "
          f"{len(res['shards'])} shard(s), fingerprint {res['fingerprint']})")
    if res["merged_adapter"]:
        print(f"merged adapter {res['merged_adapter']}")
    if res["gate"]:
        print(res["gate"]["summary"])
    if res["stale_partial_exports"]:
        print(f"note: partial exports left by interrupted runs (safe to delete): "
              f"{', '.join(res['stale_partial_exports'])}", file=sys.stderr)


def add_compare_command(subparsers) -> None:
    """Register `compare` on an argparse subparsers object."""
    from llamapro.eval import compare

    c = subparsers.add_parser(
        "compare", help="learning vs forgetting: evaluate trained runs side by side (table, Pareto plot, "
                        "verdicts)",
        description=compare.__doc__.split("\n\n")[0])
    c.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR",
                   help="trained run directories, e.g. llamapro=runs/demo full=runs/demo/baseline-full")
    c.add_argument("--config", required=True, help="a config with eval (and data) sections, e.g. "
                                                    "jobs/configs/eval_demo.yaml")
    c.add_argument("--out", required=True, help="directory for compare.md/.csv/.json and pareto.png")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override (repeatable), e.g. --set eval.battery.limit=200")
    c.set_defaults(fn=cmd_compare)


@guarded
def cmd_compare(a) -> int:
    """Returns 0, or 2 (bad input: a missing run, a label twice, a bad config)."""
    from pathlib import Path

    from llamapro.eval.compare import parse_runs, run_compare

    cfg = load_config(a.config, a.overrides)  # run_eval writes no report: one table for all runs
    res = run_compare(cfg, parse_runs(a.runs), a.out, say=lambda m: print(m, flush=True))
    print(Path(res["table"]).read_text().split("## Verdicts")[0].strip())
    for k, v in res["verdicts"].items():
        print(f"{k}: {v}")
    print(f"table {res['table']}; plot {res['pareto_png']}")
    return EXIT_OK
