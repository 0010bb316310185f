"""The report's PNG plots (matplotlib, headless: Agg canvas, no pyplot): training and held-out loss,
throughput, perplexity before/after with the gate, the decoder stack, greedy agreement, and the
fusion alpha curve. Each returns False when there is nothing to draw."""

from __future__ import annotations

from pathlib import Path

from llamapro.artifacts import EvalResults, ExpansionMetadata
from llamapro.report.inputs import layer_table, step_events

STAGE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#17becf", "#bcbd22", "#7f7f7f"]
SET_COLORS = ["#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#e377c2", "#bcbd22"]
ROLE_COLORS = {"retention": "#1f77b4", "domain": "#ff7f0e", "other": "#7f7f7f"}
ORIGINAL_COLOR = "#c7c7c7"


def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _stage_names(events) -> dict[int, str]:
    out = {}
    for e in events:
        if e.get("event") == "stage_start":
            k, name = e["stage"], str(e.get("name") or "")
            extra = f" ({name})" if name and name.replace(" ", "") != f"stage{k}" else ""
            out[k] = f"stage {k}{extra}: layers {e.get('layers', '?')}"
    return out


def plot_loss(events: list[dict], results: dict | None, path: Path) -> bool:
    steps = step_events(events)
    if not steps:
        return False
    evals = step_events(events, "eval")
    names = _stage_names(events)
    fig = _figure(9, 5.6)
    ax = fig.subplots()
    stages = sorted({s.get("stage", 0) for s in steps})
    for k in stages:
        pts = [s for s in steps if s.get("stage", 0) == k]
        c = STAGE_COLORS[k % len(STAGE_COLORS)]
        x = [p["step"] for p in pts]
        ax.axvspan(min(x) - 0.5, max(x) + 0.5, color=c, alpha=0.07, lw=0)
        ax.plot(x, [p["loss"] for p in pts], "-o", color=c, ms=3, lw=1.5,
                label=f"training loss, {names.get(k, f'stage {k}')}")
    set_names = sorted({n for e in evals for n in (e.get("eval_loss") or {})})
    base_sets = EvalResults.of(results or {}).sets
    for i, n in enumerate(set_names):
        c = SET_COLORS[i % len(SET_COLORS)]
        pts = [(e["step"], e["eval_loss"][n]) for e in evals if n in (e.get("eval_loss") or {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--s", color=c, ms=5, lw=2,
                label=f"held-out loss: {n}")
        if n in base_sets:
            ax.axhline(base_sets[n]["base"]["loss"], color=c, ls=":", lw=1.2,
                       label=f"base model on {n}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Training and held-out loss (background: stages)")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncol=2)
    fig.savefig(path)
    return True


def plot_throughput(events: list[dict], path: Path) -> bool:
    steps = [s for s in step_events(events) if isinstance(s.get("tokens_per_s"), (int, float))]
    if not steps:
        return False
    names = _stage_names(events)
    fig = _figure(9, 3.8)
    ax = fig.subplots()
    for k in sorted({s.get("stage", 0) for s in steps}):
        pts = [s for s in steps if s.get("stage", 0) == k]
        ax.bar([p["step"] for p in pts], [p["tokens_per_s"] for p in pts],
               color=STAGE_COLORS[k % len(STAGE_COLORS)], label=names.get(k, f"stage {k}"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens / s")
    ax.set_title("Training throughput per step (all workers)")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")
    fig.savefig(path)
    return True


def plot_perplexity(results: dict, path: Path) -> bool:
    results = EvalResults.of(results or {})
    sets = results.sets
    if not sets:
        return False
    import numpy as np

    names = list(sets)
    gate = results.gate
    thr = {c["set"]: c for c in gate.get("checks", []) if c.get("set")}
    fig = _figure(max(8, 2.2 * len(names) + 4), 4.4)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.3, 1])
    x = np.arange(len(names))
    base = [sets[n]["base"]["ppl"] for n in names]
    trained = [sets[n]["trained"]["ppl"] for n in names]
    ax1.bar(x - 0.2, base, 0.4, color=ORIGINAL_COLOR, edgecolor="#555", label="base")
    ax1.bar(x + 0.2, trained, 0.4, color=[ROLE_COLORS.get(sets[n]["role"], "#7f7f7f") for n in names],
            edgecolor="#555", label="trained")
    for i, n in enumerate(names):
        ax1.annotate(f"{base[i]:.3g}", (x[i] - 0.2, base[i]), ha="center", va="bottom", fontsize=8)
        ax1.annotate(f"{trained[i]:.3g}", (x[i] + 0.2, trained[i]), ha="center", va="bottom", fontsize=8)
        c = thr.get(n)
        if c:  # the perplexity the gate allows (retention) or requires (domain)
            limit = base[i] * (1 + c["threshold"]) if c["check"] == "max_retention_ppl_increase" \
                else base[i] * (1 - c["threshold"])
            ax1.hlines(limit, x[i] - 0.45, x[i] + 0.45, colors="#b00", linestyles="--", lw=1.6,
                       label="gate limit" if i == next(j for j, m in enumerate(names) if m in thr) else None)
    if max(base + trained) / max(1e-9, min(base + trained)) > 20:
        ax1.set_yscale("log")
    ax1.set_xticks(x, [f"{n}\n({sets[n]['role']})" for n in names], fontsize=8)
    ax1.set_ylabel("perplexity")
    ax1.set_title("Held-out perplexity, base vs trained")
    ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax1.grid(axis="y", alpha=0.3)

    change = [100 * sets[n]["ppl_change"] for n in names]
    colors = []
    for n in names:
        c = thr.get(n)
        colors.append("#999" if not c else ("#2ca02c" if c["passed"] else "#d62728"))
    ax2.bar(x, change, 0.6, color=colors, edgecolor="#555")
    for i, n in enumerate(names):
        ax2.annotate(f"{change[i]:+.2f}%", (x[i], change[i]), ha="center",
                     va="bottom" if change[i] >= 0 else "top", fontsize=8)
    first = True
    for i, n in enumerate(names):
        c = thr.get(n)
        if c:
            lim = 100 * c["threshold"] if c["check"] == "max_retention_ppl_increase" else -100 * c["threshold"]
            ax2.hlines(lim, x[i] - 0.45, x[i] + 0.45, colors="#b00", linestyles="--", lw=1.6,
                       label="gate: change allowed up to the line" if first else None)
            first = False
    ax2.axhline(0, color="black", lw=0.8)
    if not first:
        ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax2.set_xticks(x, names, fontsize=8)
    ax2.set_ylabel("perplexity change (%)")
    verdict = ("PASSED" if gate.get("passed") else "FAILED") if gate.get("enabled") else "disabled"
    ax2.set_title(f"Change vs base: gate {verdict}")
    ax2.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return True


def plot_stack(meta: dict | None, path: Path) -> bool:
    rows = layer_table(meta)
    if not rows:
        return False
    meta = ExpansionMetadata.of(meta)
    from matplotlib.patches import Patch, Rectangle

    n = len(rows)
    h = min(22.0, max(4.0, 0.24 * (n + 2) + 1.2))
    fig = _figure(6.8, h)
    ax = fig.subplots()
    fs = 8 if n <= 48 else 6
    label_all = n <= 64
    ax.add_patch(Rectangle((0, -1.1), 1, 0.9, color="#e8e8e8", ec="#777"))
    ax.text(0.5, -0.65, "embeddings", ha="center", va="center", fontsize=fs)
    for r in rows:
        y = r["index"]
        if r["new"]:
            c = STAGE_COLORS[(r["stage"] or 0) % len(STAGE_COLORS)] if r["stage"] is not None else "#ff7f0e"
            ax.add_patch(Rectangle((0, y), 1, 0.88, color=c, ec="black", lw=1.2))
            src = f"copy of original {r['source']}" if r["source"] is not None else "new"
            st = f", stage {r['stage']}" if r["stage"] is not None else ""
            ax.text(0.5, y + 0.44, f"layer {y}: NEW ({src}{st})", ha="center", va="center",
                    fontsize=fs, color="white", weight="bold")
        else:
            ax.add_patch(Rectangle((0, y), 1, 0.88, color=ORIGINAL_COLOR, ec="#888", lw=0.6))
            if label_all:
                ax.text(0.5, y + 0.44, f"layer {y} (original {r['original']}, frozen)"
                        if (meta.training or {}).get("originals_frozen", True) else
                        f"layer {y} (original {r['original']})", ha="center", va="center",
                        fontsize=fs, color="#333")
    ax.add_patch(Rectangle((0, n + 0.1), 1, 0.9, color="#e8e8e8", ec="#777"))
    ax.text(0.5, n + 0.55, "final norm + LM head", ha="center", va="center", fontsize=fs)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-1.3, n + 1.2)
    ax.axis("off")
    n_new = sum(r["new"] for r in rows)
    ax.set_title(f"Decoder stack: {n - n_new} original + {n_new} inserted = {n} layers "
                 f"({'?' if meta.strategy is None else meta.strategy})", fontsize=10)
    stages = sorted({r["stage"] for r in rows if r["new"] and r["stage"] is not None})
    handles = [Patch(color=ORIGINAL_COLOR, label="original (from the base)")]
    handles += [Patch(color=STAGE_COLORS[s % len(STAGE_COLORS)], label=f"inserted, trained from stage {s}")
                for s in stages] or [Patch(color="#ff7f0e", label="inserted")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=8, ncol=2)
    fig.savefig(path)
    return True


