"""The files that pass between steps, read and written in one place: the run directory layout,
the expansion metadata (``llamapro.json``) with its training record, and evaluation results.

Records are typed views over the JSON they were read from: every key the code reads has a
property (with its type and meaning), unknown keys survive a round trip, and because each record
is also a ``dict``, code that still indexes by string keeps working while it moves to attributes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro.errors import CheckpointError
from llamapro.tensors import METADATA_FILE, write_json_atomic

METADATA_VERSION = 1
RESULTS_VERSION = 1
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_CONFIG = "adapter_config.json"


# --- the run directory ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RunLayout:
    """What lives under a run directory ``<run.output_dir>/<run.name>/``::

        expanded/          llamapro expand (+ proof in llamapro.json)
        model/             the trained HF checkpoint; metrics.jsonl, config.yaml beside it;
        ray/               Ray Train checkpoints
        eval/ report/      llamapro eval: results.json, report.{md,html} + PNGs
        export/ pack/      llamapro export (clean HF dir + model card), its block pack
        fused/ fusion/     llamapro fuse: the fused model, its results.json
        baseline-<mode>/   a baseline (full, lora, freeze_last_n) trained on the base: same layout
    """

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    expanded = property(lambda self: self.root / "expanded", doc="the expanded checkpoint")
    model = property(lambda self: self.root / "model", doc="the trained checkpoint")
    metrics = property(lambda self: self.root / METRICS_FILE, doc="per-step training metrics")
    config = property(lambda self: self.root / "config.yaml", doc="the training config, as run")
    ray = property(lambda self: self.root / "ray", doc="Ray Train checkpoints")
    eval = property(lambda self: self.root / "eval", doc="evaluation results")
    eval_results = property(lambda self: self.root / "eval" / RESULTS_FILE, doc="eval/results.json")
    report = property(lambda self: self.root / "report", doc="report.md / report.html + plots")
    export = property(lambda self: self.root / "export", doc="the exported HF directory")
    pack = property(lambda self: self.root / "pack", doc="the block pack beside the export")
    fused = property(lambda self: self.root / "fused", doc="the fused model")
    fusion = property(lambda self: self.root / "fusion", doc="fusion results.json")

    def baseline(self, mode: str) -> RunLayout:
        """The run directory of a baseline trained on the base with ``mode``."""
        return RunLayout(self.root / f"baseline-{mode}")


@dataclass(frozen=True)
class Located:
    """Where a user-given path points: the run directory (None for a bare checkpoint outside a
    run) and the checkpoint directory."""

    run: Path | None
    checkpoint: Path

    def __iter__(self):  # ``run, ckpt = locate(p)``
        return iter((self.run, self.checkpoint))


def locate(path, *, adapters: bool = False) -> Located:
    """A run directory (with ``model/``) or a checkpoint directory (with ``config.json``, or with
    ``adapter_config.json`` when ``adapters``). A checkpoint's run is its parent when the parent
    holds ``metrics.jsonl``. Raises :class:`CheckpointError` for anything else."""
    p = Path(path)
    marks = ("config.json", ADAPTER_CONFIG) if adapters else ("config.json",)
    if any((p / "model" / m).is_file() for m in marks):
        return Located(p, p / "model")
    if any((p / m).is_file() for m in marks):
        return Located(p.parent if (p.parent / METRICS_FILE).is_file() else None, p)
    what = "config.json or adapter_config.json" if adapters else "config.json"
    raise CheckpointError(f"{p} is neither a run directory (with model/) nor a model directory "
                          f"(with {what})")


# --- records --------------------------------------------------------------------------------------

class Record(dict):
    """A JSON object with typed properties for the keys the code reads; every other key is kept
    as it was (a round trip loses nothing)."""

    @classmethod
    def of(cls, d: dict | None):
        """``d`` as this record (itself when it already is one; None stays None)."""
        if d is None or isinstance(d, cls):
            return d
        return cls(d)


def _field(key: str, doc: str, default: Any = None, wrap=None):
    """A property reading ``key``; ``default`` (None, ``list`` or ``dict``) when absent or null."""
    def get(self):
        v = self.get(key)
        if v is None:  # absent or null: a fresh empty list/dict for collections, else None
            return default() if callable(default) else default
        if wrap is not None and v is not None:
            w = wrap(v)
            if w is not v:  # keep the typed view in place, so changes through it persist
                self[key] = w
            return w
        return v

    def set(self, v):
        self[key] = v

    return property(get, set, doc=doc)


class BaseRecord(Record):
    """``base`` of an expansion: the checkpoint it was grown from."""

    path: str | None = _field("path", "where the base was read from (a path, URI or hub id)")
    fingerprint: str | None = _field("fingerprint", "``tensors.fingerprint`` of the base")
    model_type: str | None = _field("model_type", "the base's config.model_type")
    num_layers: int | None = _field("num_layers", "the base's decoder layers")
    config: dict | None = _field("config", "the base's config.json (strip restores it)")


class TrainingRecord(Record):
    """``training`` of a trained checkpoint: how it was trained."""

    mode: str | None = _field("mode", "llamapro, full, lora or freeze_last_n")
    config: dict | None = _field("config", "the train config, as run")
    stages: list = _field("stages", "the training stages, as run", list)
    steps: int | None = _field("steps", "optimizer steps taken")
    tokens: int | None = _field("tokens", "tokens trained on")
    train_seconds: float | None = _field("train_seconds", "wall time of training")
    originals_frozen: bool | None = _field("originals_frozen", "no original weight changed")
    trained_from: str | None = _field("trained_from", "the checkpoint training started from")
    dtype: dict = _field("dtype", "dtypes used (weights, compute)", dict)
    early_stopped_stages: list = _field("early_stopped_stages", "stages that stopped early", list)


class ExpansionMetadata(Record):
    """``llamapro.json``: what an expansion (and every later step that rewrites a checkpoint)
    records about it. ``kind`` is expanded, trained, fused, applied, base, ..."""

    version: int | None = _field("version", "metadata format version (METADATA_VERSION)")
    kind: str | None = _field("kind", "expanded, trained, fused, applied, base, ...")
    base: BaseRecord | None = _field("base", "the checkpoint this one was grown from", None, BaseRecord.of)
    family: str | None = _field("family", "the architecture family (expand.families)")
    strategy: str | None = _field("strategy", "where the new blocks went (expand.strategies)")
    num_original_layers: int | None = _field("num_original_layers", "layers before expansion")
    num_new_layers: int | None = _field("num_new_layers", "blocks added by this generation")
    num_layers: int | None = _field("num_layers", "layers after expansion")
    new_layer_indices: list = _field("new_layer_indices", "this generation's new blocks (they train)", list)
    new_layer_sources: dict = _field("new_layer_sources", "new index -> the original it copies", dict)
    zeroed_in_new_blocks: list = _field("zeroed_in_new_blocks", "tensor names zeroed in new blocks", list)
    config_keys_changed: list = _field("config_keys_changed", "config keys expansion rewrote", list)
    created_by: str | None = _field("created_by", "the function that wrote it")
    created_at: str | None = _field("created_at", "UTC timestamp")
    verification: dict | None = _field("verification", "the identity proof (None: unproven)")
    structure_check: dict | None = _field("structure_check", "the meta-device structure check")
    zero_bytes_checked: int | None = _field("zero_bytes_checked", "bytes of new blocks read back as zero")
    generation: int | None = _field("generation", "1 for a first expansion, +1 per regrowth")
    generations: list = _field("generations", "each generation's blocks at their current indices", list)
    frozen_layer_indices: list = _field("frozen_layer_indices", "earlier generations' blocks (frozen)", list)
    training: TrainingRecord | None = _field("training", "how it was trained", None, TrainingRecord.of)
    packs: list = _field("packs", "block packs applied to it", list)
    fusion: dict | None = _field("fusion", "how it was fused")
    export: dict | None = _field("export", "how it was exported")

    @property
    def base_fingerprint(self) -> str | None:
        """The recorded base's fingerprint, or None."""
        return (self.get("base") or {}).get("fingerprint")

    @property
    def base_path(self) -> str | None:
        """Where the recorded base was read from, or None."""
        return (self.get("base") or {}).get("path")

    @property
    def proven(self) -> bool:
        """Whether an identity proof is recorded."""
        return bool(self.get("verification"))


