"""One report per run: ``RUN/report/report.md`` and ``report.html`` with PNG plots beside them.

The plots are what a person looks at first: training loss coloured by stage with the held-out
losses per set, throughput, perplexity before/after with the gate's threshold, which layers were
inserted (a diagram of the stack), greedy agreement per regression prompt. The page is
self-contained (inline CSS, no scripts, no external resources; images by relative path).

Inputs are plain files: ``RUN/metrics.jsonl`` (training events), the checkpoint's
``llamapro.json`` and the evaluation results (``RUN/eval/results.json``). Any of them may be
missing; the report says what it could not show. matplotlib runs headless (Agg canvas, no pyplot).
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

from llamapro.checkpoint import read_metadata

REPORT_DIR = "report"
STAGE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#17becf", "#bcbd22", "#7f7f7f"]
SET_COLORS = ["#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#e377c2", "#bcbd22"]
ROLE_COLORS = {"retention": "#1f77b4", "domain": "#ff7f0e", "other": "#7f7f7f"}
ORIGINAL_COLOR = "#c7c7c7"


# --- inputs ---------------------------------------------------------------------------------------

def read_events(run_dir) -> list[dict]:
    """Events of ``metrics.jsonl`` (unreadable lines skipped; a resumed run's repeated steps are
    kept once, the last one)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(e, dict) and "event" in e:
            out.append(e)
    return out


def _steps(events, kind="step") -> list[dict]:
    by = {}
    for e in events:
        if e.get("event") == kind and "step" in e:
            by[e["step"]] = e
    return [by[k] for k in sorted(by)]


def _locate(run_dir: Path) -> tuple[Path, Path | None]:
    """(run dir, checkpoint dir or None)."""
    if (run_dir / "model" / "config.json").is_file():
        return run_dir, run_dir / "model"
    if (run_dir / "config.json").is_file():
        return run_dir, run_dir
    return run_dir, None


def summarize(events: list[dict], meta: dict | None) -> dict:
    """Tokens, time, throughput and peak memory of the training run."""
    training = (meta or {}).get("training") or {}
    steps = _steps(events)
    tokens = training.get("tokens") or (steps[-1].get("tokens") if steps else None)
    seconds = training.get("train_seconds") or (sum(s.get("step_s", 0) for s in steps) or None)
    rates = [s["tokens_per_s"] for s in steps if isinstance(s.get("tokens_per_s"), (int, float))]
    peaks = [e["peak_rss_bytes"] for e in events if isinstance(e.get("peak_rss_bytes"), (int, float))]
    return {
        "steps": training.get("steps") or (steps[-1]["step"] if steps else None),
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_s": (tokens / seconds) if tokens and seconds else None,
        "median_step_tokens_per_s": statistics.median(rates) if rates else None,
        "peak_rss_bytes": max(peaks) if peaks else None,
        "resumes": sum(1 for e in events if e.get("event") == "resume"),
        "early_stopped_stages": training.get("early_stopped_stages")
        or sorted({e.get("stage") for e in events if e.get("event") == "early_stop"}),
    }


# --- plots ----------------------------------------------------------------------------------------

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
    steps = _steps(events)
    if not steps:
        return False
    evals = _steps(events, "eval")
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
    base_sets = (results or {}).get("sets") or {}
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
    steps = [s for s in _steps(events) if isinstance(s.get("tokens_per_s"), (int, float))]
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
    sets = (results or {}).get("sets") or {}
    if not sets:
        return False
    import numpy as np

    names = list(sets)
    gate = (results.get("gate") or {})
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


def layer_table(meta: dict | None) -> list[dict]:
    """One row per layer of the stack: index, new or original, source/original index, stage."""
    if not meta or not meta.get("num_layers"):
        return []
    new = {int(i) for i in meta.get("new_layer_indices") or []}
    sources = {int(k): v for k, v in (meta.get("new_layer_sources") or {}).items()}
    stage_of = {}
    for st in ((meta.get("training") or {}).get("stages") or []):
        for layer in st.get("layers") or []:
            stage_of.setdefault(int(layer), st.get("index", 0))
    rows, o = [], 0
    for i in range(int(meta["num_layers"])):
        if i in new:
            rows.append({"index": i, "new": True, "source": sources.get(i), "stage": stage_of.get(i)})
        else:
            rows.append({"index": i, "new": False, "original": o})
            o += 1
    return rows


