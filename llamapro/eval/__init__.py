"""Evaluation after training: did the model learn the new domain, and did it keep what it knew?

For the trained checkpoint and its base, on each held-out set: token-level mean cross-entropy over
labelled positions (next-token shift, labels -100 ignored, exactly the training loss) and
perplexity = exp(loss). On a regression prompt set: greedy answers of both models, their
exact-match rate and mean longest-common-prefix share. With ``eval.battery`` on, the knowledge
battery (:mod:`llamapro.eval.battery`): zero-shot multiple-choice accuracy of both models on public
benchmarks, with 95% intervals and paired changes. Retention sets are named replayed (their text
was in the training mixture) or not replayed (``eval.gate.replayed_sets``); only the latter, and
the battery, measure forgetting. Then the regression gate
(:class:`~llamapro.config.eval.GateConfig`) decides; ``llamapro eval`` exits 4 when it fails.

The base is, by default, the trained model itself with the inserted blocks skipped: with the
originals frozen that computes exactly what the base computed, with one model in memory.

Held-out sets arrive as arrays, ``{name: {"input_ids": [[...]], "labels": [[...]]}}``, so the
numbers here never depend on Ray; :func:`heldout_from_config` materialises them from the data
pipeline (Ray Data). Results land in ``RUN/eval/results.json``; the report is drawn from them one
layer up (:mod:`llamapro.report`).

Modules: ``heldout`` (prompts and held-out sets in), ``metrics`` (loss, perplexity, greedy
agreement), ``gate`` (the thresholds), ``battery`` (the knowledge battery), ``harness``
(lm-evaluation-harness), ``models`` (loading, threads), ``base`` (which base, rollback check),
``run`` (one checkpoint; the step from a config), ``results`` (results.json), ``compare``
(``llamapro compare``: runs side by side).
"""

from llamapro.errors import EvalError, LmEvalUnavailable
from llamapro.eval.base import BasePair, resolve_base, rollback_check
from llamapro.eval.gate import NOT_SCORED, battery_checks, check_gate, retention_label
from llamapro.eval.harness import lm_eval_available, require_lm_eval, run_lm_eval
from llamapro.eval.heldout import (
    as_blocks,
    blocks_from_dataset,
    heldout_from_config,
    heldout_sets,
    load_heldout_file,
    load_prompts,
    replayed_sources,
)
from llamapro.eval.metrics import (
    compare_sets,
    encode_prompts,
    greedy,
    greedy_summary,
    heldout_loss,
    prefix_agreement,
)
from llamapro.eval.models import load_model, torch_threads
from llamapro.eval.results import (
    RESULTS_FILE,
    RESULTS_VERSION,
    EvalResults,
    format_results,
    read_results,
    write_results,
)
from llamapro.eval.run import eval_paths, evaluate_checkpoint, run_eval

__all__ = [
    "EvalError", "LmEvalUnavailable", "BasePair", "resolve_base", "rollback_check", "NOT_SCORED",
    "battery_checks", "check_gate", "retention_label", "lm_eval_available", "require_lm_eval",
    "run_lm_eval", "as_blocks", "blocks_from_dataset", "heldout_from_config", "heldout_sets",
    "load_heldout_file", "load_prompts", "replayed_sources", "compare_sets", "encode_prompts",
    "greedy", "greedy_summary", "heldout_loss", "prefix_agreement", "load_model", "torch_threads",
    "RESULTS_FILE", "RESULTS_VERSION", "EvalResults", "format_results", "read_results", "write_results",
    "eval_paths", "evaluate_checkpoint", "run_eval",
]
