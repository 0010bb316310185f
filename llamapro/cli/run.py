"""`llamapro run | train | tune`: the commands that start Ray (the whole pipeline, training one
run or a baseline, a Ray Tune search over placements and hyperparameters)."""

from __future__ import annotations

import sys

from llamapro.errors import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK


def ray_log(cfg, a):
    """Ray's own output (INFO logs, the workers' forwarded stdout/stderr, Ray Data's execution
    lines) into ``RUN/logs/ray.log`` while the command runs; the screen keeps the product's
    progress and Ray's warnings and errors. ``llamapro -v`` shows Ray's output on screen too."""
    from llamapro.pipeline import run_dir
    from llamapro.runtime import ray_log_file

    path = run_dir(cfg) / "logs" / "ray.log"
    print(f"Ray's logs: {path}" + ("" if getattr(a, "verbose", False) else " (llamapro -v shows them here too)"),
          flush=True)
    return ray_log_file(path, verbose=getattr(a, "verbose", False))


def cmd_run(a) -> int:
    """The main job: expand -> verify -> train -> evaluate/gate -> report -> export -> serve."""
    from llamapro.config import load_config
    from llamapro.pipeline import QUICK, run_pipeline

    cfg = load_config(a.config, (QUICK if a.quick else []) + a.overrides)
    with ray_log(cfg, a):
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
    with ray_log(cfg, a):
        res = train_step(cfg, mode=a.mode)
    print(f"trained model: {res['model']}\nmetrics: {res['out']}/metrics.jsonl")
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


def add_run_commands(subparsers) -> None:
    """Register run, train and tune on an argparse subparsers object."""
    r = subparsers.add_parser("run", help="run the whole pipeline of a config (the main job)")
    r.add_argument("--config", default=None, help="YAML config (default: built-in demo)")
    r.add_argument("--quick", action="store_true", help="a ~3-minute smoke run of every step")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. expand.blocks=4")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(fn=cmd_run)

    t = subparsers.add_parser("train", help="train the inserted blocks (or a baseline) with Ray Train + DeepSpeed")
    t.add_argument("--config", required=True, help="YAML config (model, expand, data, train sections)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.zero_stage=3")
    t.add_argument("--mode", choices=["llamapro", "full", "lora", "freeze_last_n"],
                   help="shortcut for train.mode")
    t.add_argument("--allow-unproven", action="store_true",
                   help="train an expansion whose identity proof failed or never ran (train.allow_unproven)")
    t.set_defaults(fn=cmd_train)

    tu = subparsers.add_parser("tune", help="search insertion positions, block counts, stage ratios, LR "
                                     "(Ray Tune over real training runs, ASHA-stopped)")
    tu.add_argument("--config", required=True, help="YAML config with a tune section (tune.space)")
    tu.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=8")
    tu.add_argument("--force", action="store_true",
                    help="start the experiment over instead of resuming an interrupted one")
    tu.set_defaults(fn=cmd_tune)