def plot_stack(meta: dict | None, path: Path) -> bool:
    rows = layer_table(meta)
    if not rows:
        return False
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
                        if (meta.get("training") or {}).get("originals_frozen", True) else
                        f"layer {y} (original {r['original']})", ha="center", va="center",
                        fontsize=fs, color="#333")
    ax.add_patch(Rectangle((0, n + 0.1), 1, 0.9, color="#e8e8e8", ec="#777"))
    ax.text(0.5, n + 0.55, "final norm + LM head", ha="center", va="center", fontsize=fs)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-1.3, n + 1.2)
    ax.axis("off")
    n_new = sum(r["new"] for r in rows)
    ax.set_title(f"Decoder stack: {n - n_new} original + {n_new} inserted = {n} layers "
                 f"({meta.get('strategy', '?')})", fontsize=10)
    stages = sorted({r["stage"] for r in rows if r["new"] and r["stage"] is not None})
    handles = [Patch(color=ORIGINAL_COLOR, label="original (from the base)")]
    handles += [Patch(color=STAGE_COLORS[s % len(STAGE_COLORS)], label=f"inserted, trained from stage {s}")
                for s in stages] or [Patch(color="#ff7f0e", label="inserted")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=8, ncol=2)
    fig.savefig(path)
    return True


def battery_section(results: dict | None, checks_by_set: dict) -> list:
    """The knowledge battery: per task the gated metric of base and trained model with 95%
    intervals, the paired change and whether it is noise, and each dataset's licence."""
    bat = (results or {}).get("battery")
    if not bat:
        return []
    S = [("h2", "Knowledge battery (zero-shot multiple choice)")]
    S.append(("p", "Log-likelihood scoring as lm-evaluation-harness does it (sum of the answer's token "
                   "log-probabilities; acc_norm divides by the answer's length). Intervals are 95%: "
                   "Wilson for each accuracy, paired over the same questions for the change; a change "
                   "whose interval holds 0 is noise. "
                   + (f"First {bat['limit']} questions per task." if bat.get("limit") else "Full sets.")))
    rows = []
    for name, e in bat["tasks"].items():
        m = e["metric"]
        v = e[m]
        c = checks_by_set.get(f"battery:{name}")
        rows.append([name, m, str(e["n"]), f"{e['chance']:.2f}" if e.get("chance") else "?",
                     f"{v['base']:.3f} [{v['base_ci'][0]:.3f}, {v['base_ci'][1]:.3f}]",
                     f"{v['trained']:.3f} [{v['trained_ci'][0]:.3f}, {v['trained_ci'][1]:.3f}]",
                     f"{v['change']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]",
                     "noise" if v["noise"] else ("drop" if v["change"] < 0 else "gain"),
                     ("pass" if c["passed"] else "FAIL") if c else "—", e.get("licence") or "?"])
    S.append(("table", ["task", "metric", "questions", "chance", "base [95% CI]", "trained [95% CI]",
                        "change [95% CI]", "verdict", "gate", "data licence"], rows))
    return S


def plot_greedy(results: dict, path: Path) -> bool:
    g = (results or {}).get("greedy")
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


def curve_table(fusion: dict) -> tuple[list[str], list[list[str]]]:
    """The alpha curve as a table: per alpha, each set's perplexity (change), domain gain, gate."""
    curve = fusion.get("curve") or []
    names = list(curve[0]["sets"]) if curve else []
    head = ["alpha"] + [f"{n} ({curve[0]['sets'][n]['role']}) ppl" for n in names] + ["domain gain", "gate"]
    rows = []
    for p in curve:
        mark = " (chosen)" if p["alpha"] == fusion.get("alpha") else ""
        rows.append([f"{p['alpha']:g}{mark}"]
                    + [f"{p['sets'][n]['trained']['ppl']:.4g} ({p['sets'][n]['ppl_change']:+.2%})" for n in names]
                    + [f"{p['domain_gain']:+.2%}", "pass" if p["gate"]["passed"] else "FAIL"])
    return head, rows


# --- text -----------------------------------------------------------------------------------------

def _bytes(n) -> str:
    if not n:
        return "not recorded"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _num(x, fmt="{:,.0f}", none="not recorded") -> str:
    return none if x is None else fmt.format(x)


