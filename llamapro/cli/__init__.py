"""`llamapro <verb>`: the command line. Each verb calls the same library function as jobs/.

Exit codes (``llamapro.errors``): 0 success; 1 a failure while running; 2 bad input (config,
arguments, checkpoint); 3 identity proof failed; 4 a regression gate failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llamapro.cli.exits import guarded, interrupted, report
from llamapro.errors import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK, LlamaproError


def _positions(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--positions takes comma-separated integers (indices of the new blocks in the "
            f"expanded model), got {s!r}") from None


def _writers(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def cmd_expand(a) -> int:
    from llamapro.expand import api as steps

    meta = steps.expand(a.base, a.out, blocks=a.blocks, strategy=a.strategy, positions=a.positions,
                        residual_writers=a.residual_writers, verify=not a.no_verify, force=a.force,
                        trust_remote_code=a.trust_remote_code, progress=not a.quiet,
                        durable=not a.no_fsync)
    print(steps.dumps(meta) if a.json else f"expanded -> {a.out}\n{steps.summary(meta)}")
    return EXIT_OK


def cmd_verify(a) -> int:
    from llamapro.expand import api as steps

    meta = steps.verify_checkpoint(a.checkpoint, base=a.base, max_new_tokens=a.max_new_tokens,
                                   trust_remote_code=a.trust_remote_code)  # IdentityError: exit 3
    print(steps.dumps(meta["verification"]) if a.json else steps.summary(meta))
    return EXIT_OK


def cmd_strip(a) -> int:
    from llamapro.expand import api as steps

    if a.pack is not None:  # one pack of an applied model; the others stay
        from llamapro.publish.pack import strip_pack

        res = strip_pack(a.checkpoint, a.out, a.pack, force=a.force, progress=not a.quiet)
        print(steps.dumps(res) if a.json else
              f"removed pack {res['removed']} -> {a.out}: " + (
                  f"packs {[p['name'] for p in res['packs']]} remain, as `llamapro apply` of them writes"
                  if res["packs"] else "the base, bit for bit" if res["equals_base"] else "the base's layers"))
        return EXIT_OK
    res = steps.strip(a.checkpoint, a.out, force=a.force, progress=not a.quiet)
    if a.json:
        print(steps.dumps(res))
    else:
        print(f"stripped layers {res['removed_layers']} -> {a.out}")
        print("tensors and config equal the recorded base bit for bit" if res["equals_base"] else
              "the result differs from the recorded base (the original layers were trained, or "
              "the base was modified): it has the base's architecture, not its exact weights")
    return EXIT_OK


def cmd_pack(a) -> int:
    from llamapro.expand import api as steps
    from llamapro.pipeline import pack_step

    res = pack_step(a.source, a.out, force=a.force, name=a.name, trust_remote_code=a.trust_remote_code)
    print(steps.dumps(res) if a.json else
          f"pack {res['name']} -> {a.out}: {len(res['positions'])} blocks at {res['positions']} of "
          f"{res['num_layers']} layers, {res['blocks']['bytes'] / 1e6:.1f} MB\nfor the base {res['base_fingerprint']}")
    return EXIT_OK


def cmd_apply(a) -> int:
    from llamapro.expand import api as steps
    from llamapro.publish.pack import apply_packs

    res = apply_packs(a.base, a.packs, a.out, force=a.force, progress=not a.quiet)
    if a.json:
        print(steps.dumps(res))
    else:
        for p in res["packs"]:
            print(f"pack {p['name']} ({p['mode']}) at layers {p['positions']}")
        print(f"applied -> {a.out} ({res['num_layers']} layers)\nidentity     PROVEN on the tensors: "
              f"{res['verification']['statement']}")
        if res["equals_trained_model"]:
            print("the result is the trained model the last pack was made from (same fingerprint)")
    return EXIT_OK


def cmd_demo_model(a) -> int:
    from llamapro.demo import ensure_demo_model

    print(ensure_demo_model())
    return EXIT_OK


def cmd_run(a) -> int:
    """The main job: expand -> verify -> train -> evaluate/gate -> report -> export -> serve."""
    from llamapro.config import load_config
    from llamapro.pipeline import QUICK, run_pipeline

    cfg = load_config(a.config, (QUICK if a.quick else []) + a.overrides)
    s = run_pipeline(cfg, quick=a.quick)
    print(f"\ndone in {s['seconds']:.0f} s; report: {s['report']}")
    print(f"identity of the expansion: max |dlogits| = {s['identity']['max_abs_logit_diff']}, "
          f"greedy generation equal: {s['identity']['generation_equal']}")
    failed = []
    for name, ev in s["eval"].items():
        for set_name, st in (ev.get("sets") or {}).items():
            print(f"{name:<14} {set_name:<18} [{st['role']}] perplexity {st['base']['ppl']:.3f} -> "
                  f"{st['trained']['ppl']:.3f} ({st['ppl_change']:+.2%})")
        g = ev.get("gate") or {}
        print(f"{name:<14} gate: {g.get('summary', 'n/a')}")
        if g and not g.get("passed", True):
            failed.append(name)
    print(f"served answer ({s['serve']['model']}): {s['serve']['answer']!r}")
    print(f"export: {s['export']}")
    return EXIT_GATE_FAILED if "llamapro" in failed else EXIT_OK


def cmd_train(a) -> int:
    from llamapro.config import load_config
    from llamapro.pipeline import train_step

    # --mode derives a baseline as `run.baselines` does (same budget, one stage, nothing that only
    # applies to llamapro); `train.mode=...` as an override still means exactly that config
    cfg = load_config(a.config, a.overrides + (["train.allow_unproven=true"] if a.allow_unproven else []))
    res = train_step(cfg, mode=a.mode)
    print(f"trained model: {res['model']}\nmetrics: {res['out']}/metrics.jsonl")
    return EXIT_OK


@guarded
def cmd_fuse(a) -> int:
    """0 fused; 2 bad input; 4 --alpha auto: no alpha of the grid passes the regression gate.
    SOURCE and OUT may be URIs (a run behind a URI is downloaded, its fusion/ and report/ uploaded)."""
    from llamapro.cli.eval import heldout_overrides
    from llamapro.config import load_config
    from llamapro.eval import load_heldout_file
    from llamapro.pipeline import fuse_step
    from llamapro.publish.fuse import format_fusion

    ov = list(a.overrides) + heldout_overrides(a) + [
        f"{k}={v}" for k, v in (("fuse.method", a.method), ("fuse.alpha", a.alpha), ("fuse.alphas", a.alphas),
                                ("fuse.base", a.base), ("export.max_shard_size", a.max_shard_size),
                                ("export.dtype", a.dtype), ("export.base_model", a.base_model)) if v is not None]
    say = (lambda m: None) if a.quiet else (lambda m: print(f"[fuse] {m}", file=sys.stderr, flush=True))
    cfg = load_config(a.config, ov)
    heldout = {n: load_heldout_file(n, p) for n, p in a.heldout} or None
    res = fuse_step(cfg, a.source, a.out, heldout=heldout, force=a.force, alpha_given=a.alpha is not None,
                    trust_remote_code=a.trust_remote_code or None, say=say)  # NoAlphaPassesGate: exit 4
    print(json.dumps(res, indent=2) if a.json else format_fusion(res), flush=True)
    return EXIT_OK


def cmd_tune(a) -> int:
    """A Ray Tune experiment over insertion positions, block counts, stage ratios, LR, any key."""
    from llamapro.config import load_config
    from llamapro.tune import format_summary, run_tune

    s = run_tune(load_config(a.config, a.overrides), force=a.force)
    print(format_summary(s))
    if s["status"].get("unfinished"):
        print("some trials did not finish: run the same command again to resume", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if s.get("best") else EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamapro", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    e = sub.add_parser("expand", help="insert identity blocks into a model and prove identity")
    e.add_argument("base", help="HF model directory, hub id, or demo:smollm2-135m-instruct")
    e.add_argument("out", help="output directory (must not exist unless --force)")
    e.add_argument("--blocks", type=int, help="number of new blocks (N >= 1)")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--strategy", default="even", choices=["even", "top", "bottom", "middle"])
    g.add_argument("--positions", type=_positions,
                   help="comma-separated indices of the new blocks in the expanded model")
    e.add_argument("--residual-writers", type=_writers,
                   help="for an unlisted family: module paths that write into the residual stream")
    e.add_argument("--no-verify", action="store_true", help="skip the numerical proof")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")
    e.add_argument("--no-fsync", action="store_true",
                   help="publish without waiting for the data to reach the disk (like cp; for "
                        "scratch output uploaded right away)")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--json", action="store_true", help="print the metadata as JSON")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(fn=cmd_expand)

    v = sub.add_parser("verify", help="prove an expanded checkpoint computes what its base computed")
    v.add_argument("checkpoint")
    v.add_argument("--base", help="base model (default: the recorded base, else new blocks skipped)")
    v.add_argument("--max-new-tokens", type=int, default=16)
    v.add_argument("--trust-remote-code", action="store_true")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_verify)

    s = sub.add_parser("strip", help="remove the new blocks again (rollback to the base)")
    s.add_argument("checkpoint")
    s.add_argument("out")
    s.add_argument("--force", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--pack", default=None, metavar="NAME",
                   help="of a model made by `llamapro apply`: remove only this pack (name or stack "
                        "position, 0 first); the result equals `apply` of the others")
    s.set_defaults(fn=cmd_strip)

    pk = sub.add_parser("pack", help="the inserted blocks of a trained run as a small pack for its base")
    pk.add_argument("source", metavar="RUN_OR_MODEL")
    pk.add_argument("out", metavar="OUT")
    pk.add_argument("--name", default=None, help="the pack's name (default: OUT's name)")
    pk.add_argument("--force", action="store_true", help="replace OUT if it exists")
    pk.add_argument("--trust-remote-code", action="store_true")
    pk.add_argument("--json", action="store_true")
    pk.set_defaults(fn=cmd_pack)

    ap = sub.add_parser("apply", help="a standard checkpoint from a base and packs (stacked in order)")
    ap.add_argument("base", help="the base model the packs were made for (checked by fingerprint)")
    ap.add_argument("packs", nargs="+", metavar="PACK")
    ap.add_argument("out", metavar="OUT")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.set_defaults(fn=cmd_apply)

    d = sub.add_parser("demo-model", help="convert the bundled SmolLM2 GGUF to a cached HF directory")
    d.set_defaults(fn=cmd_demo_model)

    r = sub.add_parser("run", help="run the whole pipeline of a config (the main job)")
    r.add_argument("--config", default=None, help="YAML config (default: built-in demo)")
    r.add_argument("--quick", action="store_true", help="a ~3-minute smoke run of every step")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. expand.blocks=4")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("train", help="train the inserted blocks (or a baseline) with Ray Train + DeepSpeed")
    t.add_argument("--config", required=True, help="YAML config (model, expand, data, train sections)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.zero_stage=3")
    t.add_argument("--mode", choices=["llamapro", "full", "lora", "freeze_last_n"],
                   help="shortcut for train.mode")
    t.add_argument("--allow-unproven", action="store_true",
                   help="train an expansion whose identity proof failed or never ran (train.allow_unproven)")
    t.set_defaults(fn=cmd_train)

    tu = sub.add_parser("tune", help="search insertion positions, block counts, stage ratios, LR "
                                     "(Ray Tune over real training runs, ASHA-stopped)")
    tu.add_argument("--config", required=True, help="YAML config with a tune section (tune.space)")
    tu.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=8")
    tu.add_argument("--force", action="store_true",
                    help="start the experiment over instead of resuming an interrupted one")
    tu.set_defaults(fn=cmd_tune)

    # each step's commands live beside it
    from llamapro.cli.data import add_data_commands
    from llamapro.cli.eval import add_eval_commands, add_heldout_args
    from llamapro.cli.serve import add_serve_commands

    add_data_commands(sub)
    add_eval_commands(sub)
    from llamapro.eval.compare import add_compare_command

    add_compare_command(sub)
    add_serve_commands(sub)

    f = sub.add_parser("fuse", help="a trained run as one standard HF model, with a fusion strength alpha",
                       description="residual: the trained blocks as they are (adapters merged). weighted: "
                       "each inserted block = (1 - alpha) x identity init + alpha x trained; alpha 0 is the "
                       "base, 1 the trained model; auto picks the largest new-domain gain that passes the "
                       "regression gate on the held-out sets. Written atomically like `export`.")
    f.add_argument("source", metavar="RUN_OR_CHECKPOINT")
    f.add_argument("out", metavar="OUT")
    f.add_argument("--method", choices=["residual", "weighted"], default=None, help="default: fuse.method")
    f.add_argument("--alpha", default=None, help="weighted: a number in [0, 1], or auto")
    f.add_argument("--alphas", default=None, help="the grid --alpha auto evaluates, e.g. 0,0.25,0.5,0.75,1")
    f.add_argument("--base", default=None, help="base to rebuild the identity init from "
                   "(default: the recorded base, else the frozen originals)")
    f.add_argument("--config", default=None, help="YAML config (sections data, eval, export, fuse)")
    f.add_argument("overrides", nargs="*", help="dotted overrides, right after OUT, e.g. eval.max_blocks=8")
    add_heldout_args(f)
    f.add_argument("--force", action="store_true", help="replace OUT if it exists")
    f.add_argument("--max-shard-size", default=None, help="largest safetensors shard, e.g. 500MB")
    f.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    f.add_argument("--base-model", default=None, help="hub id for the model card's base_model")
    f.add_argument("--trust-remote-code", action="store_true")
    f.add_argument("--json", action="store_true")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(fn=cmd_fuse)
    return p


def main(argv=None) -> int:
    """``llamapro ARGV``: the exit code. A deliberate llamapro error prints one line and exits with
    its own code (``llamapro.errors``); anything else is a bug and raises with its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except LlamaproError as e:  # e.g. a TrainingError: the workers' own lines, not Ray's traceback
        return report(e)
    except KeyboardInterrupt:
        return interrupted()


if __name__ == "__main__":
    sys.exit(main())
