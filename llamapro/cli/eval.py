"""`llamapro eval` and `llamapro export`.

    llamapro eval --config jobs/configs/eval_demo.yaml [eval.gate.max_retention_ppl_increase=0.02 ...]
    llamapro eval --run runs/demo --heldout python-docs=held.npz --retention python-docs
    llamapro export runs/demo runs/demo-export [--force] [--max-shard-size 500MB]

Exit codes: 0 ok; 1 unexpected error; 2 bad input (config, arguments, checkpoint, data);
4 the regression gate failed (eval only; one plain sentence on stderr says which threshold).

Importing this module imports neither torch nor ray (the CLI stays quick to start).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from llamapro.config.eval import EXIT_GATE_FAILED, EvalConfig, ExportConfig

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2  # as in llamapro.cli


def config_class():
    """The config tree with the sections eval/export need. Uses llamapro.config.Config as is when
    it already has them; otherwise extends it (until the lead wires `eval:` and `export:` in)."""
    from llamapro.config import Config
    from llamapro.config.train import TrainConfig

    have = {f.name for f in dataclasses.fields(Config)}
    extra = [(n, t, dataclasses.field(default_factory=t))
             for n, t in (("train", TrainConfig), ("eval", EvalConfig), ("export", ExportConfig))
             if n not in have]
    if not extra:
        return Config
    return dataclasses.make_dataclass("Config", extra, bases=(Config,))


def load(path, overrides):
    from llamapro.config import load_config

    return load_config(path, overrides, cls=config_class())


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


def cmd_eval(a) -> int:
    """Returns 0 (gate passed or disabled), 2 (bad input) or 4 (gate failed)."""
    from llamapro.config import ConfigError
    from llamapro.eval import EvalError, format_results, load_heldout_file, run_eval

    ov = list(a.overrides or []) + heldout_overrides(a)
    if a.base:
        ov.append(f"eval.base={a.base}")
    if a.no_gate:
        ov.append("eval.gate.enabled=false")
    if a.no_report:
        ov.append("eval.report=false")
    from llamapro.checkpoint import CheckpointError
    from llamapro.expand.families import UnsupportedModelError

    try:
        cfg = load(a.config, ov)
        heldout = {n: load_heldout_file(n, p) for n, p in a.heldout} if a.heldout else None
        res = run_eval(cfg, run_dir=a.run, checkpoint=a.checkpoint, heldout=heldout,
                       trust_remote_code=a.trust_remote_code or None, say=_say(a.quiet))
    except (EvalError, ConfigError, CheckpointError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(res, indent=2, ensure_ascii=False) if a.json else format_results(res))
    if not res["gate"]["passed"]:
        print(res["gate"]["summary"], file=sys.stderr)
        return EXIT_GATE_FAILED
    return EXIT_OK


def cmd_export(a) -> int:
    """Returns 0 (exported) or 2 (bad input: OUT exists without --force, unreadable checkpoint)."""
    from llamapro.checkpoint import CheckpointError
    from llamapro.config import ConfigError
    from llamapro.publish.export import export
    from llamapro.expand.families import UnsupportedModelError

    if getattr(a, "format", "hf") != "hf":
        from llamapro.publish.export import export_format

        try:
            res = export_format(a.format, a.source, a.out, quant=a.quant, force=a.force,
                                trust_remote_code=a.trust_remote_code, say=_say(a.quiet))
        except (ConfigError, CheckpointError, UnsupportedModelError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(json.dumps(res, indent=2) if a.json else
              f"exported -> {res['path']} ({a.format}, {res['bytes'] / 2**20:.1f} MiB)")
        return EXIT_OK
    try:
        cfg = load(a.config, [])
        xc: ExportConfig = cfg.export
        if a.max_shard_size or a.dtype:
            xc = dataclasses.replace(xc, max_shard_size=a.max_shard_size or xc.max_shard_size,
                                     dtype=a.dtype or xc.dtype)
        res = export(a.source, a.out, force=a.force or xc.force, max_shard_size=xc.max_shard_size,
                     dtype=xc.dtype, trust_remote_code=a.trust_remote_code or cfg.model.trust_remote_code,
                     base_model=a.base_model or xc.base_model or None, license=xc.license or None,
                     say=_say(a.quiet))
    except (ConfigError, CheckpointError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"exported -> {res['out']} ({res['num_layers']} layers, {res['dtype']}, "
              f"{len(res['shards'])} shard(s), fingerprint {res['fingerprint']})")
        if res["merged_adapter"]:
            print(f"merged adapter {res['merged_adapter']}")
        if res["gate"]:
            print(res["gate"]["summary"])
        if res["stale_partial_exports"]:
            print(f"note: partial exports left by interrupted runs (safe to delete): "
                  f"{', '.join(res['stale_partial_exports'])}", file=sys.stderr)
    return EXIT_OK
