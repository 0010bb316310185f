"""``llamapro compare``: learning versus forgetting, method against method, from ordinary run dirs.

    llamapro compare --config jobs/configs/eval_demo.yaml --out runs/study \\
        llamapro=runs/demo full=runs/demo/baseline-full lora=runs/demo/baseline-lora

Each LABEL=DIR is a trained run directory (``llamapro run`` / ``llamapro train`` / a ``llamapro
tune`` trial; a baseline's ``baseline-<mode>/`` works too). Each is evaluated with the config's
``eval`` section exactly as ``llamapro eval`` does (held-out sets: the domain set, the replayed and
the not-replayed retention sets; the knowledge battery; greedy agreement) into its own
``<run>/eval/results.json``; a run whose results were made with the same eval settings is not
evaluated again, so an interrupted study resumes where it stopped. Then, in ``--out``:

- ``compare.md`` / ``compare.csv`` / ``compare.json``: one row per run: method, learning rate,
  training tokens, domain perplexity gain, perplexity rise of each retention set (replayed / not
  replayed named), the battery's mean change and each task's change with its 95% interval, greedy
  agreement, and a verdict per method against full fine-tuning and LoRA when they are present;
- ``pareto.png``: domain gain against forgetting (battery drop, and the not-replayed retention
  rise), one point per run, the Pareto frontier drawn.

The verdict uses the issue's target: domain gain >= 90% of full fine-tuning's, battery drop and
not-replayed retention rise at most a third of full fine-tuning's and no worse than LoRA's. A
battery change whose paired interval holds 0 is called noise and counts as no change.

Training the runs at an equal token budget, each method at its own best learning rate, is done
by ``llamapro run`` with ``run.baselines`` (same budget, same data) at the LRs a Tune sweep chose.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import asdict
from pathlib import Path

from llamapro.artifacts import EvalResults, ExpansionMetadata, TrainingRecord, read_metadata
from llamapro.errors import CompareError
from llamapro.eval.results import read_results, write_results
from llamapro.eval.run import run_eval
from llamapro.tensors import write_json_atomic

RESULTS = "compare.json"


def parse_runs(items: list[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for it in items:
        label, sep, path = it.partition("=")
        if not sep or not label or not path:
            raise CompareError(f"{it!r}: give runs as LABEL=RUN_DIR (e.g. full=runs/demo/baseline-full)")
        if label in runs:
            raise CompareError(f"label {label!r} given twice")
        p = Path(path)
        if not (p / "model" / "config.json").is_file():
            raise CompareError(f"{label}: {p} is not a trained run directory (no model/config.json)")
        runs[label] = p
    if not runs:
        raise CompareError("give at least one LABEL=RUN_DIR")
    return runs


def eval_digest(cfg) -> str:
    """What an evaluation's numbers depend on: the eval section (output paths aside) and data."""
    ec = asdict(cfg.eval)
    for k in ("output_dir", "report", "checkpoint"):
        ec.pop(k, None)
    data = asdict(cfg.data) if getattr(cfg, "data", None) else None
    return hashlib.sha256(json.dumps([ec, data], sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_run(cfg, run: Path, say=None, base_cache: Path | None = None, heldout: dict | None = None) -> dict:
    """The run's eval results: reused when made with the same settings, else ``run_eval``.

    With ``base_cache`` (a directory) and the battery on, the base's battery answers are scored
    once per study and kept there, not once per run: every run whose comparison base is exactly
    the base model (a baseline trained from it, or llamapro with frozen originals, whose base is
    the trained model with its new blocks skipped: the same logits, proven at expansion) is
    evaluated without the battery by ``run_eval``, then its battery is scored on the trained model
    and set beside the cached base's, and the gate is judged again with it. ``heldout``: arrays
    per set instead of the data sources' held-out splits (as ``run_eval``)."""
    say = say or (lambda m: None)
    digest = eval_digest(cfg)
    old = read_results(run)
    if old and old.get("compare_digest") == digest:
        say(f"{run}: evaluated before with the same settings, reused")
        return old
    if base_cache is not None and cfg.eval.battery.enabled and _base_is_exact(cfg, run):
        res = _eval_with_shared_base_battery(cfg, run, Path(base_cache), say, heldout)
    else:
        res = run_eval(cfg, run_dir=str(run), say=say, heldout=heldout)
    res["compare_digest"] = digest
    write_results(Path(res["results_path"]).parent, res)
    return res


def _base_is_exact(cfg, run: Path) -> bool:
    from llamapro.eval.base import resolve_base

    ckpt = run / "model"
    try:
        info = resolve_base(ckpt, read_metadata(ckpt), cfg.eval)
    except Exception:  # the full evaluation reports it with its own message
        return False
    return bool(info.get("exact")) and not cfg.eval.base


def _battery_of(model_dir: str, cfg, docs: dict, say) -> dict:
    from llamapro.eval.battery import run_battery
    from llamapro.eval.models import load_model, torch_threads
    from llamapro.loading import load_tokenizer

    ec = cfg.eval
    with torch_threads(ec.num_threads):
        model = load_model(model_dir, ec.dtype, cfg.model.trust_remote_code)
        tok = load_tokenizer(model_dir)
        return run_battery(model, tok, docs, ec.battery.batch_size, say, ec.battery.share_context)


def base_battery(cfg, docs: dict, cache: Path, say) -> dict:
    """The base model's battery answers, scored once and cached in ``cache`` (keyed by the base,
    the battery settings and the eval dtype)."""
    from llamapro.demo import resolve_model

    base = str(resolve_model(cfg.model.base))
    key = json.dumps([base, asdict(cfg.eval.battery), cfg.eval.dtype], sort_keys=True, default=str)
    path = cache / f"base-battery-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        say(f"knowledge battery of the base: reused {path}")
        return json.loads(path.read_text())
    say(f"knowledge battery: base model {base} (once for every run)")
    out = _battery_of(base, cfg, docs, say)
    cache.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, out, indent=1)
    return out


def _eval_with_shared_base_battery(cfg, run: Path, cache: Path, say, heldout: dict | None) -> dict:
    import copy

    from llamapro.eval.battery import compare_battery, load_battery
    from llamapro.eval.gate import check_gate

    docs = load_battery(cfg.eval.battery, say)  # fetched and checked before any model loads
    light = copy.deepcopy(cfg)
    light.eval.battery.enabled = False
    light.eval.gate.max_accuracy_drop = None
    res = run_eval(light, run_dir=str(run), say=say, heldout=heldout)
    base = base_battery(cfg, docs, cache, say)
    say(f"knowledge battery: trained model {run / 'model'}")
    trained = _battery_of(str(run / "model"), cfg, docs, say)
    res["battery"] = {"tasks": compare_battery(base, trained), "limit": cfg.eval.battery.limit,
                      "seconds": round(sum(r["seconds"] for r in trained.values()), 1),
                      "base_scored_once": True}
    res["gate"] = check_gate(res["sets"], res.get("greedy"), cfg.eval.gate, res["battery"])
    return res


def _run_facts(run: Path) -> dict:
    meta = read_metadata(run / "model") or ExpansionMetadata()
    tr = meta.training or TrainingRecord()
    facts = {"mode": tr.mode, "lr": (tr.config or {}).get("lr"), "tokens": tr.tokens, "mixture": None,
             "new_layers": meta.new_layer_indices}
    cfgp = run / "config.yaml"
    if cfgp.is_file():
        import yaml

        d = yaml.safe_load(cfgp.read_text()) or {}
        t = d.get("train") or {}
        facts["lr"] = facts["lr"] if facts["lr"] is not None else t.get("lr")
        facts["mode"] = facts["mode"] or t.get("mode")
        facts["mixture"] = mixture_of(d)
    mp = run / "metrics.jsonl"
    if facts["tokens"] is None and mp.is_file():
        for line in mp.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("tokens"), (int, float)):
                facts["tokens"] = max(facts["tokens"] or 0, int(rec["tokens"]))
    return facts