def _short(s: str, n: int = 160) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def rollback_sentence(meta: dict | None, results: dict | None) -> str:
    rb = (results or {}).get("rollback")
    frozen = ((meta or {}).get("training") or {}).get("originals_frozen")
    if rb and rb.get("applicable"):
        if rb["equals_base"]:
            return ("Rollback verified: `llamapro strip` on this checkpoint (or on its export) gives "
                    f"back the base exactly; the stripped weights' fingerprint equals the base's "
                    f"({rb['base_fingerprint']}). The original layers were frozen during training.")
        return ("Rollback NOT exact: `llamapro strip` removes the inserted blocks, but the result's "
                f"fingerprint ({rb['stripped_fingerprint']}) differs from the base's "
                f"({rb['base_fingerprint']}): the original layers were changed. Keep the base "
                "checkpoint itself as the rollback snapshot.")
    if rb and not rb.get("applicable"):
        return f"Rollback by stripping does not apply: {rb.get('note', '')}. Keep the base checkpoint as the snapshot."
    if frozen:
        return ("The original layers were frozen, so `llamapro strip` on this checkpoint (or its export) "
                "should give back the base exactly (not checked in this evaluation: eval.check_rollback was off).")
    if not (meta or {}).get("new_layer_indices"):
        return "No rollback information (no llamapro metadata)."
    return ("The original layers were trained: `llamapro strip` gives back the base's architecture, "
            "not its exact weights. Keep the base checkpoint as the rollback snapshot.")


