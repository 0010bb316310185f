"""An experiment's outputs: one row per trial (from Tune's results, the scheduler's stops and the
trial's directory), the best trial, ``results.csv``, ``results.md``, ``best.yaml``, the summary and
its one-screen text."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import yaml

from llamapro.artifacts import read_metadata
from llamapro.config import Config, from_dict
from llamapro.jsonl import read_records
from llamapro.tune.plan import STOPS_FILE, TunePlan
from llamapro.tune.plot import plot_pareto
from llamapro.tune.space import flat_params, space_keys


def _stops(exp_dir: Path) -> dict:
    return {rec["trial_id"]: rec for rec in read_records(exp_dir / STOPS_FILE) if "trial_id" in rec}


def _trial_id_of(result) -> str | None:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return tid
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(str(result.path)).name)
    return m.group(1) if m else None


def _cell(v):
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v


def _reachable_checkpoint(reported: str | None, rd: Path) -> str | None:
    """The checkpoint of the last report Tune saw, or, when Train has since rotated it out (a
    stopped trial may report a little beyond the step Tune acted on), the trial's newest one."""
    if reported and Path(reported).is_dir():
        return reported
    found = sorted((rd / "ray").glob("train-*/checkpoint_*/trainer_state.json"))
    return str(found[-1].parent) if found else None


def collect_rows(grid, plan: TunePlan) -> list[dict]:
    """One row per trial: its sampled values, where its blocks went, how far it got, its losses,
    gain, forgetting, objective, status and where its checkpoint and model are."""
    exp_dir = Path(plan.exp_dir)
    stops = _stops(exp_dir)
    sets = plan.domain_sets + plan.retention_sets
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        tid = _trial_id_of(r)
        rd = exp_dir / "trials" / str(tid)
        if m.get("final"):
            status = "completed"
        elif tid in stops:
            status = f"stopped early ({stops[tid]['reason']}, step {stops[tid]['step']})"
        elif r.error is not None:
            status = "error"
        else:
            status = "unfinished"
        meta = read_metadata(rd / "expanded") if (rd / "expanded").is_dir() else None
        row = {"trial_id": tid, "status": status}
        params = flat_params(r.config)
        row.update({k: _cell(params.get(k)) for k in space_keys(plan.space, plan.mode_space)})
        row["new_layers"] = _cell(meta.new_layer_indices) if meta else None
        row["num_layers"] = meta.num_layers if meta else None
        row.update({"step": m.get("step"), "tokens": m.get("tokens")})
        for s in sets:
            row[f"base_loss/{s}"] = _cell(m.get(f"base_loss/{s}"))
            row[f"eval_loss/{s}"] = _cell(m.get(f"eval_loss/{s}"))
        for k in ("domain_gain", "forgetting", "objective", "feasible"):
            row[k] = _cell(m.get(k))
        row["checkpoint"] = _reachable_checkpoint(m.get("checkpoint_path"), rd)
        row["model"] = str(rd / "model") if (rd / "model" / "config.json").is_file() else None
        row["trial_dir"] = str(rd)
        row["error"] = str(r.error).strip().splitlines()[-1][:300] if r.error is not None else ""
        rows.append(row)
    rows.sort(key=lambda x: (x["objective"] is None, -(x["objective"] or 0.0)))
    return rows


def pick_best(rows: list[dict]) -> dict | None:
    """The completed, feasible trial with the highest objective (early-stopped trials never ran
    their whole budget, so they are not candidates)."""
    pool = [r for r in rows if r["status"] == "completed" and r["objective"] is not None and r["feasible"]]
    return max(pool, key=lambda r: r["objective"]) if pool else None


def pick_best_by_mode(rows: list[dict]) -> dict[str, dict]:
    """A method comparison: per train.mode, its own best trial by the same objective (each method
    at its own best learning rate; never one LR chosen for all)."""
    out = {}
    for mode in dict.fromkeys(r.get("train.mode") for r in rows if r.get("train.mode")):
        best = pick_best([r for r in rows if r.get("train.mode") == mode])
        if best is not None:
            out[mode] = best
    return out


def _md(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3g}"
    return str(v).replace("|", "\\|")