def row_of(label: str, run: Path, res: dict) -> dict:
    """One table row from a run's eval results."""
    res = EvalResults.of(res)
    sets = res.sets
    dom = [s for s in sets.values() if s["role"] == "domain"]
    ret = {n: s for n, s in sets.items() if s["role"] == "retention"}
    row = {"label": label, "run": str(run), **_run_facts(run)}
    row["domain_gain"] = (sum(-s["ppl_change"] for s in dom) / len(dom)) if dom else None
    for n, s in ret.items():
        row[f"retention_rise/{n}"] = s["ppl_change"]
    nr = [s["ppl_change"] for s in ret.values() if s.get("replayed") is False]
    rp = [s["ppl_change"] for s in ret.values() if s.get("replayed")]
    row["not_replayed_rise"] = max(nr) if nr else None
    row["replayed_rise"] = max(rp) if rp else None
    row["not_replayed_sets"] = [n for n, s in ret.items() if s.get("replayed") is False]
    row["replayed_sets"] = [n for n, s in ret.items() if s.get("replayed")]
    bat = (res.battery or {}).get("tasks") or {}
    row["battery"] = {}
    for t, e in bat.items():
        v = e[e["metric"]]
        row["battery"][t] = {"metric": e["metric"], "base": v["base"], "trained": v["trained"],
                             "change": v["change"], "ci": v["ci"], "noise": v["noise"], "n": e["n"]}
    # the battery's drop: mean over tasks, a change inside the noise counted as none
    row["battery_drop"] = (sum(0.0 if b["noise"] else -b["change"] for b in row["battery"].values())
                           / len(row["battery"])) if row["battery"] else None
    row["battery_raw_drop"] = (sum(-b["change"] for b in row["battery"].values()) / len(row["battery"])
                               if row["battery"] else None)
    row["greedy_exact"] = (res.greedy or {}).get("exact_match")
    row["greedy_prefix"] = (res.greedy or {}).get("prefix_agreement")
    row["gate_passed"] = res.gate.get("passed")
    return row


