"""The evidence study (issue 17): llamapro against full fine-tuning, LoRA and freeze_last_n at an
equal token budget on the same data, each method at its own best learning rate, measured on what
the product promises (learn the new domain, forget nothing else).

    python benchmarks/study.py --config jobs/configs/study_demo.yaml --out runs/study [KEY=VALUE ...]

It drives the product's own path, in three steps, each resumable (run the same command again):

1. ``llamapro tune --config CFG run.output_dir=OUT`` (the experiment in OUT/<tune.name>): one Ray
   Tune experiment over train.mode x train.lr (tune.space + tune.mode_space); a baseline trial
   trains the unexpanded base at the same budget (``baseline_of``), a llamapro trial its own
   expansion; an interrupted experiment resumes.
2. The best trial of each method by the experiment's objective (``summary.json``'s
   ``best_by_mode``). With ``--partial`` (an experiment cut short), the completed trials are read
   from their run directories instead and ranked by the same objective.
3. ``llamapro compare --config CFG --out OUT METHOD=TRIAL_DIR ...``: the domain set, the replayed
   and the not-replayed retention sets, the knowledge battery (the base's answers scored once),
   greedy agreement; compare.md/.csv/.json and pareto.png in OUT (evaluations are reused).

A method whose best LR is the highest (or lowest) one it tried has not been judged at its best:
after the sweep, such methods get one more LR beyond that edge (the grid's own ratio between its two
outermost points) in an extension experiment, ``OUT/<tune.name>-ext1``, and so on up to
``--extend`` times (default 2). Every experiment's completed trials are ranked together.

``--variant KEY=V1,V2`` (repeatable: ``expand.blocks``, ``expand.placement``, ``train.num_stages``,
``train.compile``, ``data.sources.<name>.weight``, ...) adds llamapro's other shapes and settings:
one experiment per variant, ``OUT/<tune.name>-<key>``, one trial per value at llamapro's chosen LR
(everything else as the config). Several pairs in one variant (``"train.num_stages=1
train.lr=1e-4,1e-3"``) make one experiment over their combinations, and may give the shape LRs of
its own; the same keys given again with other values get ``-2``, ``-3`` (by position on the
command line: keep the order to resume). Each variant is its own row in the comparison and its
own point on the Pareto plot (``llamapro-blocks12``, ``llamapro-top``, ``llamapro-compileoff``),
judged beside the baselines.

Also written to OUT: ``chosen_lrs.json`` / ``chosen_lrs.md`` (each method's grid, the LR chosen
and its objective) and ``study.json`` (the command lines, the token budget, timings).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamapro.config import load_config  # noqa: E402
from llamapro.jsonl import read_records  # noqa: E402
from llamapro.tensors import write_json_atomic  # noqa: E402
from llamapro.tune.objective import objective_metrics  # noqa: E402
from llamapro.tune.plan import objective_sets  # noqa: E402
from llamapro.tune.space import LLAMAPRO_ONLY, method_points  # noqa: E402


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llamapro.cli", *args]


def _run(cmd: list[str], say) -> int:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT).returncode


def method_label(params: dict) -> str:
    """A trial's row name: its mode, plus llamapro's shape where the trial set one
    (``expand.blocks`` 12 -> ``llamapro-blocks12``; ``expand.placement`` top -> ``llamapro-top``)."""
    mode = params.get("train.mode") or "llamapro"
    parts = []
    for k in sorted(params):
        if k in ("train.mode", "train.lr") or (mode != "llamapro" and not k.startswith(LLAMAPRO_ONLY)):
            continue
        v = params[k]
        if k in ("expand.placement", "expand.strategy") and isinstance(v, str):
            parts.append(v)
        elif isinstance(v, (list, tuple)):
            parts.append(short_key(k) + "-".join(str(x) for x in v))
        else:
            parts.append(f"{short_key(k)}{v:g}" if isinstance(v, float) else f"{short_key(k)}{v}")
    return "-".join([mode, *parts])


def trials_from_dirs(exp: Path, cfg) -> list[dict]:
    """Completed trials read from their run directories (an experiment cut short has no
    summary): params from trial.json, the last held-out evaluation from metrics.jsonl, the base's
    losses from the experiment's cache, the objective as the experiment computes it."""
    domain, retention = objective_sets(cfg)
    sets = domain + retention
    baselines = [json.loads(p.read_text()) for p in sorted((exp / "baselines").glob("*.json"))]
    rows = []
    for td in sorted((exp / "trials").iterdir()) if (exp / "trials").is_dir() else []:
        if not ((td / "model" / "config.json").is_file() and (td / "trial.json").is_file()):
            continue  # not finished: the model is written at the end of the budget
        params = json.loads((td / "trial.json").read_text())["params"]
        evals = [e for e in read_records(td / "metrics.jsonl") if e.get("event") == "eval"]
        if not evals:
            continue
        losses = evals[-1]["eval_loss"]
        base = next((b for b in baselines if set(sets) <= set(b)), None)
        if base is None or not set(sets) <= set(losses):
            continue
        m = objective_metrics(losses, base, domain, retention, cfg.tune.forgetting_penalty,
                              cfg.tune.max_forgetting)
        rows.append({"trial_id": td.name, "trial_dir": str(td), "model": str(td / "model"),
                     "method": method_label(params),
                     "train.mode": params.get("train.mode"), "train.lr": params.get("train.lr"),
                     **{k: m[k] for k in ("domain_gain", "forgetting", "objective", "feasible")}})
    return rows


