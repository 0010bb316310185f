"""An evaluation's results on disk (``RUN/eval/results.json``) and as a few lines for a terminal."""

from __future__ import annotations

import json
from pathlib import Path

from llamapro.checkpoint import write_json_atomic
from llamapro.eval.battery import format_change

RESULTS_VERSION = 1
RESULTS_FILE = "results.json"


def write_results(out_dir, results: dict) -> Path:
    """``out_dir/results.json``, written atomically (strict JSON: no NaN)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / RESULTS_FILE
    write_json_atomic(p, results, indent=2, ensure_ascii=False, allow_nan=False)
    return p


def read_results(run_or_eval_dir) -> dict | None:
    """The results in ``DIR/results.json`` or ``DIR/eval/results.json``; None when neither exists."""
    d = Path(run_or_eval_dir)
    for p in (d / RESULTS_FILE, d / "eval" / RESULTS_FILE):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def format_results(r: dict) -> str:
    """A few lines for a terminal: per set base -> trained perplexity, greedy agreement, gate."""
    lines = [f"checkpoint  {r['checkpoint']}", f"base        {r['base']['why']}"]
    for name, s in r["sets"].items():
        role = s["role"] + ("" if s.get("replayed") is None else
                            ", replayed" if s["replayed"] else ", not replayed")
        lines.append(f"{name:<24} [{role}] ppl {s['base']['ppl']:.4g} -> {s['trained']['ppl']:.4g} "
                     f"({s['ppl_change']:+.2%}) over {s['tokens']} tokens")
    bat = r.get("battery")
    if bat:
        for name, e in bat["tasks"].items():
            lines.append(f"battery     {format_change(name, e)}")
    g = r.get("greedy")
    if g:
        lines.append(f"greedy      {g['prompts']} prompts x {g['max_new_tokens']} tokens: exact match "
                     f"{g['exact_match']:.0%}, mean prefix agreement {g['prefix_agreement']:.0%}")
    rb = r.get("rollback")
    if rb and rb.get("applicable"):
        lines.append("rollback    `llamapro strip` gives back the base exactly" if rb["equals_base"]
                     else "rollback    `llamapro strip` gives the base's architecture, NOT its exact weights")
    if r.get("report"):
        lines.append(f"report      {r['report']}")
    lines.append(r["gate"]["summary"])
    return "\n".join(lines)