def plot_greedy(results: dict, path: Path) -> bool:
    g = EvalResults.of(results or {}).greedy
    if not g or not g.get("items"):
        return False
    items = g["items"]
    fig = _figure(9, max(2.5, 0.32 * len(items) + 1.4))
    ax = fig.subplots()
    ys = list(range(len(items)))[::-1]
    vals = [100 * it["prefix_agreement"] for it in items]
    ax.barh(ys, vals, color=["#2ca02c" if it["exact"] else "#ff7f0e" for it in items])
    labels = [(it["prompt"][:60] + ("..." if len(it["prompt"]) > 60 else "")) for it in items]
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("greedy answer agreeing with the base before the first difference (%)")
    ax.set_title(f"Regression prompts: exact match {g['exact_match']:.0%} (green), "
                 f"mean prefix agreement {g['prefix_agreement']:.0%}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path)
    return True


def _set_colors(sets: dict) -> dict[str, str]:
    roles = [s["role"] for s in sets.values()]
    by_role = all(roles.count(r) == 1 and r in ROLE_COLORS for r in roles)
    return {n: ROLE_COLORS[s["role"]] if by_role else SET_COLORS[i % len(SET_COLORS)]
            for i, (n, s) in enumerate(sets.items())}


def plot_alpha_curve(fusion: dict | None, path: Path) -> bool:
    """`llamapro fuse --alpha auto`: held-out perplexity and its change against alpha, the gate's
    limits, the alphas that fail it, and the one chosen."""
    curve = (fusion or {}).get("curve") or []
    if len(curve) < 2:
        return False
    xs = [p["alpha"] for p in curve]
    sets = curve[0]["sets"]
    colors = _set_colors(sets)
    fig = _figure(11, 4.6)
    ax1, ax2 = fig.subplots(1, 2)
    for n, s in sets.items():
        ys = [p["sets"][n]["trained"]["ppl"] for p in curve]
        label = n if n == s["role"] else f"{n} ({s['role']})"
        ax1.plot(xs, ys, "-o", color=colors[n], lw=2, label=label)
        ax2.plot(xs, [100 * p["sets"][n]["ppl_change"] for p in curve], "-o", color=colors[n], lw=2,
                 label=label)
        for x, y in zip(xs, ys):
            ax1.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center",
                         fontsize=7, color=colors[n])
    changes = [100 * p["sets"][n]["ppl_change"] for p in curve for n in sets]
    span = max(changes) - min(changes) or 1.0
    for c in curve[0]["gate"].get("checks", []):
        if c.get("set") in sets:
            lim = 100 * c["threshold"] if c["check"] == "max_retention_ppl_increase" else -100 * c["threshold"]
            off = not min(changes) - 2 * span <= lim <= max(changes) + 2 * span  # keep the curves readable
            ax2.axhline(lim if not off else float("nan"), color=colors[c["set"]], ls="--", lw=1.2,
                        label=f"gate limit, {c['set']}: {lim + 0.0:+.3g}%" + (" (off scale)" if off else ""))
    half = min((b - a for a, b in zip(xs, xs[1:])), default=0.1) / 2
    failed = [p["alpha"] for p in curve if not p["gate"]["passed"]]
    for i, x in enumerate(failed):
        ax2.axvspan(x - half, x + half, color="#d62728", alpha=0.12, lw=0,
                    label="gate fails at this alpha" if i == 0 else None)
    chosen = fusion.get("alpha")
    for ax in (ax1, ax2):
        if isinstance(chosen, (int, float)):
            ax.axvline(chosen, color="black", ls=":", lw=1.5, label=f"chosen alpha = {chosen:g}")
        ax.set_xlabel("alpha (0: base, 1: trained model)")
        ax.set_xlim(min(xs) - half, max(xs) + half)
        ax.grid(alpha=0.3)
    ys_all = [p["sets"][n]["trained"]["ppl"] for p in curve for n in sets]
    if max(ys_all) / max(1e-9, min(ys_all)) > 20:
        ax1.set_yscale("log")
    ax2.axhline(0, color="black", lw=0.8)
    ax1.set_ylabel("held-out perplexity")
    ax1.set_title("Held-out perplexity vs fusion strength")
    ax2.set_ylabel("perplexity change vs base (%)")
    ax2.set_title("Change vs base and the regression gate")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.savefig(path)
    return True