def write_outputs(rows: list[dict], plan: TunePlan) -> dict:
    exp_dir = Path(plan.exp_dir)
    cols = list(rows[0]) if rows else ["trial_id", "status"]
    with open(exp_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    best = pick_best(rows)
    by_mode = pick_best_by_mode(rows) if "train.mode" in plan.space else {}
    show = ["trial_id", "status", *space_keys(plan.space, plan.mode_space), "new_layers", "step",
            "domain_gain", "forgetting",
            "objective", "feasible", "checkpoint"]
    lines = [f"# Tune experiment {plan.name}", "",
             f"Objective (maximised): domain gain on {', '.join(plan.domain_sets)} "
             f"- {plan.penalty:g} x max(0, forgetting on {', '.join(plan.retention_sets) or 'no set'}), "
             "in nats/token against the base (= each trial's step-0 model)."
             + (f" Feasible: forgetting <= {plan.max_forgetting}." if plan.max_forgetting is not None else ""),
             "", "| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    for r in rows:
        cells = [_md(r.get(c)) for c in show]
        if best is not None and r["trial_id"] == best["trial_id"]:
            cells[0] = f"**{cells[0]}** (best)"
        elif any(b["trial_id"] == r["trial_id"] for b in by_mode.values()):
            cells[0] = f"**{cells[0]}** (best {r['train.mode']})"
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best: `{best['trial_id']}`; its config: `best.yaml` "
                      f"(`llamapro train --config {exp_dir / 'best.yaml'}`)."]
    best_by_mode = {}
    if by_mode:
        lines += ["", "Best per method (each at its own best point by the same objective):", ""]
        for mode, b in by_mode.items():
            path = write_best_config(b, plan, f"best-{mode}.yaml")
            best_by_mode[mode] = {k: b.get(k) for k in ("trial_id", "train.lr", "domain_gain",
                                                        "forgetting", "objective", "model", "trial_dir")}
            best_by_mode[mode].update({k: b.get(k) for k in space_keys(plan.space, plan.mode_space)})
            best_by_mode[mode]["config"] = str(path)
            lines.append(f"- {mode}: `{b['trial_id']}` lr {_md(b.get('train.lr'))}, objective "
                         f"{_md(b['objective'])} (gain {_md(b['domain_gain'])}, forgetting "
                         f"{_md(b['forgetting'])}); config `{path.name}`")
        missing = [m for m in plan.space["train.mode"]["grid"] if m not in by_mode]
        if missing:
            lines.append(f"- no completed feasible trial: {', '.join(missing)}")
    (exp_dir / "results.md").write_text("\n".join(lines) + "\n")
    plotted = plot_pareto(rows, plan, best, exp_dir / "pareto.png")
    best_yaml = None
    if best is not None:
        best_yaml = write_best_config(best, plan)
    counts: dict = {}
    for r in rows:
        key = r["status"].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return {"experiment": plan.name, "dir": str(exp_dir), "trials": len(rows), "status": counts,
            "best": best, "best_config": str(best_yaml) if best_yaml else None,
            "results_csv": str(exp_dir / "results.csv"), "results_md": str(exp_dir / "results.md"),
            "pareto_png": str(exp_dir / "pareto.png") if plotted else None,
            "best_by_mode": best_by_mode,
            "objective": {"domain_sets": plan.domain_sets, "retention_sets": plan.retention_sets,
                          "forgetting_penalty": plan.penalty, "max_forgetting": plan.max_forgetting}}


def write_best_config(best: dict, plan: TunePlan, filename: str = "best.yaml") -> Path:
    """The best trial's exact training config, as a run of its own under run.output_dir."""
    exp_dir = Path(plan.exp_dir)
    d = yaml.safe_load((Path(best["trial_dir"]) / "config.yaml").read_text())
    d["run"]["name"] = f"{plan.name}-{Path(filename).stem}"
    d["run"]["output_dir"] = plan.base["run"]["output_dir"]
    from_dict(Config, d)  # it must load as it is
    out = exp_dir / filename
    head = [f"# The best configuration of tune experiment {plan.name}: trial {best['trial_id']}",
            f"# (objective {best['objective']:.6f} = domain gain {best['domain_gain']:.6f} - "
            f"{plan.penalty:g} x forgetting {best['forgetting']:.6f}; new layers {best['new_layers']}).",
            "#", f"#   llamapro train --config {out}",
            f"#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- "
            f"python jobs/train.py --config {out}", "#",
            f"# Trained in the experiment: {best['model'] or best['trial_dir']}", ""]
    out.write_text("\n".join(head) + yaml.safe_dump(d, sort_keys=False))
    return out


def format_summary(s: dict) -> str:
    lines = [f"experiment {s['experiment']}: {s['trials']} trial(s) "
             + ", ".join(f"{n} {k}" for k, n in sorted(s["status"].items())),
             f"results: {s['results_csv']} | {s['results_md']}",
             f"pareto plot: {s['pareto_png']}"]
    b = s.get("best")
    if b:
        lines.append(f"best: {b['trial_id']} objective {b['objective']:.4f} (domain gain "
                     f"{b['domain_gain']:.4f}, forgetting {b['forgetting']:.4f}), new layers {b['new_layers']}")
        lines.append(f"best config: {s['best_config']}  ->  llamapro train --config {s['best_config']}")
    else:
        lines.append("no trial completed feasibly: no best config written (see results.md)")
    for mode, b in (s.get("best_by_mode") or {}).items():
        lines.append(f"best {mode}: {b['trial_id']} lr {b.get('train.lr')} objective {b['objective']:.4f} "
                     f"(domain gain {b['domain_gain']:.4f}, forgetting {b['forgetting']:.4f})")
    return "\n".join(lines)