def _forgetting(r: dict) -> float | None:
    """The x axis: the battery's drop when scored, else the not-replayed retention rise."""
    return r["battery_raw_drop"] if r.get("battery_raw_drop") is not None else r.get("not_replayed_rise")


def mixture_of(config: dict) -> str | None:
    """The training mixture of a run's saved config as each source's share of the weights,
    ``name 70%, ...`` (None without sources; weights 0.7/0.7 and 0.5/0.5 are the same mixture):
    runs trained on different mixtures are not each other's reference."""
    srcs = [s for s in ((config or {}).get("data") or {}).get("sources") or [] if isinstance(s, dict)]
    weights = [float(s.get("weight", 1.0)) for s in srcs]
    total = sum(weights)
    if not srcs or total <= 0:
        return None
    return ", ".join(f"{s.get('name')} {w / total:.0%}" for s, w in zip(srcs, weights))


def _ref(rows: list[dict], mode: str, like: dict | None = None) -> dict | None:
    """The reference run of ``mode`` for ``like``: the one with the best domain gain among those
    trained on the same mixture as ``like``, or among all of that mode when none was."""
    cands = [r for r in rows if r.get("mode") == mode and r["domain_gain"] is not None]
    same = [r for r in cands if like is not None and like.get("mixture") is not None
            and r.get("mixture") == like.get("mixture")]
    cands = same or cands
    return max(cands, key=lambda r: r["domain_gain"]) if cands else None