def read_metadata(model_dir: Path) -> ExpansionMetadata | None:
    """``model_dir/llamapro.json``, or None when there is none."""
    p = Path(model_dir) / METADATA_FILE
    if not p.is_file():
        return None
    try:
        return ExpansionMetadata(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: corrupt llamapro metadata ({e})") from e


def write_metadata(model_dir: Path, meta: dict) -> None:
    """Atomic replace of the metadata file (never a half-written JSON)."""
    write_json_atomic(Path(model_dir) / METADATA_FILE, meta, indent=2, sort_keys=False)


def require_metadata(model_dir: Path) -> ExpansionMetadata:
    """The metadata of a checkpoint made by `llamapro expand` (or a later step); a clear error
    for any other directory or an unknown format version."""
    meta = read_metadata(model_dir)
    if meta is None:
        raise CheckpointError(
            f"{model_dir} has no {METADATA_FILE}: it was not produced by `llamapro expand`, so "
            "llamapro does not know which layers are new"
        )
    if meta.get("version") != METADATA_VERSION:
        raise CheckpointError(f"{model_dir}/{METADATA_FILE}: unsupported metadata version {meta.get('version')}")
    return meta


# --- evaluation results ---------------------------------------------------------------------------

class EvalResults(Record):
    """``eval/results.json``: one evaluation of a checkpoint against its base."""

    version: int | None = _field("version", "results format version (RESULTS_VERSION)")
    checkpoint: str | None = _field("checkpoint", "the evaluated checkpoint (absolute path)")
    kind: str | None = _field("kind", "the checkpoint's metadata kind")
    base: dict = _field("base", "how the base was obtained, its recorded path and fingerprint", dict)
    new_layer_indices: list = _field("new_layer_indices", "the checkpoint's new blocks", list)
    originals_frozen: bool | None = _field("originals_frozen", "from the training record")
    sets: dict = _field("sets", "per held-out set: role, base/trained perplexity, change", dict)
    greedy: dict | None = _field("greedy", "greedy agreement on the regression prompts")
    lm_eval: dict | None = _field("lm_eval", "lm-eval-harness task metrics")
    battery: dict | None = _field("battery", "the capability battery")
    gate: dict = _field("gate", "the regression gate: passed, summary, checks", dict)
    rollback: dict | None = _field("rollback", "whether strip gives the base back")
    report: str | None = _field("report", "the report written beside the results")
    dtype: str | None = _field("dtype", "the trained model's dtype during evaluation")
    device: str | None = _field("device", "where the evaluation ran (cpu, cuda:0)")
    num_threads: int | None = _field("num_threads", "torch CPU threads during evaluation")
    eval_seconds: float | None = _field("eval_seconds", "wall time of the evaluation")
    eval_peak_rss_bytes: int | None = _field("eval_peak_rss_bytes", "peak resident memory of the evaluating process")
    evaluated_at: str | None = _field("evaluated_at", "UTC timestamp")
    run_dir: str | None = _field("run_dir", "the run directory (absolute; None for a bare checkpoint)")
    results_path: str | None = _field("results_path", "where this results.json was written (absolute)")
    compare_digest: str | None = _field("compare_digest", "`llamapro compare`: the eval settings these results "
                                                          "were made with")


def write_results(out_dir, results: dict) -> Path:
    """``out_dir/results.json``, atomically; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / RESULTS_FILE
    write_json_atomic(p, results, indent=2, ensure_ascii=False, allow_nan=False)
    return p


def read_results(run_or_eval_dir) -> EvalResults | None:
    """The results in ``DIR/results.json`` or ``DIR/eval/results.json``, or None."""
    d = Path(run_or_eval_dir)
    for p in (d / RESULTS_FILE, d / "eval" / RESULTS_FILE):
        if p.is_file():
            return EvalResults(json.loads(p.read_text()))
    return None
