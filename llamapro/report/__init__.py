"""One report per run: ``RUN/report/report.md`` and ``report.html`` with PNG plots beside them.

The plots are what a person looks at first: training loss coloured by stage with the held-out
losses per set, throughput, perplexity before/after with the gate's threshold, which layers were
inserted (a diagram of the stack), greedy agreement per regression prompt. The page is
self-contained (inline CSS, no scripts, no external resources; images by relative path).

Inputs are plain files: ``RUN/metrics.jsonl`` (training events), the checkpoint's
``llamapro.json`` and the evaluation results (``RUN/eval/results.json``). Any of them may be
missing; the report says what it could not show. matplotlib runs headless (Agg canvas, no pyplot).

Modules: ``inputs`` (events, run layout, derived facts), ``plots`` (the PNGs), ``sections`` (the
content), ``render`` (Markdown and HTML), ``build`` (:func:`build_report`, and
:func:`evaluate_and_report`: the eval step followed by its report). The report sits above
:mod:`llamapro.eval` and reads its results; eval never imports the report.
"""

from llamapro.report.build import build_report, evaluate_and_report
from llamapro.report.inputs import layer_table, read_events, summarize
from llamapro.report.plots import (
    plot_alpha_curve,
    plot_greedy,
    plot_loss,
    plot_perplexity,
    plot_stack,
    plot_throughput,
)
from llamapro.report.render import md_table, render_html, render_markdown, strip_verdict
from llamapro.report.sections import battery_section, curve_table, report_sections, rollback_sentence

__all__ = [
    "build_report", "evaluate_and_report", "layer_table", "read_events", "summarize",
    "plot_alpha_curve", "plot_greedy", "plot_loss", "plot_perplexity", "plot_stack",
    "plot_throughput", "md_table", "render_html", "render_markdown", "strip_verdict",
    "battery_section", "curve_table", "report_sections", "rollback_sentence",
]