def verdicts(rows: list[dict]) -> dict[str, str]:
    """A sentence per run against the target (>= 90% of full FT's gain; battery drop and
    not-replayed rise <= a third of full FT's and <= LoRA's). Each run is judged against the full
    fine-tuning and LoRA runs trained on its own mixture when there are such runs (a study of
    replay shares compares like with like), else against the best of each."""
    out = {}
    for r in rows:
        full, lora = _ref(rows, "full", r), _ref(rows, "lora", r)
        if r["domain_gain"] is None:
            out[r["label"]] = "not evaluated on a domain set"
            continue
        parts = [f"domain gain {r['domain_gain']:+.1%}"]
        ok = True
        if full and r is not full and full["domain_gain"] > 0:
            share = r["domain_gain"] / full["domain_gain"]
            parts.append(f"{share:.0%} of full fine-tuning's ({full['label']})")
            ok &= share >= 0.9
        for key, name in (("battery_drop", "battery drop beyond noise"),
                          ("not_replayed_rise", "not-replayed retention rise")):
            v = r.get(key)
            if v is None:
                continue
            txt = f"{name} {v:+.3f}" if key == "battery_drop" else f"{name} {v:+.2%}"
            if full and r is not full and full.get(key) is not None:
                lim = max(0.0, full[key]) / 3
                txt += f" (full FT {full[key]:+.3g}; a third: {lim:.3g})"
                ok &= v <= lim + 1e-12
            if lora and r is not lora and lora.get(key) is not None:
                ok &= v <= max(0.0, lora[key]) + 1e-12
            parts.append(txt)
        nb = [t for t, b in r["battery"].items() if not b["noise"]]
        parts.append("battery changes all inside the noise" if r["battery"] and not nb else
                     f"battery changes beyond the noise on {', '.join(nb)}" if nb else "no battery")
        is_ref = r is full or r is lora
        head = ("reference" if is_ref else "meets the target" if (ok and full)
                else "misses the target" if full else "no full fine-tuning run to compare with")
        out[r["label"]] = f"{head}: " + "; ".join(parts)
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (less forgetting, more gain),
    ordered by forgetting."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_gain = [], -math.inf
    for i in idx:
        if points[i][1] > best_gain:
            front.append(i)
            best_gain = points[i][1]
    return front


