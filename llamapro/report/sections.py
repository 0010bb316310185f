"""The report's content, independent of its format: a title and a list of sections (verdict,
headings, paragraphs, tables, images) from the run's metadata, training events, evaluation
results and fusion results."""

from __future__ import annotations

from pathlib import Path

from llamapro.artifacts import BaseRecord, EvalResults, ExpansionMetadata, TrainingRecord
from llamapro.report.inputs import layer_table, summarize


def _bytes(n) -> str:
    """A byte count in GiB / MiB / B ("not recorded" for none)."""
    if not n:
        return "not recorded"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _num(x, fmt="{:,.0f}", none="not recorded") -> str:
    """A number formatted, or ``none``."""
    return none if x is None else fmt.format(x)


def _short(s: str, n: int = 160) -> str:
    """One line of at most ``n`` characters."""
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _q(v, missing: str = "?"):
    """A recorded value, or ``missing`` when it is absent (or null)."""
    return missing if v is None else v


def rollback_sentence(meta: dict | None, results: dict | None) -> str:
    """Whether stripping the inserted blocks gives the base back: checked, expected, or not."""
    meta = ExpansionMetadata.of(meta or {})
    rb = EvalResults.of(results or {}).rollback
    frozen = (meta.training or TrainingRecord()).originals_frozen
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
    if not meta.new_layer_indices:
        return "No rollback information (no llamapro metadata)."
    return ("The original layers were trained: `llamapro strip` gives back the base's architecture, "
            "not its exact weights. Keep the base checkpoint as the rollback snapshot.")


def battery_section(results: dict | None, checks_by_set: dict) -> list:
    """The knowledge battery: per task the gated metric of base and trained model with 95%
    intervals, the paired change and whether it is noise, and each dataset's licence."""
    bat = EvalResults.of(results or {}).battery
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


def report_sections(run_dir: Path, ckpt: Path | None, meta: dict | None, events: list,
                    results: dict | None, images: dict[str, bool],
                    fusion: dict | None = None) -> tuple[str, list]:
    """The report's title and sections: ``("verdict", verdict, sentence)``, ``("h2", text)``,
    ``("p", text)``, ``("table", head, rows)``, ``("img", file, caption)``; ``images`` says which
    PNGs were drawn. ``meta`` (llamapro.json) and ``results`` (results.json) may be None."""
    meta = ExpansionMetadata.of(meta)
    results = EvalResults.of(results)
    gate = results.gate if results else {}
    checks = {c["set"]: c for c in gate.get("checks", []) if c.get("set")}
    summ = summarize(events, meta)
    S: list = [verdict_section(gate)]
    S += summary_section(ckpt, meta, results, summ)
    S += perplexity_section(results, checks, images)
    S += training_section(meta, summ, images)
    S += layers_section(meta, images)
    S += greedy_section(results, images)
    S += battery_section(results, checks_by_set=checks)
    S += lm_eval_section(results)
    S += fusion_section(fusion, images)
    S.append(("h2", "Rollback"))
    S.append(("p", rollback_sentence(meta, results)))
    S += lineage_section(meta, results)
    return f"llamapro report: {run_dir.resolve().name}", S


def verdict_section(gate: dict) -> tuple:
    """The regression gate's verdict and its sentence (NOT EVALUATED without results)."""
    if not gate:
        return ("verdict", "NOT EVALUATED", "No evaluation results: run `llamapro eval` on this run.")
    verdict = ("PASSED" if gate["passed"] else "FAILED") if gate.get("enabled") else "DISABLED"
    return ("verdict", verdict, gate["summary"])