def _sections(run_dir: Path, ckpt: Path | None, meta: dict | None, events: list, results: dict | None,
              images: dict[str, bool], fusion: dict | None = None) -> tuple[str, list]:
    name = run_dir.resolve().name
    title = f"llamapro report: {name}"
    S: list = []
    gate = (results or {}).get("gate")
    if gate:
        verdict = ("PASSED" if gate["passed"] else "FAILED") if gate.get("enabled") else "DISABLED"
        S.append(("verdict", verdict, gate["summary"]))
    else:
        S.append(("verdict", "NOT EVALUATED", "No evaluation results: run `llamapro eval` on this run."))

    summ = summarize(events, meta)
    training = (meta or {}).get("training") or {}
    base = (meta or {}).get("base") or {}
    n_new = len((meta or {}).get("new_layer_indices") or [])
    rows = [
        ["model", str(ckpt.resolve()) if ckpt else "?"],
        ["base", f"{base.get('path', '?')} ({base.get('model_type', '?')}, fingerprint {base.get('fingerprint', '?')})"],
        ["layers", f"{(meta or {}).get('num_original_layers', '?')} original + {n_new} inserted = "
                   f"{(meta or {}).get('num_layers', '?')} (strategy {(meta or {}).get('strategy', '?')})"
         if meta else "?"],
        ["training", f"mode {training.get('mode', '?')}, {len(training.get('stages') or [])} stage(s), "
                     f"{_num(summ['steps'])} steps" if training else "no training recorded"],
        ["tokens trained", _num(summ["tokens"])],
        ["training time", _num(summ["train_seconds"], "{:,.1f} s")],
        ["tokens/s (tokens / training time)", _num(summ["tokens_per_s"], "{:,.1f}") + (
            f" (median per step {summ['median_step_tokens_per_s']:,.1f})" if summ["median_step_tokens_per_s"] else "")],
        ["peak memory per training worker", _bytes(summ["peak_rss_bytes"])],
    ]
    if summ["early_stopped_stages"]:
        rows.append(["early stopped stages", ", ".join(map(str, summ["early_stopped_stages"]))])
    if summ["resumes"]:
        rows.append(["resumed after failure", f"{summ['resumes']} time(s)"])
    if results:
        rows.append(["evaluation", f"{results.get('eval_seconds', 0):,.1f} s on {results.get('device', '?')} "
                                   f"({results.get('dtype', '?')}), peak memory {_bytes(results.get('eval_peak_rss_bytes'))}"])
        rows.append(["compared against", (results.get("base") or {}).get("why", "?")])
    S.append(("h2", "Summary"))
    S.append(("table", ["", ""], rows))

    S.append(("h2", "Held-out perplexity"))
    sets = (results or {}).get("sets") or {}
    if sets:
        checks = {c["set"]: c for c in (gate or {}).get("checks", []) if c.get("set")}
        trs = []
        for n, s in sets.items():
            c = checks.get(n)
            role = s["role"] + ("" if s.get("replayed") is None else
                                " (replayed)" if s["replayed"] else " (not replayed)")
            trs.append([n, role, f"{s['tokens']:,}", f"{s['base']['loss']:.4f}", f"{s['trained']['loss']:.4f}",
                        f"{s['base']['ppl']:.4g}", f"{s['trained']['ppl']:.4g}", f"{s['ppl_change']:+.2%}",
                        ("pass" if c["passed"] else "FAIL") if c else "—"])
        S.append(("table", ["set", "role", "tokens", "base loss", "trained loss", "base ppl",
                            "trained ppl", "ppl change", "gate"], trs))
        if images.get("perplexity.png"):
            S.append(("img", "perplexity.png", "Perplexity before and after training, with the gate"))
    else:
        S.append(("p", "No held-out sets were evaluated."))

    S.append(("h2", "Training"))
    if images.get("loss.png"):
        S.append(("img", "loss.png", "Training loss by stage and held-out loss per set"))
    else:
        S.append(("p", "No training metrics (metrics.jsonl) found beside this checkpoint."))
    if images.get("throughput.png"):
        S.append(("img", "throughput.png", "Tokens per second per step"))
    st_rows = [[str(s.get("index")), s.get("name", ""), ", ".join(map(str, s.get("layers") or [])),
                str(s.get("steps")), "yes" if s.get("index") in (summ["early_stopped_stages"] or []) else ""]
               for s in training.get("stages") or []]
    if st_rows:
        S.append(("table", ["stage", "name", "trains layers", "steps budgeted", "early stopped"], st_rows))

    S.append(("h2", "Inserted layers"))
    if images.get("stack.png"):
        S.append(("img", "stack.png", "The decoder stack: original and inserted layers"))
    lt = [r for r in layer_table(meta) if r["new"]]
    if lt:
        S.append(("table", ["layer", "copied from original layer", "first trained in stage"],
                  [[str(r["index"]), str(r["source"]), "—" if r["stage"] is None else str(r["stage"])] for r in lt]))
    else:
        S.append(("p", "No inserted layers are recorded in this checkpoint's metadata."))

    g = (results or {}).get("greedy")
    S.append(("h2", "Regression prompts (greedy answers)"))
    if g:
        S.append(("p", f"{g['prompts']} prompts, {g['max_new_tokens']} greedy tokens each"
                       f"{', chat template' if g.get('chat_template') else ''}: exact match "
                       f"{g['exact_match']:.0%}, mean prefix agreement {g['prefix_agreement']:.0%}."))
        if images.get("greedy.png"):
            S.append(("img", "greedy.png", "Greedy agreement per prompt"))
        S.append(("table", ["prompt", "base", "trained", "agreement"],
                  [[_short(it["prompt"], 90), _short(it["base"]), _short(it["trained"]),
                    "exact" if it["exact"] else f"{it['prefix_agreement']:.0%}"] for it in g["items"]]))
    else:
        S.append(("p", "No regression prompts were evaluated."))

    S += battery_section(results, checks_by_set={c["set"]: c for c in (gate or {}).get("checks", [])
                                                  if c.get("set")})

    lm = (results or {}).get("lm_eval")
    if lm:
        S.append(("h2", "lm-evaluation-harness"))
        lrows = []
        for task in sorted(set(lm.get("trained", {})) | set(lm.get("base", {}))):
            for metric, v in sorted((lm.get("trained", {}).get(task) or {}).items()):
                b = (lm.get("base", {}).get(task) or {}).get(metric)
                lrows.append([task, metric, "?" if b is None else f"{b:.4g}", f"{v:.4g}"])
        S.append(("table", ["task", "metric", "base", "trained"], lrows))

    if fusion:
        S.append(("h2", "Fusion"))
        S.append(("p", f"`llamapro fuse --method {fusion['method']}` wrote `{fusion.get('out', '?')}` with "
                       f"alpha = {fusion['alpha']:g} (0: the base, 1: the trained model)."
                       + (f" Identity initialisation: {fusion['identity_from']}."
                          if fusion["method"] == "weighted" else "")))
        if fusion.get("curve"):
            S.append(("p", fusion.get("choice") or ""))
            if images.get("alpha_curve.png"):
                S.append(("img", "alpha_curve.png", "Held-out perplexity against the fusion strength alpha"))
            S.append(("table", *curve_table(fusion)))

    S.append(("h2", "Rollback"))
    S.append(("p", rollback_sentence(meta, results)))

    S.append(("h2", "Lineage"))
    lin = [["base path", str(base.get("path", "?"))], ["base fingerprint", str(base.get("fingerprint", "?"))],
           ["inserted positions", str((meta or {}).get("new_layer_indices", "?"))],
           ["strategy", str((meta or {}).get("strategy", "?"))],
           ["trained from", str(training.get("trained_from", "?"))]]
    if results:
        lin.append(["evaluation results", str(results.get("results_path") or "")])
    S.append(("table", ["", ""], lin))
    return title, S