def plot_pareto(rows: list[dict], path: Path) -> bool:
    from matplotlib.figure import Figure

    pts = [r for r in rows if r["domain_gain"] is not None and _forgetting(r) is not None]
    if not pts:
        return False
    by_battery = any(r.get("battery_raw_drop") is not None for r in pts)
    scale = 100.0 if by_battery else 1.0  # accuracy drop in points (0.01 -> 1 point)
    fig = Figure(figsize=(9, 6), dpi=110, layout="constrained")
    ax = fig.subplots()
    colors = {"llamapro": "#1f77b4", "full": "#d62728", "lora": "#2ca02c", "freeze_last_n": "#9467bd"}
    for r in pts:
        ax.scatter(_forgetting(r) * scale, r["domain_gain"], s=70, zorder=3,
                   color=colors.get(r.get("mode"), "#7f7f7f"))
        ax.annotate(f"{r['label']} (lr {r['lr']})" if r.get("lr") is not None else r["label"],
                    (_forgetting(r) * scale, r["domain_gain"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    front = [pts[i] for i in pareto_front([(_forgetting(r), r["domain_gain"]) for r in pts])]
    # the frontier's runs ringed, so a frontier of one run is visible too
    ax.plot([_forgetting(r) * scale for r in front], [r["domain_gain"] for r in front], "-o", color="#ff7f0e",
            lw=1.5, ms=14, mfc="none", mew=1.5, zorder=2, label="Pareto frontier (less forgetting, more gain)")
    for mode, c in colors.items():
        if any(r.get("mode") == mode for r in pts):
            ax.scatter([], [], color=c, label=mode)
    ax.axvline(0, color="#c7c7c7", lw=0.8)
    ax.axhline(0, color="#c7c7c7", lw=0.8)
    ax.set_xlabel("forgetting: mean knowledge-battery accuracy drop (percentage points)" if by_battery
                  else "forgetting: not-replayed retention perplexity rise")
    ax.set_ylabel("domain gain: relative fall of the domain set's perplexity")
    ax.set_title("Learning versus forgetting, one point per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return True


def _pct(v) -> str:
    return "—" if v is None else f"{v:+.2%}"


def table_md(rows: list[dict], verdict: dict) -> str:
    tasks = sorted({t for r in rows for t in r["battery"]})
    mixed = len({r.get("mixture") for r in rows}) > 1  # several mixtures: say which run had which
    head = (["run", "mode", "lr", "tokens"] + (["mixture"] if mixed else [])
            + ["domain ppl gain", "not-replayed rise", "replayed rise"]
            + [f"{t} change [95% CI]" for t in tasks] + ["greedy exact / prefix", "gate"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(r.get("mode")), str(r.get("lr")), f"{r['tokens']:,}" if r.get("tokens") else "?"]
        cells += [r.get("mixture") or "?"] if mixed else []
        cells += [_pct(r["domain_gain"]), _pct(r["not_replayed_rise"]), _pct(r["replayed_rise"])]
        for t in tasks:
            b = r["battery"].get(t)
            cells.append("—" if not b else f"{b['trained']:.3f} ({b['change']:+.3f} [{b['ci'][0]:+.3f}, "
                                           f"{b['ci'][1]:+.3f}]{', noise' if b['noise'] else ''})")
        cells += ["—" if r["greedy_exact"] is None else
                  f"{r['greedy_exact']:.0%} / {r['greedy_prefix']:.0%}" if r.get("greedy_prefix") is not None
                  else f"{r['greedy_exact']:.0%}",
                  {True: "pass", False: "FAIL", None: "—"}[r["gate_passed"]]]
        lines.append("| " + " | ".join(cells) + " |")
    nr = sorted({n for r in rows for n in r["not_replayed_sets"]})
    rp = sorted({n for r in rows for n in r["replayed_sets"]})
    out = ["# Learning versus forgetting\n",
           f"Not-replayed retention sets (forgetting): {', '.join(nr) or 'none'}. Replayed (in the "
           f"training mixture): {', '.join(rp) or 'none'}. Battery: zero-shot multiple-choice accuracy, "
           "change vs the base with a paired 95% interval.\n", "\n".join(lines), "\n## Verdicts\n"]
    out += [f"- **{k}**: {v}" for k, v in verdict.items()]
    return "\n".join(out) + "\n\n![Pareto plot](pareto.png)\n"


def _one_ray(cfg, runs: dict[str, Path], say, attempts: int = 3) -> bool:
    """One local Ray for every run's held-out blocks (not one start per run), started only when a
    run needs evaluating; a start that times out on a loaded machine is tried again. Returns
    whether it was started here (the caller shuts it down)."""
    digest = eval_digest(cfg)
    todo = [r for r in runs.values() if (read_results(r) or {}).get("compare_digest") != digest]
    if not todo or not getattr(cfg, "data", None) or not cfg.data.sources:
        return False
    from llamapro.runtime import ensure_ray, spare_cpus

    for i in range(attempts):
        try:
            return ensure_ray("compare", num_cpus=spare_cpus(), include_dashboard=False,
                              log_to_driver=False, quiet_data=True)
        except Exception as e:  # Ray's own "node timed out during startup" is a bare Exception
            if "timed out during startup" not in str(e) or i == attempts - 1:
                raise
            say(f"[compare] Ray did not start in time (a loaded machine?); trying again ({i + 2}/{attempts})")
    return False


def run_compare(cfg, runs: dict[str, Path], out_dir, say=None) -> dict:
    """Evaluate (or reuse) every run, then write the table, the plot and the verdicts."""
    say = say or (lambda m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = _one_ray(cfg, runs, say)
    try:
        for label, run in runs.items():
            say(f"[compare] {label}: {run}")
            rows.append(row_of(label, run, evaluate_run(cfg, run, say, base_cache=out)))
    finally:
        if started:
            import ray

            ray.shutdown()
    verdict = verdicts(rows)
    plotted = plot_pareto(rows, out / "pareto.png")
    md = table_md(rows, verdict)
    (out / "compare.md.tmp").write_text(md)
    (out / "compare.md.tmp").replace(out / "compare.md")
    buf = io.StringIO()
    flat = [{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows]
    w = csv.DictWriter(buf, fieldnames=sorted({k for r in flat for k in r}))
    w.writeheader()
    w.writerows(flat)
    (out / "compare.csv.tmp").write_text(buf.getvalue())
    (out / "compare.csv.tmp").replace(out / "compare.csv")
    summary = {"rows": rows, "verdicts": verdict, "pareto_png": str(out / "pareto.png") if plotted else None,
               "table": str(out / "compare.md")}
    write_json_atomic(out / RESULTS, summary, indent=2, default=str)
    return summary