def summary_section(ckpt: Path | None, meta: ExpansionMetadata | None, results: EvalResults | None,
                    summ: dict) -> list:
    """The summary table: model, base, layers, training, tokens, time, memory, evaluation."""
    m = meta or ExpansionMetadata()
    training = m.training or TrainingRecord()
    base = m.base or BaseRecord()
    n_new = len(m.new_layer_indices)
    rows = [
        ["model", str(ckpt.resolve()) if ckpt else "?"],
        ["base", f"{_q(base.path)} ({_q(base.model_type)}, fingerprint {_q(base.fingerprint)})"],
        ["layers", f"{_q(m.num_original_layers)} original + {n_new} inserted = "
                   f"{_q(m.num_layers)} (strategy {_q(m.strategy)})" if meta else "?"],
        ["training", f"mode {_q(training.mode)}, {len(training.stages)} stage(s), "
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
        rows.append(["evaluation", f"{_q(results.eval_seconds, 0):,.1f} s on {_q(results.device)} "
                                   f"({_q(results.dtype)}), peak memory {_bytes(results.eval_peak_rss_bytes)}"])
        rows.append(["compared against", results.base.get("why", "?")])
    return [("h2", "Summary"), ("table", ["", ""], rows)]


def perplexity_section(results: EvalResults | None, checks: dict, images: dict) -> list:
    """Per held-out set: role, tokens, base and trained loss / perplexity, change, gate."""
    S: list = [("h2", "Held-out perplexity")]
    sets = results.sets if results else {}
    if not sets:
        return S + [("p", "No held-out sets were evaluated.")]
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
    return S


def training_section(meta: ExpansionMetadata | None, summ: dict, images: dict) -> list:
    """The loss and throughput plots and the stages as trained."""
    S: list = [("h2", "Training")]
    if images.get("loss.png"):
        S.append(("img", "loss.png", "Training loss by stage and held-out loss per set"))
    else:
        S.append(("p", "No training metrics (metrics.jsonl) found beside this checkpoint."))
    if images.get("throughput.png"):
        S.append(("img", "throughput.png", "Tokens per second per step"))
    stages = ((meta or ExpansionMetadata()).training or TrainingRecord()).stages
    st_rows = [[str(s.get("index")), s.get("name", ""), ", ".join(map(str, s.get("layers") or [])),
                str(s.get("steps")), "yes" if s.get("index") in (summ["early_stopped_stages"] or []) else ""]
               for s in stages]
    if st_rows:
        S.append(("table", ["stage", "name", "trains layers", "steps budgeted", "early stopped"], st_rows))
    return S


def layers_section(meta: ExpansionMetadata | None, images: dict) -> list:
    """The stack diagram and the inserted layers: where each was copied from, when it trained."""
    S: list = [("h2", "Inserted layers")]
    if images.get("stack.png"):
        S.append(("img", "stack.png", "The decoder stack: original and inserted layers"))
    lt = [r for r in layer_table(meta) if r["new"]]
    if lt:
        S.append(("table", ["layer", "copied from original layer", "first trained in stage"],
                  [[str(r["index"]), str(r["source"]), "—" if r["stage"] is None else str(r["stage"])] for r in lt]))
    else:
        S.append(("p", "No inserted layers are recorded in this checkpoint's metadata."))
    return S


def greedy_section(results: EvalResults | None, images: dict) -> list:
    """Greedy answers of base and trained model per regression prompt, and their agreement."""
    S: list = [("h2", "Regression prompts (greedy answers)")]
    g = results.greedy if results else None
    if not g:
        return S + [("p", "No regression prompts were evaluated.")]
    S.append(("p", f"{g['prompts']} prompts, {g['max_new_tokens']} greedy tokens each"
                   f"{', chat template' if g.get('chat_template') else ''}: exact match "
                   f"{g['exact_match']:.0%}, mean prefix agreement {g['prefix_agreement']:.0%}."))
    if images.get("greedy.png"):
        S.append(("img", "greedy.png", "Greedy agreement per prompt"))
    S.append(("table", ["prompt", "base", "trained", "agreement"],
              [[_short(it["prompt"], 90), _short(it["base"]), _short(it["trained"]),
                "exact" if it["exact"] else f"{it['prefix_agreement']:.0%}"] for it in g["items"]]))
    return S


def lm_eval_section(results: EvalResults | None) -> list:
    """lm-evaluation-harness metrics of base and trained model, when it ran."""
    lm = results.lm_eval if results else None
    if not lm:
        return []
    trained, base = lm.get("trained", {}), lm.get("base", {})
    lrows = []
    for task in sorted(set(trained) | set(base)):
        for metric, v in sorted((trained.get(task) or {}).items()):
            b = (base.get(task) or {}).get(metric)
            lrows.append([task, metric, "?" if b is None else f"{b:.4g}", f"{v:.4g}"])
    return [("h2", "lm-evaluation-harness"), ("table", ["task", "metric", "base", "trained"], lrows)]


def fusion_section(fusion: dict | None, images: dict) -> list:
    """``llamapro fuse`` on this run: method, alpha, and the alpha curve when it was searched."""
    if not fusion:
        return []
    S: list = [("h2", "Fusion")]
    S.append(("p", f"`llamapro fuse --method {fusion['method']}` wrote `{fusion.get('out', '?')}` with "
                   f"alpha = {fusion['alpha']:g} (0: the base, 1: the trained model)."
                   + (f" Identity initialisation: {fusion['identity_from']}."
                      if fusion["method"] == "weighted" else "")))
    if fusion.get("curve"):
        S.append(("p", fusion.get("choice") or ""))
        if images.get("alpha_curve.png"):
            S.append(("img", "alpha_curve.png", "Held-out perplexity against the fusion strength alpha"))
        S.append(("table", *curve_table(fusion)))
    return S


def lineage_section(meta: ExpansionMetadata | None, results: EvalResults | None) -> list:
    """Where the checkpoint came from: base, positions, strategy, what it trained from, results."""
    m = meta or ExpansionMetadata()
    base = m.base or BaseRecord()
    lin = [["base path", str(_q(base.path))], ["base fingerprint", str(_q(base.fingerprint))],
           ["inserted positions", str(m.new_layer_indices if "new_layer_indices" in m else "?")],
           ["strategy", str(_q(m.strategy))],
           ["trained from", str(_q((m.training or TrainingRecord()).trained_from))]]
    if results:
        lin.append(["evaluation results", str(results.results_path or "")])
    return [("h2", "Lineage"), ("table", ["", ""], lin)]