def edge_points(rows: list[dict], chosen: dict[str, dict]) -> dict[str, float]:
    """Methods whose chosen LR is the highest or the lowest of the LRs they completed: the next LR
    beyond that edge, one grid step further (the ratio between the two outermost LRs on that
    side). A method with one LR tried has no step to take."""
    out = {}
    for mode, b in chosen.items():
        if _method(b) != b["train.mode"]:
            continue  # a llamapro shape: judged at llamapro's chosen LR, not swept
        lrs = sorted({r["train.lr"] for r in rows if _method(r) == mode})
        lr = b["train.lr"]
        if len(lrs) < 2 or lr is None:
            continue
        if math.isclose(lr, lrs[-1], rel_tol=1e-9):
            nxt = lr * lrs[-1] / lrs[-2]
        elif math.isclose(lr, lrs[0], rel_tol=1e-9):
            nxt = lr * lrs[0] / lrs[1]
        else:
            continue
        if all(_on_ladder(v) for v in lrs):  # a 1-3-10 grid stays on it (1e-4 -> 3e-4, 3e-4 -> 1e-4)
            nxt = min(_ladder(nxt), key=lambda v: abs(math.log(v / nxt)))
        out[mode] = float(f"{nxt:.3g}")
    return out


def _ladder(x: float) -> list[float]:
    e = math.floor(math.log10(x))
    return [m * 10.0 ** k for k in (e - 1, e, e + 1) for m in (1, 3)]


def _on_ladder(x: float) -> bool:
    return any(math.isclose(x, v, rel_tol=1e-6) for v in _ladder(x))