def _strip_verdict(summary: str) -> str:
    """The gate summary without its own "Regression gate PASSED:" lead (the heading says it)."""
    head, sep, rest = summary.partition(": ")
    return rest[:1].upper() + rest[1:] if sep and head.startswith("Regression gate") else summary


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        kind = sec[0]
        if kind == "verdict":
            out += [f"**Regression gate: {sec[1]}.** {_strip_verdict(sec[2])}", ""]
        elif kind == "h2":
            out += [f"## {sec[1]}", ""]
        elif kind == "p":
            out += [sec[1], ""]
        elif kind == "img":
            out += [f"![{sec[2]}]({sec[1]})", ""]
        elif kind == "table":
            out += md_table(sec[1], sec[2]) + [""]
    return "\n".join(out)


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.verdict{padding:.8em 1em;border-radius:6px;font-size:1.05em}
.PASSED{background:#e6f4ea;border:1px solid #2ca02c}
.FAILED{background:#fde8e8;border:1px solid #d62728}
.DISABLED,.NOT{background:#f3f3f3;border:1px solid #999}
code{background:#f4f4f4;padding:0 .2em}
""".strip()


def _html_inline(s: str) -> str:
    """Escape, then render `code` spans (the only Markdown the text uses)."""
    parts = html.escape(str(s)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, sections: list) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        kind = sec[0]
        if kind == "verdict":
            out.append(f'<div class="verdict {sec[1].split()[0]}"><b>Regression gate: {html.escape(sec[1])}.</b> '
                       f"{_html_inline(_strip_verdict(sec[2]))}</div>")
        elif kind == "h2":
            out.append(f"<h2>{html.escape(sec[1])}</h2>")
        elif kind == "p":
            out.append(f"<p>{_html_inline(sec[1])}</p>")
        elif kind == "img":
            out.append(f'<figure><img src="{html.escape(sec[1])}" alt="{html.escape(sec[2])}">'
                       f"<figcaption>{html.escape(sec[2])}</figcaption></figure>")
        elif kind == "table":
            head, rows = sec[1], sec[2]
            out.append("<table>")
            if any(head):
                out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in r) + "</tr>")
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


# --- entry point ----------------------------------------------------------------------------------

def build_report(run_dir, eval_results: dict | None = None, out_dir=None) -> Path:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out_dir`` (default RUN/report).

    ``run_dir`` is a training run directory (metrics.jsonl, model/) or a checkpoint directory.
    ``eval_results`` defaults to RUN/eval/results.json when present. Returns report.html's path.
    """
    run_dir = Path(run_dir)
    run, ckpt = _locate(run_dir)
    meta = read_metadata(ckpt) if ckpt else None
    from llamapro.eval import read_results

    if eval_results is None:
        eval_results = read_results(run)
    fusion = read_results(run / "fusion")  # written by `llamapro fuse` on this run
    events = read_events(run)
    out = Path(out_dir) if out_dir else run / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # never show a stale plot from an earlier report
        old.unlink()
    images = {
        "loss.png": plot_loss(events, eval_results, out / "loss.png"),
        "throughput.png": plot_throughput(events, out / "throughput.png"),
        "perplexity.png": plot_perplexity(eval_results, out / "perplexity.png") if eval_results else False,
        "stack.png": plot_stack(meta, out / "stack.png"),
        "greedy.png": plot_greedy(eval_results, out / "greedy.png") if eval_results else False,
        "alpha_curve.png": plot_alpha_curve(fusion, out / "alpha_curve.png"),
    }
    title, sections = _sections(run, ckpt, meta, events, eval_results, images, fusion)
    (out / "report.md").write_text(render_markdown(title, sections) + "\n", encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(title, sections) + "\n", encoding="utf-8")
    return page
