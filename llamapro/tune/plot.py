"""The Pareto plot of an experiment: each trial's domain gain against its forgetting, the front of
the completed trials (``eval.compare.pareto_front``, shared with `llamapro eval compare`), the best
trial and the feasibility bound (``pareto.png``)."""

from __future__ import annotations

from pathlib import Path

from llamapro.eval.compare import pareto_front
from llamapro.tune.plan import TunePlan
from llamapro.tune.space import space_keys


def _label(row: dict, keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = row.get(k)
        parts.append(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}")
    return ", ".join(parts)


def plot_pareto(rows: list[dict], plan: TunePlan, best: dict | None, path: Path) -> bool:
    from matplotlib.figure import Figure

    pts = [r for r in rows if r["domain_gain"] is not None and r["forgetting"] is not None]
    if not pts:
        return False
    fig = Figure(figsize=(9, 6), dpi=110, layout="constrained")
    ax = fig.subplots()
    keys = space_keys(plan.space, plan.mode_space)
    done = [r for r in pts if r["status"] == "completed"]
    labels: dict = {}  # trials on the same spot share one label
    for r in pts:
        completed = r["status"] == "completed"
        ax.scatter(r["forgetting"], r["domain_gain"], s=60, zorder=3,
                   facecolors="#1f77b4" if completed else "none", edgecolors="#1f77b4")
        xy = (round(r["forgetting"], 4), round(r["domain_gain"], 4))
        labels.setdefault(xy, []).append(f"{str(r['trial_id'])[-5:]}: {_label(r, keys)}"
                                         + ("" if completed else " (stopped)"))
    for (x, y), texts in labels.items():
        ax.annotate("\n".join(texts), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front_rows = done or pts
    front = [front_rows[i] for i in pareto_front([(r["forgetting"], r["domain_gain"]) for r in front_rows])]
    ax.plot([r["forgetting"] for r in front], [r["domain_gain"] for r in front], "-s", color="#ff7f0e",
            lw=1.5, ms=4, zorder=2, label="Pareto front (completed trials)")
    if best is not None:
        ax.scatter(best["forgetting"], best["domain_gain"], marker="*", s=320, color="#d62728",
                   zorder=4, label=f"best: {best['trial_id']} (objective {best['objective']:.4f})")
    if plan.max_forgetting is not None:
        ax.axvline(plan.max_forgetting, color="#7f7f7f", ls="--", lw=1,
                   label=f"max_forgetting {plan.max_forgetting}")
    ax.axvline(0, color="#c7c7c7", lw=0.8)
    ax.axhline(0, color="#c7c7c7", lw=0.8)
    ax.scatter([], [], facecolors="#1f77b4", edgecolors="#1f77b4", label="completed")
    ax.scatter([], [], facecolors="none", edgecolors="#1f77b4", label="stopped early / unfinished")
    ax.set_xlabel(f"forgetting: retention loss increase ({', '.join(plan.retention_sets) or 'none'}), nats/token")
    ax.set_ylabel(f"domain gain: loss decrease on {', '.join(plan.domain_sets)}, nats/token")
    ax.set_title(f"{plan.name}: domain gain vs forgetting per trial "
                 f"(objective = gain - {plan.penalty:g} x max(0, forgetting))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return True