def _experiment_config(cfg_path: str | Path, name: str, space: dict, mode_space: dict, header: str,
                       out: Path) -> Path:
    """The study config as its own experiment ``name`` with this tune space, written to
    OUT/<name>.yaml (paths in it stay relative to the repository)."""
    data = yaml.safe_load(Path(cfg_path).read_text())
    tune = data.setdefault("tune", {})
    tune["name"], tune["space"], tune["mode_space"] = name, space, mode_space
    path = out / f"{name}.yaml"
    path.write_text(f"# written by benchmarks/study.py: {header}\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def extension_config(cfg_path: str | Path, name: str, points: dict[str, float], out: Path) -> Path:
    """The study config with its tune space replaced by one LR per method to extend, as its own
    experiment ``name`` (written to OUT/<name>.yaml; paths in it stay relative to the repository)."""
    space = yaml.safe_load(Path(cfg_path).read_text()).get("tune", {}).get("space") or {}
    space = {k: v for k, v in space.items() if k not in ("train.mode", "train.lr")}
    first = next(iter(points.values()))
    return _experiment_config(
        cfg_path, name, {"train.mode": {"grid": list(points)}, "train.lr": {"grid": [points.get("llamapro", first)]},
                         **space},
        {m: {"train.lr": {"grid": [lr]}} for m, lr in points.items() if m != "llamapro"},
        "the LRs beyond the edge of the sweep", out)


def _method(r: dict) -> str:
    return r.get("method") or r["train.mode"]


def variant_config(cfg_path: str | Path, name: str, keys: dict[str, list], lr: float, out: Path) -> Path:
    """The study config as a llamapro-only experiment ``name``: one trial per combination of the
    ``keys``' values, at llamapro's chosen ``lr`` unless train.lr is one of the keys (written to
    OUT/<name>.yaml)."""
    space = {"train.mode": {"grid": ["llamapro"]}, "train.lr": {"grid": [lr]}}
    space.update({k: {"grid": list(v)} for k, v in keys.items()})
    return _experiment_config(cfg_path, name, space, {},
                              f"llamapro's shapes over {', '.join(keys)} at its chosen LR", out)


def parse_variant(spec: str) -> dict[str, list]:
    """``KEY=V1,V2`` -> {KEY: [V1, V2]} with YAML values; any config key but the mode (a key such as
    train.compile or data.sources.python-docs.weight then applies to the llamapro row only).
    Several ``KEY=...`` pairs separated by spaces form one experiment over their combinations; the
    LR may be one of them when another key is there too (``train.num_stages=1 train.lr=1e-4,1e-3``:
    a shape judged at LRs of its own)."""
    keys: dict[str, list] = {}
    for part in spec.split():
        key, sep, vals = part.partition("=")
        key = key.strip()
        if not sep or not vals.strip():
            raise ValueError(f"--variant {spec!r}: expected KEY=V1,V2 (e.g. expand.blocks=3,12)")
        if key == "train.mode" or "." not in key:
            raise ValueError(f"--variant {spec!r}: {key} is not a variant key (expand.blocks, expand.placement, "
                             "train.num_stages, train.compile, ...); modes are searched through tune.space")
        if key in keys:
            raise ValueError(f"--variant {spec!r}: {key} given twice")
        keys[key] = [_value(v) for v in vals.split(",")]
    if not keys:
        raise ValueError("--variant '': expected KEY=V1,V2 (e.g. expand.blocks=3,12)")
    if list(keys) == ["train.lr"]:
        raise ValueError(f"--variant {spec!r}: llamapro's LRs are searched through tune.space; train.lr "
                         "goes in a variant beside another key (train.num_stages=1 train.lr=1e-4,1e-3)")
    return keys


def short_key(key: str) -> str:
    """A key's short name in row and experiment names: its last part (expand.blocks -> blocks);
    a named list entry's key keeps the entry's name (data.sources.python-docs.weight ->
    python-docs-weight)."""
    parts = key.split(".")
    if parts[:2] == ["data", "sources"] and len(parts) == 4:
        return f"{parts[2]}-{parts[3]}"
    return parts[-1]


def _value(text: str):
    """A YAML scalar, except that on/off/yes/no stay words (train.compile: off, not False)."""
    v = yaml.safe_load(text)
    if isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(v)
        except ValueError:
            return v
    return text.strip() if isinstance(v, bool) and text.strip().lower() not in ("true", "false") else v


def best_by_mode(rows: list[dict]) -> dict[str, dict]:
    """The best feasible trial per row name (a mode, or a llamapro shape from --variant)."""
    out: dict[str, dict] = {}
    for r in rows:
        if not r["feasible"]:
            continue
        m = _method(r)
        if m not in out or r["objective"] > out[m]["objective"]:
            out[m] = r
    return out


def lr_table(cfg, chosen: dict[str, dict], tokens: int, rows: list[dict] | None = None,
             extended: dict[str, list[float]] | None = None) -> str:
    grids = {}
    for p in method_points(cfg.tune.space, cfg.tune.mode_space):
        grids.setdefault(p["train.mode"], []).append(p.get("train.lr"))
    for mode, lrs in (extended or {}).items():
        grids.setdefault(mode, []).extend(lrs)
    rows = rows or []
    swept = set(grids)
    for r in rows:  # llamapro's shapes (--variant): every LR they ran at
        if _method(r) not in swept:
            grids.setdefault(_method(r), []).append(r["train.lr"])
    by_lr = {(_method(r), r["train.lr"]): r["objective"] for r in rows}
    edge = edge_points(rows, chosen) if rows else {}
    lines = ["# Learning rates chosen by the sweep", "",
             f"Ray Tune over train.mode x train.lr, {tokens:,} training tokens per trial; "
             f"objective (maximised, the same for every method): domain gain - "
             f"{cfg.tune.forgetting_penalty:g} x max(0, forgetting), nats/token against the base. "
             "LRs marked + were added beyond the edge of the first grid because the best LR was "
             "on it.", "",
             "| method | LRs tried (objective) | chosen LR | objective | domain gain | forgetting | trial |",
             "|---|---|---|---|---|---|---|"]
    for mode, grid in grids.items():
        b = chosen.get(mode)
        ext = set((extended or {}).get(mode, []))
        g = ", ".join(f"{'+' if v in ext else ''}{v:g}"
                      + (f" ({by_lr[(mode, v)]:.3f})" if (mode, v) in by_lr else " (not completed)")
                      for v in sorted(set(grid)))
        if b is None:
            lines.append(f"| {mode} | {g} | (no completed trial) | | | | |")
            continue
        note = " (still the edge)" if mode in edge else ""
        lines.append(f"| {mode} | {g} | {b['train.lr']:g}{note} | {b['objective']:.4f} | {b['domain_gain']:.4f} "
                     f"| {b['forgetting']:.4f} | {b['trial_id']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a study config (e.g. jobs/configs/study_demo.yaml)")
    ap.add_argument("--out", required=True, help="the study directory (the experiment is OUT/<tune.name>)")
    ap.add_argument("--partial", action="store_true",
                    help="skip the tune step; compare the best completed trial of each method so far")
    ap.add_argument("--skip-compare", action="store_true", help="run the sweep only")
    ap.add_argument("--extend", type=int, default=2,
                    help="times a method whose best LR is on the edge of those tried gets one more "
                         "LR beyond it (0: never)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=V1,V2",
                    help="llamapro's other shapes at its chosen LR, one row each (e.g. expand.blocks=3,12 "
                         "or expand.placement=top,bottom); repeatable")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, passed to tune and compare")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = print
    overrides = [f"run.output_dir={out}", *a.overrides]
    cfg = load_config(a.config, overrides)
    try:
        variants = [parse_variant(v) for v in a.variant]
    except ValueError as e:
        say(f"error: {e}")
        return 2
    if "train.mode" not in cfg.tune.space:
        say("error: the study config's tune.space must search train.mode (llamapro and the baselines)")
        return 2
    exp = out / cfg.tune.experiment_name(cfg.run.name)
    t0 = time.time()
    timings = {}
    if not a.partial:
        from llamapro.pipeline import ensure_demo_corpora

        ensure_demo_corpora(cfg)  # a fresh machine: the demo corpora are built once, as `llamapro run` does
        code = _run(_cli("tune", "--config", a.config, *overrides), say)
        if code != 0:
            say(f"error: llamapro tune exited {code}; rerun the same command to resume, or "
                "--partial to compare the completed trials")
            return code
    # every experiment's completed trials, ranked together; extension k sees experiments 0..k-1
    # only, so a rerun asks for the same extensions (and resumes them)
    exps, extended = [exp], {}
    rows = trials_from_dirs(exp, cfg)
    chosen = best_by_mode(rows)
    for k in range(1, a.extend + 1):
        points = edge_points(rows, chosen)
        if not points:
            break
        name = f"{exp.name}-ext{k}"
        say("[study] best LR on the edge of those tried: "
            + ", ".join(f"{m} {chosen[m]['train.lr']:g} -> also {lr:g}" for m, lr in points.items())
            + f" (experiment {name})")
        if a.partial and not (out / name).is_dir():
            break
        if not a.partial:
            ext_cfg = extension_config(a.config, name, points, out)
            code = _run(_cli("tune", "--config", str(ext_cfg), *overrides), say)
            if code != 0:
                say(f"error: llamapro tune exited {code} on {name}; rerun the same command to resume")
                return code
        exps.append(out / name)
        for m, lr in points.items():
            extended.setdefault(m, []).append(lr)
        rows = [r for e in exps for r in trials_from_dirs(e, cfg)]
        chosen = best_by_mode(rows)
    names: list[str] = []
    for keys in variants:
        if "llamapro" not in chosen:
            say("error: --variant needs a completed llamapro trial (its chosen LR)")
            return 1
        name = first = f"{exp.name}-" + "-".join(short_key(k) for k in keys)
        n = 2
        while name in names:  # the same keys again with other values: their own experiment
            name, n = f"{first}-{n}", n + 1
        names.append(name)
        lr = chosen["llamapro"]["train.lr"]
        if not a.partial:
            var_cfg = variant_config(a.config, name, keys, lr, out)
            what = "; ".join(f"{k} in {v}" for k, v in keys.items())
            at = "" if "train.lr" in keys else f" at LR {lr:g}"
            say(f"[study] llamapro's shapes: {what}{at} (experiment {name})")
            code = _run(_cli("tune", "--config", str(var_cfg), *overrides), say)
            if code != 0:
                say(f"error: llamapro tune exited {code} on {name}; rerun the same command to resume")
                return code
        if (out / name).is_dir():
            exps.append(out / name)
        rows = [r for e in exps for r in trials_from_dirs(e, cfg)]
        chosen = best_by_mode(rows)
    timings["tune_s"] = round(time.time() - t0, 1)
    if not chosen:
        say(f"error: no completed trial in {exp}")
        return 1
    tc = cfg.train
    tokens = tc.total_steps(cfg.data.seq_len) * tc.micro_batch_size * tc.grad_accum * tc.num_workers \
        * cfg.data.seq_len
    write_json_atomic(out / "chosen_lrs.json", {m: {k: b.get(k) for k in (
        "trial_id", "train.lr", "objective", "domain_gain", "forgetting", "trial_dir")} for m, b in chosen.items()},
        indent=2)
    (out / "chosen_lrs.md").write_text(lr_table(cfg, chosen, tokens, rows, extended))
    say((out / "chosen_lrs.md").read_text())
    code = 0
    if not a.skip_compare:
        t1 = time.time()
        runs = [f"{m}={b['trial_dir']}" for m, b in chosen.items()]
        sets = [x for ov in overrides for x in ("--set", ov)]
        code = _run(_cli("compare", "--config", a.config, "--out", str(out), *sets, *runs), say)
        timings["compare_s"] = round(time.time() - t1, 1)
    write_json_atomic(out / "study.json", {"config": a.config, "overrides": overrides, "tokens_per_run": tokens,
                                            "partial": a.partial, "chosen": sorted(chosen),
                                            "experiments": [str(e) for e in exps], "extended_lrs": extended, **timings,
                                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                      indent=2)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
