"""Writing a report: ``report.md``, ``report.html`` and the PNGs for a run or a checkpoint, and the
eval step with its report (evaluation one layer down, the report drawn from its results)."""

from __future__ import annotations

from pathlib import Path

from llamapro.artifacts import RunLayout, read_metadata
from llamapro.eval.results import read_results, write_results
from llamapro.eval.run import eval_paths, run_eval
from llamapro.report.inputs import locate_run, read_events
from llamapro.report.plots import (
    plot_alpha_curve,
    plot_greedy,
    plot_loss,
    plot_perplexity,
    plot_stack,
    plot_throughput,
)
from llamapro.report.render import render_html, render_markdown
from llamapro.report.sections import report_sections


def build_report(run_dir, eval_results: dict | None = None, out_dir=None) -> Path:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out_dir`` (default RUN/report).

    ``run_dir`` is a training run directory (metrics.jsonl, model/) or a checkpoint directory.
    ``eval_results`` defaults to RUN/eval/results.json when present. Returns report.html's path.
    """
    run_dir = Path(run_dir)
    run, ckpt = locate_run(run_dir)
    meta = read_metadata(ckpt) if ckpt else None
    if eval_results is None:
        eval_results = read_results(run)
    fusion = read_results(RunLayout(run).fusion)  # written by `llamapro fuse` on this run
    events = read_events(run)
    out = Path(out_dir) if out_dir else RunLayout(run).report
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
    title, sections = report_sections(run, ckpt, meta, events, eval_results, images, fusion)
    (out / "report.md").write_text(render_markdown(title, sections) + "\n", encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(title, sections) + "\n", encoding="utf-8")
    return page


def evaluate_and_report(cfg, run_dir=None, checkpoint=None, heldout: dict | None = None,
                        trust_remote_code: bool | None = None, say=None) -> dict:
    """``llamapro eval``'s step: :func:`llamapro.eval.run_eval` (same arguments), then, unless
    ``eval.report`` is false, the report in ``RUN/report`` (``CKPT-eval/report`` beside a bare
    checkpoint), its path recorded in the results (``results["report"]``) and in results.json."""
    say = say or (lambda m: None)
    results = run_eval(cfg, run_dir=run_dir, checkpoint=checkpoint, heldout=heldout,
                       trust_remote_code=trust_remote_code, say=say)
    if cfg.eval.report:
        run, ckpt, home, out_dir = eval_paths(cfg, run_dir, checkpoint)
        report_dir = RunLayout(home).report
        say(f"report -> {report_dir}")
        results["report"] = str(build_report(run or ckpt, results, out_dir=report_dir))
        write_results(out_dir, results)
    return results
