"""An evaluation's results: the typed record on disk (``RUN/eval/results.json``, read and written by
:mod:`llamapro.artifacts`) and as a few lines for a terminal."""

from __future__ import annotations

from llamapro.artifacts import RESULTS_FILE, RESULTS_VERSION, EvalResults, read_results, write_results
from llamapro.eval.battery import format_change

__all__ = ["RESULTS_FILE", "RESULTS_VERSION", "EvalResults", "format_results", "read_results",
           "write_results"]


def format_results(r: dict) -> str:
    """A few lines for a terminal: per set base -> trained perplexity, greedy agreement, gate."""
    r = EvalResults.of(r)
    lines = [f"checkpoint  {r.checkpoint}", f"base        {r.base['why']}"]
    for name, s in r.sets.items():
        role = s["role"] + ("" if s.get("replayed") is None else
                            ", replayed" if s["replayed"] else ", not replayed")
        lines.append(f"{name:<24} [{role}] ppl {s['base']['ppl']:.4g} -> {s['trained']['ppl']:.4g} "
                     f"({s['ppl_change']:+.2%}) over {s['tokens']} tokens")
    if r.battery:
        for name, e in r.battery["tasks"].items():
            lines.append(f"battery     {format_change(name, e)}")
    g = r.greedy
    if g:
        lines.append(f"greedy      {g['prompts']} prompts x {g['max_new_tokens']} tokens: exact match "
                     f"{g['exact_match']:.0%}, mean prefix agreement {g['prefix_agreement']:.0%}")
    rb = r.rollback
    if rb and rb.get("applicable"):
        lines.append("rollback    `llamapro strip` gives back the base exactly" if rb["equals_base"]
                     else "rollback    `llamapro strip` gives the base's architecture, NOT its exact weights")
    if r.report:
        lines.append(f"report      {r.report}")
    lines.append(r.gate["summary"])
    return "\n".join(lines)
