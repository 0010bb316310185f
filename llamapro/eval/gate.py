"""The regression gate: the configured thresholds applied to an evaluation's numbers (held-out
perplexity, greedy agreement, the knowledge battery), each check with one plain sentence."""

from __future__ import annotations

from llamapro.config.eval import GateConfig
from llamapro.errors import EvalError
from llamapro.eval.battery import format_change


def retention_label(name: str, s: dict) -> str:
    """"retention set NAME (not replayed)": which retention sets measure forgetting."""
    if s.get("replayed") is None:
        return f"retention set {name}"
    return f"retention set {name} ({'replayed in training' if s['replayed'] else 'not replayed'})"


NOT_SCORED = "not scored"
"""check_gate's default ``battery``: the caller gates perplexity and greedy answers only (fuse's
alpha curve); eval.gate.max_accuracy_drop is then not applied. ``None`` means the battery should
have been run and was not: an error."""


def check_gate(sets: dict, greedy_res: dict | None, gate: GateConfig,
               battery: dict | None | str = NOT_SCORED) -> dict:
    """Apply the thresholds. Each check has a plain sentence; ``summary`` is the one to print."""
    if not gate.enabled:
        return {"enabled": False, "passed": True, "checks": [],
                "summary": "Regression gate disabled (eval.gate.enabled=false): nothing was checked."}
    missing = [s for s in gate.gated_sets() if s not in sets]
    if missing:
        raise EvalError(f"eval.gate names sets {missing} that were not evaluated "
                        f"(evaluated: {sorted(sets)})")
    checks = []
    for name in gate.retention_sets:
        s = sets[name]
        thr = gate.max_retention_ppl_increase
        ok = s["ppl_change"] <= thr + 1e-12
        checks.append({
            "check": "max_retention_ppl_increase", "set": name, "value": s["ppl_change"],
            "threshold": thr, "passed": ok,
            "replayed": s.get("replayed"),
            "sentence": f"{retention_label(name, s)}: perplexity {s['base']['ppl']:.4g} -> "
                        f"{s['trained']['ppl']:.4g} ({s['ppl_change']:+.2%}), "
                        + ("within" if ok else "more than") + f" the allowed rise of {thr:.2%}"})
    for name in gate.domain_sets:
        s = sets[name]
        thr = gate.min_domain_ppl_decrease
        ok = -s["ppl_change"] >= thr - 1e-12
        checks.append({
            "check": "min_domain_ppl_decrease", "set": name, "value": -s["ppl_change"],
            "threshold": thr, "passed": ok,
            "sentence": f"domain set {name}: perplexity {s['base']['ppl']:.4g} -> "
                        f"{s['trained']['ppl']:.4g} ({s['ppl_change']:+.2%}), "
                        + ("meeting" if ok else "short of")
                        + (f" the required fall of at least {thr:.2%}" if thr > 0 else
                           " the requirement not to rise" if thr == 0 else
                           f" the allowed rise of at most {-thr:.2%}")})
    for key, metric, label in (("min_greedy_exact_match", "exact_match", "exact-match rate"),
                               ("min_greedy_prefix_agreement", "prefix_agreement",
                                "mean prefix agreement")):
        thr = getattr(gate, key)
        if thr <= 0:
            continue
        if not greedy_res:
            raise EvalError(f"eval.gate.{key} is {thr} but no regression prompts were evaluated "
                            "(set eval.prompts)")
        v = greedy_res[metric]
        checks.append({"check": key, "set": None, "value": v, "threshold": thr,
                       "passed": v >= thr - 1e-12,
                       "sentence": f"greedy answers on {greedy_res['prompts']} regression prompts: "
                                   f"{label} {v:.1%}, " + ("meeting" if v >= thr - 1e-12 else "below")
                                   + f" the required {thr:.1%}"})
    if gate.max_accuracy_drop is not None and battery is not NOT_SCORED:
        if not battery:
            raise EvalError("eval.gate.max_accuracy_drop is set but the knowledge battery was not "
                            "run (set eval.battery.enabled=true)")
        checks += battery_checks(battery, gate.max_accuracy_drop)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        summary = "Regression gate FAILED: " + "; ".join(c["sentence"] for c in failed) + "."
    elif checks:
        summary = f"Regression gate passed: all {len(checks)} checks met ({'; '.join(c['sentence'] for c in checks)})."
    else:
        summary = ("Regression gate passed vacuously: no sets or thresholds are configured "
                   "(set eval.gate.retention_sets and eval.gate.domain_sets).")
    return {"enabled": True, "passed": not failed, "checks": checks, "summary": summary}


def battery_checks(battery: dict, max_drop: float) -> list[dict]:
    """One check per battery task: it fails when the task's accuracy fell by more than
    ``max_drop`` AND the paired 95% interval of the change lies wholly below zero (not noise)."""
    checks = []
    for name, e in battery["tasks"].items():
        v = e[e["metric"]]
        drop = -v["change"]
        real = v["ci"][1] < 0.0
        ok = not (drop > max_drop + 1e-12 and real)
        why = ("within" if drop <= max_drop + 1e-12 else
               "beyond the allowed drop but inside the noise, so" if not real else "more than")
        checks.append({"check": "max_accuracy_drop", "set": f"battery:{name}", "value": drop,
                       "threshold": max_drop, "passed": ok, "ci": v["ci"], "noise": v["noise"],
                       "sentence": f"knowledge battery {format_change(name, e)}, {why} the allowed "
                                   f"drop of {max_drop:.3f}"})
    return checks
